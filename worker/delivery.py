"""Deliver one message: claim it, send it, record what happened, decide what comes next.

The engine returns its decision as data (`Outcome`); the Celery tasks only turn it into
a countdown, a hand-off or a notice. No database transaction is open while the message
is on the wire: one transaction claims, one records.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.clock import Clock, utcnow
from worker.crypto import SecretBox, SecretKeyError
from worker.decide import Decision, RetryPolicy, SmtpAttempt, decide_after_smtp
from worker.message import compose
from worker.replies import Reply, Stage, Verdict, classify
from worker.smtp import SendResult, SmtpAccount, SmtpConnectionPool
from worker.smtp import TlsMode as SmtpTlsMode
from worker.store import incidents as incident_store
from worker.store import slots
from worker.store.accounts import wake_account
from worker.store.db import Database
from worker.store.messages import (
    AttemptRecord,
    Claimed,
    MessageUpdate,
    NotClaimed,
    claim,
    record,
    release,
)
from worker.store.models import Account, AttemptOutcome, Channel, MessageStatus
from worker.store.models import Message as MessageRow

log = logging.getLogger("outbox.delivery")


class Action(StrEnum):
    SENT = "sent"  #: delivered; nothing more to do
    FAILED = "failed"  #: ended without delivery
    RETRY = "retry"  #: send again after `countdown_s` (a short wait, on the broker)
    PARKED = "parked"  #: a long wait, kept in the database; the sweeper wakes it
    BACKUP = "backup"  #: the window is over: hand to the backup provider after `countdown_s`
    SKIPPED = "skipped"  #: the wake-up found nothing to do (already sent, leased, not due)


@dataclass(frozen=True)
class Notice:
    incident_id: int
    kind: str  #: "opened" | "recovered"


@dataclass(frozen=True)
class Outcome:
    message_id: int
    action: Action
    countdown_s: float | None = None
    detail: str = ""
    notices: tuple[Notice, ...] = ()
    #: The account's incident closed: wake all its pending mail now.
    wake_account_id: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    lease_s: float = 300.0
    countdown_max_s: float = 300.0
    wake_grace_s: float = 300.0
    smtp_timeout_s: float = 30.0
    smtp_idle_s: float = 60.0
    #: Countdown when every connection slot of the account is busy (jittered x1-2).
    slot_wait_s: float = 1.0
    #: First pause after a 421 / 4.7.x deferral; doubles per repeat up to policy.max_s.
    throttle_base_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        return cls(
            policy=RetryPolicy(
                window_s=settings.retry_window_s,
                base_s=settings.retry_base_s,
                max_s=settings.retry_max_s,
            ),
            lease_s=settings.lease_s,
            countdown_max_s=settings.countdown_max_s,
            wake_grace_s=settings.wake_grace_s,
            smtp_timeout_s=settings.smtp_timeout_s,
            smtp_idle_s=settings.smtp_idle_s,
            throttle_base_s=settings.throttle_base_s,
        )


def default_holder() -> str:
    """Who holds a connection slot: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def envelope_address(address: str) -> str:
    return parseaddr(address)[1]


class DeliveryEngine:
    """Sends through each account's own SMTP server; one instance per worker process."""

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        pool: SmtpConnectionPool,
        config: EngineConfig,
        *,
        clock: Clock = utcnow,
        rng: Callable[[], float] = random.random,
        holder: str | None = None,
    ) -> None:
        self.db = db
        self.box = box
        self.pool = pool
        self.config = config
        self.clock = clock
        self.rng = rng
        self.holder = holder or default_holder()

    # -- the SMTP path ---------------------------------------------------------------

    def deliver(self, message_id: int) -> Outcome:
        now = self.clock()
        token = uuid.uuid4().hex
        with self.db.session() as session:
            got = claim(session, message_id, now=now, lease_s=self.config.lease_s, token=token)
            if isinstance(got, NotClaimed):
                return Outcome(message_id, Action.SKIPPED, detail=got.reason)
            # The account and its open incident (if any) in one round trip.
            account, incident_id = session.execute(
                select(Account, incident_store.open_incident_id(Account.id)).where(
                    Account.id == got.account_id
                )
            ).one()
            if now >= got.deadline:
                release(
                    session,
                    got,
                    now=now,
                    next_attempt_at=got.deadline,
                    due_at=now + timedelta(seconds=self.config.wake_grace_s),
                )
                return Outcome(
                    message_id, Action.BACKUP, countdown_s=0.0, detail="the retry window is over"
                )
            if not got.recipients:
                # Every recipient was settled by earlier attempts; only the status lagged.
                return self._settle_without_sending(session, got, now)
            try:
                smtp_account = self.smtp_account(account)
            except SecretKeyError as exc:
                log.error(
                    "OPERATOR ACTION NEEDED: message %s of account %s: %s",
                    got.id,
                    account.name,
                    exc,
                )
                return self._hold_back(
                    session, got, now, self.config.policy.max_s, str(exc), park=True
                )
            gated = self._gate(session, got, account, now, incident_id)
            if gated is not None:
                return gated
            account_name = account.name
            throttle_level = account.throttle_level

        email = got.email
        data = compose(email).as_bytes()
        result = self.pool.send(
            smtp_account, envelope_address(email.from_addr), got.recipients, data
        )
        finished = self.clock()
        decision = decide_after_smtp(
            SmtpAttempt(
                recipients=got.recipients,
                reply=result.reply,
                accepted=result.accepted,
                refused=result.refused,
            ),
            settled_before=got.delivered_to,
            attempt_number=got.attempt_number,
            now=finished,
            deadline=got.deadline,
            policy=self.config.policy,
            rng=self.rng,
        )
        # The mail may have gone out: losing this record would send it again, so a
        # database restart here is waited out rather than given up on.
        outcome = self.db.run(
            give_up_after_s=got.record_time_s(self.clock()),
            work=lambda session: self._record_smtp(
                session,
                got,
                result,
                decision,
                now,
                finished,
                smtp_account.key,
                throttle_level,
                incident_seen=incident_id is not None,
            ),
        )
        self._log_attempt(got, account_name, result.reply, decision, outcome)
        return outcome

    def _settle_without_sending(self, session: Session, got: Claimed, now: datetime) -> Outcome:
        any_sent = any(v.get("outcome") == "sent" for v in got.delivered_to.values())
        status = MessageStatus.SENT.value if any_sent else MessageStatus.FAILED.value
        session.execute(
            update(MessageRow)
            .where(MessageRow.id == got.id, MessageRow.lease_token == got.token)
            .values(
                status=status,
                finished_at=now,
                updated_at=now,
                lease_until=None,
                lease_token=None,
                attempt_count=MessageRow.attempt_count - 1,
            )
            .execution_options(synchronize_session=False)
        )
        return Outcome(
            got.id,
            Action.SENT if any_sent else Action.FAILED,
            detail="every recipient was already settled",
        )

    def smtp_account(self, account: Account) -> SmtpAccount:
        password = (
            self.box.decrypt(account.smtp_password_encrypted)
            if account.smtp_password_encrypted
            else None
        )
        return SmtpAccount(
            key=f"{account.id}:{account.settings_version}",
            host=account.smtp_host,
            port=account.smtp_port,
            username=account.smtp_username,
            password=password,
            tls=SmtpTlsMode(account.tls_mode),
            ca_pem=account.ca_pem,
            timeout_s=self.config.smtp_timeout_s,
        )

    def _gate(
        self,
        session: Session,
        got: Claimed,
        account: Account,
        now: datetime,
        incident_id: int | None,
    ) -> Outcome | None:
        """May this message talk to the server now? If not, give the claim back."""
        if account.throttle_until is not None and account.throttle_until > now:
            wait = (account.throttle_until - now).total_seconds() * (1 + 0.2 * self.rng())
            return self._hold_back(session, got, now, wait, "the server asked us to slow down")
        circuit = incident_store.check_circuit(
            session,
            account.id,
            got.id,
            now=now,
            lease_s=self.config.lease_s,
            incident_id=incident_id,
        )
        if not circuit.allowed:
            # Wait for the incident to close (which wakes everyone), or at the latest
            # one backoff cap, so the mail still reaches the backup in time.
            wait = min(self.config.policy.max_s, (got.deadline - now).total_seconds())
            return self._hold_back(
                session,
                got,
                now,
                max(wait, 0.0),
                "the account's server is failing; another message is testing it",
                park=True,
            )
        slot = slots.acquire_slot(
            session, account.id, holder=self.holder, now=now, hold_s=self.config.lease_s
        )
        if slot is None:
            wait = self.config.slot_wait_s * (1 + self.rng())
            return self._hold_back(session, got, now, wait, "all connection slots are busy")
        return None

    def _hold_back(
        self,
        session: Session,
        got: Claimed,
        now: datetime,
        wait_s: float,
        why: str,
        *,
        park: bool = False,
    ) -> Outcome:
        when = min(now + timedelta(seconds=wait_s), got.deadline)
        countdown = (when - now).total_seconds()
        on_broker = not park and countdown <= self.config.countdown_max_s
        due = when + timedelta(seconds=self.config.wake_grace_s) if on_broker else when
        release(session, got, now=now, next_attempt_at=when, due_at=due)
        if on_broker:
            return Outcome(got.id, Action.RETRY, countdown_s=countdown, detail=why)
        return Outcome(got.id, Action.PARKED, detail=why)

    def _record_smtp(
        self,
        session: Session,
        got: Claimed,
        result: SendResult,
        decision: Decision,
        started: datetime,
        finished: datetime,
        smtp_key: str,
        throttle_level: int,
        *,
        incident_seen: bool,
    ) -> Outcome:
        reply = decision.explanation.reply
        account_id = got.account_id
        notices: list[Notice] = []
        wake_account_id: int | None = None

        next_at = decision.next_attempt_at
        # Only a slow-down, or the end of one, needs the account row (throttle_level is
        # what the claim read).
        account: Account | None = None
        if decision.throttle or (decision.reached_server and throttle_level != 0):
            account = session.get(Account, account_id)
            assert account is not None
        if decision.throttle:
            assert account is not None
            account.throttle_level = (account.throttle_level or 0) + 1
            # Doubles per repeated request, capped like retries (but never below the
            # first pause: a slow-down shorter than asked for is no slow-down).
            cap = max(self.config.policy.max_s, self.config.throttle_base_s)
            pause = min(cap, self.config.throttle_base_s * 2 ** (account.throttle_level - 1))
            pause *= 0.5 + 0.5 * self.rng()
            account.throttle_until = finished + timedelta(seconds=pause)
            if next_at is not None and next_at < account.throttle_until:
                next_at = min(account.throttle_until, got.deadline)
        elif account is not None and decision.reached_server and account.throttle_level:
            account.throttle_level = 0
            account.throttle_until = None

        if decision.account_problem:
            incident_id, opened = incident_store.note_account_failure(
                session,
                account_id,
                decision.explanation
                if decision.explanation.verdict is Verdict.ACCOUNT
                else classify(result.reply),
                now=finished,
                message_id=got.id,
                next_probe_at=next_at or got.deadline,
            )
            if opened:
                notices.append(Notice(incident_id, "opened"))
        elif incident_seen and (
            decision.reached_server or decision.status == MessageStatus.SENT.value
        ):
            # Only when the claim saw an open incident: no UPDATE per message otherwise.
            closed = incident_store.close_incident(session, account_id, now=finished)
            if closed is not None:
                notices.append(Notice(closed, "recovered"))
                wake_account(session, account_id, now=finished)
                wake_account_id = account_id

        if self.pool.has_connection(smtp_key):
            # The connection stays open for reuse: keep its slot until it would be closed
            # as idle (plus the reaper's tick), so the cap counts idle connections too.
            slots.hold_slot(
                session,
                account_id,
                holder=self.holder,
                now=finished,
                hold_s=self.config.smtp_idle_s + 2.0,
            )
        else:
            slots.release_slot(session, account_id, holder=self.holder)

        per_recipient = {}
        for rcpt in got.recipients:
            r = result.refused.get(rcpt) or result.reply
            per_recipient[rcpt] = {
                "outcome": "sent" if rcpt in result.accepted else "refused",
                "code": r.code,
                "enhanced": r.enhanced,
                "text": r.text[:500],
                "verdict": classify(
                    r, Stage.RCPT if rcpt in result.refused else None
                ).verdict.value,
            }
        if result.accepted:
            attempt_outcome = AttemptOutcome.SENT.value
        elif decision.status == MessageStatus.FAILED.value:
            attempt_outcome = AttemptOutcome.FAILED.value
        else:
            attempt_outcome = AttemptOutcome.DEFERRED.value
        attempt = AttemptRecord(
            channel=Channel.SMTP.value,
            started_at=started,
            finished_at=finished,
            outcome=attempt_outcome,
            verdict=classify(result.reply).verdict.value,
            stage=result.reply.stage.value if result.reply.stage else None,
            reply_code=result.reply.code,
            enhanced_code=result.reply.enhanced,
            server_text=(result.reply.text or str(result.reply))[:2000],
            recipients=per_recipient,
            worker=self.holder,
        )

        outcome: Outcome
        if decision.status != MessageStatus.PENDING.value:
            update_ = MessageUpdate(
                status=decision.status,
                sent_via=Channel.SMTP.value if decision.status == "sent" else None,
                delivered_to=decision.settled,
                last_verdict=decision.explanation.verdict.value,
                last_code=reply.code,
                last_enhanced=reply.enhanced,
                last_error=None
                if decision.status == "sent" and not decision.refusals
                else str(reply)[:1000],
            )
            action = Action.SENT if decision.status == "sent" else Action.FAILED
            outcome = Outcome(got.id, action, detail=str(reply))
        else:
            assert next_at is not None
            countdown = max(0.0, (next_at - finished).total_seconds())
            on_broker = countdown <= self.config.countdown_max_s
            due = next_at + timedelta(seconds=self.config.wake_grace_s) if on_broker else next_at
            update_ = MessageUpdate(
                status=MessageStatus.PENDING.value,
                next_attempt_at=next_at,
                due_at=due,
                delivered_to=decision.settled,
                last_verdict=decision.explanation.verdict.value,
                last_code=reply.code,
                last_enhanced=reply.enhanced,
                last_error=str(reply)[:1000],
            )
            if decision.window_over:
                action = Action.BACKUP if on_broker else Action.PARKED
            else:
                action = Action.RETRY if on_broker else Action.PARKED
            outcome = Outcome(
                got.id, action, countdown_s=countdown if on_broker else None, detail=str(reply)
            )
        owned = record(session, got, attempt, update_, now=finished)
        if not owned and outcome.action in (Action.RETRY, Action.BACKUP, Action.PARKED):
            # Someone else holds the message now; they decide its next step.
            outcome = Outcome(got.id, Action.SKIPPED, detail="lease lost during the attempt")
        return Outcome(
            outcome.message_id,
            outcome.action,
            countdown_s=outcome.countdown_s,
            detail=outcome.detail,
            notices=tuple(notices),
            wake_account_id=wake_account_id,
        )

    def _log_attempt(
        self, got: Claimed, account: str, reply: Reply, decision: Decision, outcome: Outcome
    ) -> None:
        log.info(
            "attempt message=%s account=%s attempt=%s verdict=%s code=%s enhanced=%s action=%s",
            got.id,
            account,
            got.attempt_number,
            decision.explanation.verdict.value,
            reply.code,
            reply.enhanced,
            outcome.action.value,
            extra={
                "event": "attempt",
                "message_id": got.id,
                "account": account,
                "attempt": got.attempt_number,
                "channel": "smtp",
                "verdict": decision.explanation.verdict.value,
                "code": reply.code,
                "enhanced": reply.enhanced,
                "stage": reply.stage.value if reply.stage else None,
                "action": outcome.action.value,
            },
        )
