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

from sqlalchemy import update
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
    release,
)
from worker.store.models import Account, AttemptOutcome, Channel, MessageStatus
from worker.store.models import Message as MessageRow
from worker.store.sending import (
    SendClaim,
    SendingAccount,
    claim_for_send,
    record_send,
    record_with_slot,
)

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


def _unless_lease_lost(outcome: Outcome, owned: bool) -> Outcome:
    """A stale holder (the send outlived its lease) schedules nothing: whoever holds the
    message now decides its next step."""
    if not owned and outcome.action in (Action.RETRY, Action.BACKUP, Action.PARKED):
        return Outcome(outcome.message_id, Action.SKIPPED, detail="lease lost during the attempt")
    return outcome


def smtp_key(account: Account | SendingAccount) -> str:
    """The connection pool's key: a settings change (new version) means new connections."""
    return f"{account.id}:{account.settings_version}"


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
        with self.db.session(single_statement=True) as session:
            got = claim_for_send(
                session,
                message_id,
                now=now,
                lease_s=self.config.lease_s,
                token=token,
                holder=self.holder,
            )
        if isinstance(got, NotClaimed):
            return Outcome(message_id, Action.SKIPPED, detail=got.reason)
        claimed, account = got.message, got.account
        try:
            smtp_account: SmtpAccount | SecretKeyError = self.smtp_account(account)
        except SecretKeyError as exc:
            smtp_account = exc
        if got.slot is None or not claimed.recipients or isinstance(smtp_account, SecretKeyError):
            # The uncommon cases: each decides in a transaction of its own.
            with self.db.session() as session:
                held_back = self._before_send(session, got, now, smtp_account)
            if held_back is not None:
                return held_back
            assert not isinstance(smtp_account, SecretKeyError)

        email = claimed.email
        data = compose(email).as_bytes()
        result = self.pool.send(
            smtp_account, envelope_address(email.from_addr), claimed.recipients, data
        )
        finished = self.clock()
        decision = decide_after_smtp(
            SmtpAttempt(
                recipients=claimed.recipients,
                reply=result.reply,
                accepted=result.accepted,
                refused=result.refused,
            ),
            settled_before=claimed.delivered_to,
            attempt_number=claimed.attempt_number,
            now=finished,
            deadline=claimed.deadline,
            policy=self.config.policy,
            rng=self.rng,
        )
        keep_slot_s = self._keep_slot_s(smtp_account.key)
        # The mail may have gone out: losing this record would send it again, so a
        # database restart here is waited out rather than given up on.
        give_up_after_s = claimed.record_time_s(self.clock())
        if self._touches_account(decision, account):
            outcome = self.db.run(
                lambda session: self._record_with_account(
                    session, got, result, decision, now, finished, keep_slot_s
                ),
                give_up_after_s=give_up_after_s,
            )
        else:
            attempt, update_, planned = self._attempt_and_update(
                claimed, result, decision, now, finished, decision.next_attempt_at
            )
            owned = self.db.run(
                lambda session: record_send(
                    session,
                    claimed,
                    attempt,
                    update_,
                    now=finished,
                    holder=self.holder,
                    keep_slot_s=keep_slot_s,
                ),
                give_up_after_s=give_up_after_s,
                single_statement=True,
            )
            outcome = _unless_lease_lost(planned, owned)
        self._log_attempt(claimed, account.name, result.reply, decision, outcome)
        return outcome

    def _before_send(
        self,
        session: Session,
        got: SendClaim,
        now: datetime,
        smtp_account: SmtpAccount | SecretKeyError,
    ) -> Outcome | None:
        """The claim took no connection slot, or there is nothing to send, or the password
        cannot be read: decide here (None: go ahead and send)."""
        claimed, account = got.message, got.account
        if now >= claimed.deadline:
            release(
                session,
                claimed,
                now=now,
                next_attempt_at=claimed.deadline,
                due_at=now + timedelta(seconds=self.config.wake_grace_s),
            )
            return Outcome(
                claimed.id, Action.BACKUP, countdown_s=0.0, detail="the retry window is over"
            )
        if not claimed.recipients:
            # Every recipient was settled by earlier attempts; only the status lagged.
            self._give_back_slot(session, got)
            return self._settle_without_sending(session, claimed, now)
        if isinstance(smtp_account, SecretKeyError):
            log.error(
                "OPERATOR ACTION NEEDED: message %s of account %s: %s",
                claimed.id,
                account.name,
                smtp_account,
            )
            self._give_back_slot(session, got)
            return self._hold_back(
                session, claimed, now, self.config.policy.max_s, str(smtp_account), park=True
            )
        if got.slot is None:
            return self._gate(session, claimed, account, now)
        return None

    def _keep_slot_s(self, smtp_key: str) -> float | None:
        """How long to keep the connection slot after an attempt: while the connection
        stays open for reuse (until it would be closed as idle, plus the reaper's tick),
        since an idle connection still counts against the account's cap; None: give the
        slot back."""
        return self.config.smtp_idle_s + 2.0 if self.pool.has_connection(smtp_key) else None

    def _give_back_slot(self, session: Session, got: SendClaim) -> None:
        if got.slot is None:
            return
        account = got.account
        keep = self._keep_slot_s(smtp_key(account))
        if keep is not None:
            slots.hold_slot(session, account.id, holder=self.holder, now=self.clock(), hold_s=keep)
        else:
            slots.release_slot(session, account.id, holder=self.holder)

    @staticmethod
    def _touches_account(decision: Decision, account: SendingAccount) -> bool:
        """Does this attempt change the account's state (slow-down, incident)?"""
        return bool(
            decision.throttle
            or (decision.reached_server and account.throttle_level)
            or decision.account_problem
            or (
                account.open_incident_id is not None
                and (decision.reached_server or decision.status == MessageStatus.SENT.value)
            )
        )

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

    def smtp_account(self, account: Account | SendingAccount) -> SmtpAccount:
        """How to reach the account's server."""
        password = (
            self.box.decrypt(account.smtp_password_encrypted)
            if account.smtp_password_encrypted
            else None
        )
        return SmtpAccount(
            key=smtp_key(account),
            host=account.smtp_host,
            port=account.smtp_port,
            username=account.smtp_username,
            password=password,
            tls=SmtpTlsMode(account.tls_mode),
            ca_pem=account.ca_pem,
            timeout_s=self.config.smtp_timeout_s,
        )

    def _gate(
        self, session: Session, got: Claimed, account: SendingAccount, now: datetime
    ) -> Outcome | None:
        """May this message talk to the server now? If not, give the claim back."""
        if account.throttled(now):
            assert account.throttle_until is not None
            wait = (account.throttle_until - now).total_seconds() * (1 + 0.2 * self.rng())
            return self._hold_back(session, got, now, wait, "the server asked us to slow down")
        circuit = incident_store.check_circuit(
            session,
            account.id,
            got.id,
            now=now,
            lease_s=self.config.lease_s,
            incident_id=account.open_incident_id,
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

    def _record_with_account(
        self,
        session: Session,
        got: SendClaim,
        result: SendResult,
        decision: Decision,
        started: datetime,
        finished: datetime,
        keep_slot_s: float | None,
    ) -> Outcome:
        """Record an attempt that also changes the account: a slow-down begins or ends,
        an incident opens or closes. One transaction for all of it."""
        claimed, seen = got.message, got.account
        account_id = claimed.account_id
        notices: list[Notice] = []
        wake_account_id: int | None = None

        next_at = decision.next_attempt_at
        account: Account | None = None
        if decision.throttle or (decision.reached_server and seen.throttle_level != 0):
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
                next_at = min(account.throttle_until, claimed.deadline)
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
                message_id=claimed.id,
                next_probe_at=next_at or claimed.deadline,
            )
            if opened:
                notices.append(Notice(incident_id, "opened"))
        elif seen.open_incident_id is not None and (
            decision.reached_server or decision.status == MessageStatus.SENT.value
        ):
            # Only when the claim saw an open incident: no UPDATE per message otherwise.
            closed = incident_store.close_incident(session, account_id, now=finished)
            if closed is not None:
                notices.append(Notice(closed, "recovered"))
                wake_account(session, account_id, now=finished)
                wake_account_id = account_id

        attempt, update_, planned = self._attempt_and_update(
            claimed, result, decision, started, finished, next_at
        )
        owned = record_with_slot(
            session,
            claimed,
            attempt,
            update_,
            now=finished,
            holder=self.holder,
            keep_slot_s=keep_slot_s,
        )
        outcome = _unless_lease_lost(planned, owned)
        return Outcome(
            outcome.message_id,
            outcome.action,
            countdown_s=outcome.countdown_s,
            detail=outcome.detail,
            notices=tuple(notices),
            wake_account_id=wake_account_id,
        )

    def _attempt_and_update(
        self,
        got: Claimed,
        result: SendResult,
        decision: Decision,
        started: datetime,
        finished: datetime,
        next_at: datetime | None,
    ) -> tuple[AttemptRecord, MessageUpdate, Outcome]:
        """The attempt's row, the message's new state and what comes next (no I/O)."""
        reply = decision.explanation.reply
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
        return attempt, update_, outcome

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
