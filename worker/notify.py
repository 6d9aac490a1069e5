"""Telling an account that its SMTP setup is failing, recovered, or was bypassed.

One notice per event per incident, two channels. The webhook: a row in
`incident_notices`, written with the incident's change and posted by the webhook
dispatcher (worker.webhooks), signed and retried like the events. The email (through the
backup provider) or, with neither configured, the log: the `outbox.notify` task claims
the event's column (`notified_at`, `backup_notified_at`, `recovery_notified_at`) before
sending, so however many mails fail, the account hears about it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from worker.message import OutgoingEmail
from worker.replies import Reply, Verdict, classify, parse_reply
from worker.store.incidents import NOTICE_COLUMNS, claim_notice, notice_subject, unclaim_notice
from worker.store.notices import add_notice

log = logging.getLogger("outbox.notify")


class NoticeFailed(Exception):
    """The notice could not be delivered; the claim was given back for a retry."""


@dataclass(frozen=True)
class Notice:
    kind: str
    account: str
    payload: dict[str, Any]
    subject: str
    text: str
    webhook: str | None
    email: str | None
    #: The account's encrypted events secret: notices are signed like its events.
    secret_encrypted: str | None = None


#: What a notice tells its account, as the log line says it.
TOLD = {
    "opened": "its SMTP server is failing",
    "backup": "its mail goes out through the backup provider",
    "recovered": "its SMTP server accepts mail again",
}


def build_notice(
    session: Session, incident_id: int, kind: str, *, backup_configured: bool
) -> Notice | None:
    """The notice of one event of an incident. ``backup_configured``: whether mail past
    the retry window goes to a backup provider (else it ends failed, and the notice
    says so rather than promise a backup that does not exist)."""
    about = notice_subject(session, incident_id)
    if about is None:
        return None
    incident, account, waiting = about.incident, about.account, about.pending
    reply: Reply = parse_reply(incident.last_reply or "")
    if incident.last_code is not None and reply.code is None:
        reply = Reply(
            code=incident.last_code, enhanced=incident.last_enhanced, text=incident.last_reply or ""
        )
    explanation = classify(reply)
    verdict = incident.verdict or Verdict.ACCOUNT.value
    payload: dict[str, Any] = {
        "event": f"smtp_incident.{kind}",
        "account": account.name,
        "incident_id": incident.id,
        "opened_at": incident.opened_at.isoformat(),
        "closed_at": incident.closed_at.isoformat() if incident.closed_at else None,
        "verdict": verdict,
        "code": incident.last_code,
        "enhanced": incident.last_enhanced,
        "reply": incident.last_reply,
        "meaning": explanation.meaning,
        "advice": explanation.advice,
        "waiting": waiting,
        "sent_via_backup": incident.backup_deliveries,
    }
    host = f"{account.smtp_host}:{account.smtp_port}"
    if kind == "opened":
        subject = f"Outbox: mail for {account.name} cannot be sent through {host}"
        text = (
            f"Outbox could not send mail for the account {account.name} through its SMTP "
            f"server {host}.\n\nThe server said: {incident.last_reply}\n\n"
            f"What it means: {explanation.meaning}\n\nWhat to do: {explanation.advice}\n\n"
            f"{waiting} email(s) are waiting (shown as Pending). They will go out as soon as "
            "the settings are corrected; if they cannot be sent within the retry window, "
            + (
                "they go out through Outbox's backup provider."
                if backup_configured
                else "they end failed: no backup provider is configured to send them instead."
            )
        )
    elif kind == "backup":
        subject = f"Outbox: mail for {account.name} is going out through the backup provider"
        text = (
            f"The SMTP server {host} of the account {account.name} kept failing for the "
            f"whole retry window ({incident.last_reply}). Outbox has started sending the "
            "waiting mail through its backup provider, from Outbox's own address with "
            "Reply-To set to your sender, so replies still reach you.\n\n"
            f"What to do: {explanation.advice}"
        )
    else:
        subject = f"Outbox: mail for {account.name} is flowing again"
        text = (
            f"The SMTP server {host} of the account {account.name} accepts mail again. "
            f"{waiting} waiting email(s) are being sent now."
            + (
                f" {incident.backup_deliveries} went out through the backup provider "
                "while it was failing."
                if incident.backup_deliveries
                else ""
            )
        )
    payload["message"] = text
    return Notice(
        kind,
        account.name,
        payload,
        subject,
        text,
        account.notify_webhook,
        account.notify_email,
        account.events_secret_encrypted,
    )


def notice_email(notice: Notice, *, from_addr: str, message_id: str) -> OutgoingEmail:
    assert notice.email
    return OutgoingEmail(
        message_id=message_id,
        from_addr=from_addr,
        to=(notice.email,),
        subject=notice.subject,
        text=notice.text,
    )


@dataclass(frozen=True)
class Told:
    """What `Notifier.send` did, for the task to act on."""

    outcome: str  #: "sent", "already sent", "no such incident", "failed"
    #: The notice has a webhook to post: the dispatcher should run now, not at its next beat.
    webhook_due: bool = False
    #: The email could not be sent (why); its claim was given back: retry the task.
    failed: str | None = None


class Notifier:
    """The `outbox.notify` side of a notice: makes sure its webhook row exists (the
    dispatcher posts it) and emails it through the backup provider, or logs it."""

    def __init__(
        self,
        db: Any,
        *,
        backup: Any = None,
        backup_from: str | None = None,
        backup_configured: bool | None = None,
        clock: Any = None,
    ) -> None:
        from worker.clock import utcnow

        self.db = db
        self.backup = backup
        self.backup_from = backup_from
        #: Whether mail past the window goes to a backup (default: a provider is given).
        self.backup_configured = (
            backup is not None if backup_configured is None else backup_configured
        )
        self.clock = clock or utcnow

    def send(self, incident_id: int, kind: str) -> Told:
        if kind not in NOTICE_COLUMNS:
            raise ValueError(f"unknown notice kind {kind!r}")
        with self.db.session() as session:
            if not claim_notice(session, incident_id, kind, now=self.clock()):
                return Told("already sent")
            # The drain wrote it with the incident's change; a message published by an
            # earlier release (no rows then) writes it here, so its webhook still goes.
            add_notice(session, incident_id, kind, now=self.clock())
            notice = build_notice(
                session, incident_id, kind, backup_configured=self.backup_configured
            )
        if notice is None:
            return Told("no such incident")
        webhook_due = notice.webhook is not None
        try:
            how = self._deliver(notice, incident_id)
        except Exception as exc:
            with self.db.session() as session:
                unclaim_notice(session, incident_id, kind)
            why = f"{kind} notice for {notice.account} failed: {exc}"
            return Told("failed", webhook_due=webhook_due, failed=why)
        if how:
            log.info(
                "account %s was told %s (%s)",
                notice.account,
                TOLD[kind],
                how,
                extra={
                    "event": "notice",
                    "kind": kind,
                    "account": notice.account,
                    "incident_id": incident_id,
                },
            )
        return Told("sent", webhook_due=webhook_due)

    def _deliver(self, notice: Notice, incident_id: int) -> str:
        """Email the notice, or log it; says how, for the log ("": only its webhook,
        which the dispatcher logs when it posts it)."""
        if notice.email:
            if self.backup is None or not self.backup_from:
                log.warning(
                    "notice for %s (to %s, no backup provider to email it): %s",
                    notice.account,
                    notice.email,
                    notice.text,
                    extra={"event": "notice_logged", "account": notice.account},
                )
                return "in this log: no backup provider to email it"
            from worker.backup import BackupOutcome

            result = self.backup.send(
                notice_email(
                    notice,
                    from_addr=self.backup_from,
                    message_id=f"<incident-{incident_id}-{notice.kind}@outbox>",
                ),
                from_addr=self.backup_from,
                reply_to=None,
            )
            if result.outcome is not BackupOutcome.SENT:
                raise NoticeFailed(result.explanation)
            return f"by email to {notice.email}"
        if not notice.webhook:
            log.warning(
                "notice for %s (no webhook or email configured): %s",
                notice.account,
                notice.text,
                extra={"event": "notice_logged", "account": notice.account},
            )
            return "in this log: no webhook or email configured"
        return ""
