"""The final fallback: after the window, send through the backup provider's HTTP API.

No provider offers an idempotency key on send, so the fallback is claimed exactly like
an SMTP attempt: a message that SMTP delivered a second before the deadline, or that an
operator cancelled, is not pending any more and is never sent again here.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from worker.backoff import backoff_delay_s
from worker.backup import BackupOutcome, BackupProvider, BackupResult, backup_sender
from worker.clock import Clock, utcnow
from worker.decide import backup_recipient_result, broker_countdown
from worker.delivery import Action, NoticeDue, envelope_address, notice_due
from worker.events import backup_event
from worker.message import OutgoingEmail
from worker.store.accounts import account_by_id
from worker.store.db import Database
from worker.store.incidents import count_backup_delivery
from worker.store.messages import (
    AttemptRecord,
    Claimed,
    MessageUpdate,
    NotClaimed,
    attempts_through,
    claim,
    record,
    release,
)
from worker.store.models import AttemptOutcome, Channel, EventType, MessageStatus, NoticeKind
from worker.store.sweep import NO_PROVIDER

log = logging.getLogger("outbox.backup")


@dataclass(frozen=True)
class BackupConfig:
    backup_from: str | None
    #: How long after the deadline the provider's 429/5xx answers are retried.
    retry_window_s: float = 3600.0
    base_s: float = 30.0
    max_s: float = 600.0
    lease_s: float = 300.0
    countdown_max_s: float = 300.0
    wake_grace_s: float = 300.0


@dataclass(frozen=True)
class BackupStep:
    """What one backup attempt did, and what must follow it."""

    message_id: int
    action: Action
    #: For `Action.BACKUP`: try the provider again after this many seconds (a countdown);
    #: for `Action.RETRY`: the SMTP window is still open, wake the account's drain.
    countdown_s: float | None = None
    detail: str = ""
    notices: tuple[NoticeDue, ...] = ()
    account_id: int | None = None


def restrict_to(email: OutgoingEmail, recipients: tuple[str, ...]) -> OutgoingEmail:
    """The same email addressed only to `recipients` (those SMTP did not deliver)."""
    wanted = {envelope_address(r).lower() for r in recipients}

    def keep(addresses: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(a for a in addresses if envelope_address(a).lower() in wanted)

    return replace(email, to=keep(email.to), cc=keep(email.cc), bcc=keep(email.bcc))


class BackupEngine:
    def __init__(
        self,
        db: Database,
        provider: BackupProvider | None,
        config: BackupConfig,
        *,
        clock: Clock = utcnow,
        rng: Callable[[], float] = random.random,
        holder: str = "backup",
    ) -> None:
        self.db = db
        self.provider = provider
        self.config = config
        self.clock = clock
        self.rng = rng
        self.holder = holder

    def deliver(self, message_id: int) -> BackupStep:
        """Send one message whose SMTP window is over through the backup provider, once.

        Claimed like an SMTP send (no provider offers an idempotency key, so the claim is
        what keeps a redelivered task from sending twice); a provider's 429/5xx is retried
        for OUTBOX_BACKUP_RETRY_WINDOW, any other refusal ends the message failed with the
        provider's reason. Safe to run any number of times, at once or late.
        """
        now = self.clock()
        token = uuid.uuid4().hex
        with self.db.session() as session:
            got = claim(session, message_id, now=now, lease_s=self.config.lease_s, token=token)
            if isinstance(got, NotClaimed):
                return BackupStep(message_id, Action.SKIPPED, detail=got.reason)
            if now < got.deadline:
                # Woken early (an operator, a stray task): SMTP still has time.
                release(session, got, now=now, next_attempt_at=now, due_at=got.deadline)
                return BackupStep(
                    message_id,
                    Action.RETRY,
                    detail="the retry window is still open",
                    account_id=got.account_id,
                )
            account = account_by_id(session, got.account_id)
            assert account is not None
            backup_tries = attempts_through(session, got.id, Channel.BACKUP)
            verified = account.backup_verified
            account_name = account.name

        if self.provider is None or not self.config.backup_from:
            return self._finish_without_provider(got, now)

        email = restrict_to(got.email, got.recipients)
        from_addr, reply_to = backup_sender(
            email, backup_from=self.config.backup_from, verified=verified
        )
        result = self.provider.send(email, from_addr=from_addr, reply_to=reply_to)
        finished = self.clock()
        # The provider may have accepted it: a lost record would send it again.
        outcome = self.db.run(
            lambda session: self._record(session, got, result, backup_tries, now, finished),
            give_up_after_s=got.record_time_s(self.clock()),
        )
        log_fn = log.error if result.alert_operator else log.info
        log_fn(
            "backup attempt message=%s account=%s provider=%s status=%s outcome=%s%s",
            got.id,
            account_name,
            result.provider,
            result.http_status,
            result.outcome.value,
            " OPERATOR ACTION NEEDED: " + result.explanation if result.alert_operator else "",
            extra={
                "event": "attempt",
                "message_id": got.id,
                "account": account_name,
                "attempt": got.attempt_number,
                "channel": "backup",
                "provider": result.provider,
                "code": result.http_status,
                "action": outcome.action.value,
            },
        )
        return outcome

    def _finish_without_provider(self, got: Claimed, now: datetime) -> BackupStep:
        with self.db.session() as session:
            record(
                session,
                got,
                AttemptRecord(
                    channel=Channel.BACKUP.value,
                    started_at=now,
                    finished_at=now,
                    outcome=AttemptOutcome.FAILED.value,
                    verdict=None,
                    stage=None,
                    reply_code=None,
                    enhanced_code=None,
                    server_text=NO_PROVIDER,
                    worker=self.holder,
                ),
                MessageUpdate(
                    status=MessageStatus.FAILED.value,
                    delivered_to=got.delivered_to,
                    last_error=NO_PROVIDER,
                    events=(backup_event(EventType.FAILED, NO_PROVIDER),),
                ),
                now=now,
            )
        return BackupStep(got.id, Action.FAILED, detail=NO_PROVIDER)

    def _record(
        self,
        session: Session,
        got: Claimed,
        result: BackupResult,
        backup_tries: int,
        started: datetime,
        finished: datetime,
    ) -> BackupStep:
        attempt = AttemptRecord(
            channel=Channel.BACKUP.value,
            started_at=started,
            finished_at=finished,
            outcome={
                BackupOutcome.SENT: AttemptOutcome.SENT.value,
                BackupOutcome.RETRY: AttemptOutcome.DEFERRED.value,
                BackupOutcome.FAILED: AttemptOutcome.FAILED.value,
            }[result.outcome],
            verdict=None,
            stage=None,
            reply_code=result.http_status,
            enhanced_code=None,
            server_text=f"{result.provider}: {result.detail}"[:2000],
            recipients={
                r: backup_recipient_result(
                    "sent" if result.outcome is BackupOutcome.SENT else "pending",
                    http_status=result.http_status,
                    detail=result.detail,
                )
                for r in got.recipients
            },
            provider_message_id=result.provider_message_id,
            worker=self.holder,
        )
        notices: list[NoticeDue] = []
        if result.outcome is BackupOutcome.SENT:
            settled = dict(got.delivered_to)
            for rcpt in got.recipients:
                settled[rcpt] = backup_recipient_result(
                    "sent", http_status=result.http_status, detail=result.detail
                )
            record(
                session,
                got,
                attempt,
                MessageUpdate(
                    status=MessageStatus.SENT.value,
                    sent_via=Channel.BACKUP.value,
                    delivered_to=settled,
                    last_error=None,
                    events=(
                        backup_event(
                            EventType.SENT,
                            f"{result.provider}: {result.detail}",
                            code=result.http_status,
                            queue_id=result.provider_message_id,
                            recipients=list(got.recipients),
                            attempts=got.attempt_number,
                        ),
                    ),
                ),
                now=finished,
            )
            to_notify = count_backup_delivery(session, got.account_id)
            if to_notify is not None:
                notices.append(notice_due(session, to_notify, NoticeKind.BACKUP, now=finished))
            return BackupStep(
                got.id, Action.SENT, detail=f"sent via {result.provider}", notices=tuple(notices)
            )

        give_up_at = got.deadline + timedelta(seconds=self.config.retry_window_s)
        delay = backoff_delay_s(
            retry_number=backup_tries,
            base_s=self.config.base_s,
            max_s=self.config.max_s,
            rng=self.rng,
        )
        next_at = finished + timedelta(seconds=delay)
        if result.outcome is BackupOutcome.RETRY and next_at < give_up_at:
            countdown = broker_countdown(delay, countdown_max_s=self.config.countdown_max_s)
            on_broker = countdown is not None
            record(
                session,
                got,
                attempt,
                MessageUpdate(
                    status=MessageStatus.PENDING.value,
                    next_attempt_at=next_at,
                    due_at=next_at + timedelta(seconds=self.config.wake_grace_s)
                    if on_broker
                    else next_at,
                    delivered_to=got.delivered_to,
                    last_error=f"backup: {result.explanation}",
                    last_code=result.http_status,
                    events=(
                        backup_event(
                            EventType.DEFERRED,
                            f"{result.provider}: {result.detail}",
                            code=result.http_status,
                            meaning=result.explanation,
                            next_attempt_at=next_at.isoformat(),
                            attempts=got.attempt_number,
                        ),
                    ),
                ),
                now=finished,
            )
            if on_broker:
                return BackupStep(got.id, Action.BACKUP, countdown_s=delay, detail=result.detail)
            # Parked: the sweeper hands it over again at `due_at`.
            return BackupStep(got.id, Action.SKIPPED, detail=result.detail)
        reason = result.explanation
        if result.outcome is BackupOutcome.RETRY:
            reason = f"The backup provider kept failing until the end of its retry time: {reason}"
        record(
            session,
            got,
            attempt,
            MessageUpdate(
                status=MessageStatus.FAILED.value,
                delivered_to=got.delivered_to,
                last_error=f"backup: {reason}"[:1000],
                last_code=result.http_status,
                events=(
                    backup_event(
                        EventType.FAILED,
                        f"{result.provider}: {result.detail}",
                        code=result.http_status,
                        meaning=reason,
                    ),
                ),
            ),
            now=finished,
        )
        return BackupStep(got.id, Action.FAILED, detail=reason)
