"""Deliver an account's due mail: a drain over one connection, a record per message.

A drain (`DeliveryEngine.drain`) is what an MTA does per destination: it takes one of the
account's connection slots, claims a batch of the account's due mail in send order, sends
it message after message over one SMTP connection, records each message as soon as its
reply is known, and stops after `OUTBOX_DRAIN_BATCH` messages or `OUTBOX_DRAIN_SECONDS`, so
one account's volume never keeps a worker from the others. What follows (more drains at
the back of the queue, a countdown for the next retry, hand-offs to the backup provider,
incident notices) is returned as data (`DrainOutcome`); the Celery task publishes it.

No database transaction is open while mail is on the wire; the lease on the batch is
renewed by the process's `LeaseKeeper` while the drain works.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from worker.clock import Clock, utcnow
from worker.crypto import SecretBox, SecretKeyError
from worker.decide import (
    Decision,
    RecipientResult,
    RetryPolicy,
    SmtpAttempt,
    broker_countdown,
    decide_after_smtp,
    plan_after_drain,
    recipient_result,
    stops_the_batch,
    throttle_pause_s,
)
from worker.events import after_attempt, refused_for_good
from worker.lease import Lease, LeaseKeeper
from worker.message import compose
from worker.replies import Reply, Stage, Verdict, classify
from worker.smtp import SendResult, SmtpAccount, SmtpConnectionPool, TlsMode
from worker.store import accounts as account_store
from worker.store import drains
from worker.store import incidents as incident_store
from worker.store import notices as notice_store
from worker.store.db import Database
from worker.store.messages import (
    AttemptRecord,
    Claimed,
    MessageUpdate,
    record,
    settle_without_sending,
)
from worker.store.models import AttemptOutcome, Channel, MessageStatus, NoticeKind

log = logging.getLogger("outbox.delivery")


class Action(StrEnum):
    """What happened to one message in a drain (the log's `action`)."""

    SENT = "sent"  #: delivered; nothing more to do
    FAILED = "failed"  #: ended without delivery
    RETRY = "retry"  #: still pending: its account's drain tries again at `next_attempt_at`
    BACKUP = "backup"  #: the window is over: the backup provider's turn
    SKIPPED = "skipped"  #: found nothing to do (already sent, leased, not due)


@dataclass(frozen=True)
class NoticeDue:
    """An incident notice to email (`outbox.notify`) once the drain's writes committed;
    its webhook row is already written (`notice_due`)."""

    incident_id: int
    kind: str  #: a `NoticeKind` value


def notice_due(session: Session, incident_id: int, kind: str, *, now: datetime) -> NoticeDue:
    """An incident notice is due: its row, in the transaction of the change that made it
    due, so the webhook dispatcher posts it even if the `outbox.notify` message is lost."""
    notice_store.add_notice(session, incident_id, kind, now=now)
    return NoticeDue(incident_id, str(kind))


@dataclass(frozen=True)
class BackupHandOff:
    """A message whose retry window ends within `countdown_s`: the backup provider's."""

    message_id: int
    countdown_s: float


@dataclass
class DrainOutcome:
    """What a drain did and what must follow it, for the task to publish."""

    account_id: int
    #: Why the drain did nothing ("" when it ran): the account is missing, paused, or
    #: every connection slot was busy.
    skipped: str = ""
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    #: Drains of this account to publish now, at the back of the queue.
    continuations: int = 0
    #: Publish a countdown drain of this account in this many seconds.
    timer_s: float | None = None
    backups: list[BackupHandOff] = field(default_factory=list)
    notices: list[NoticeDue] = field(default_factory=list)
    #: A message with a `status_task` was recorded: its events are to be published.
    events_due: bool = False
    #: The account has its own events webhook: what the drain recorded is to be posted.
    webhook: bool = False

    @property
    def attempts(self) -> int:
        return self.sent + self.failed + self.deferred


@dataclass(frozen=True)
class EngineConfig:
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    #: How long a drain's lease lasts without renewal (OUTBOX_LEASE).
    lease_s: float = 30.0
    countdown_max_s: float = 300.0
    wake_grace_s: float = 60.0
    smtp_timeout_s: float = 30.0
    #: First pause after a 421 / 4.7.x deferral or an unreachable relay; doubles per repeat.
    throttle_base_s: float = 30.0
    #: A drain sends at most this many messages (OUTBOX_DRAIN_BATCH)...
    batch_size: int = 50
    #: ...and starts no new message after this many seconds (OUTBOX_DRAIN_SECONDS).
    batch_seconds: float = 2.0
    #: A message whose next attempt is this close counts as due (clock skew, early timers).
    early_tolerance_s: float = drains.EARLY_TOLERANCE_S

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
            throttle_base_s=settings.throttle_base_s,
            batch_size=settings.drain_batch,
            batch_seconds=settings.drain_seconds,
        )

    @property
    def send_margin_s(self) -> float:
        """A message is not started with less lease left than this: room for one SMTP
        command's timeout and the record."""
        return min(self.lease_s / 2, self.smtp_timeout_s + 2.0)


def smtp_key(account: drains.DrainAccount | Any) -> str:
    """The connection pool's key: a settings change (new version) means new connections."""
    return f"{account.id}:{account.settings_version}"


def default_holder() -> str:
    """Who holds a connection slot: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def envelope_address(address: str) -> str:
    return parseaddr(address)[1]


@dataclass
class _AccountState:
    """What a drain knows of its account, kept current as its own attempts change it."""

    throttle_level: int
    incident_id: int | None
    #: This drain is the incident's probe: one message, then stop unless it succeeds.
    probing: bool = False
    stop: bool = False


class _PerMessageSeconds:
    """How long a message of each account takes here (a moving average), so a drain
    claims about as many as it can send before its time is up, not more."""

    def __init__(self, size: int = 1024) -> None:
        self._seconds: dict[int, float] = {}
        self._size = size

    def estimate(self, account_id: int) -> float | None:
        return self._seconds.get(account_id)

    def observe(self, account_id: int, seconds: float) -> None:
        old = self._seconds.pop(account_id, None)
        self._seconds[account_id] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if len(self._seconds) > self._size:
            self._seconds.pop(next(iter(self._seconds)))


def smtp_account_for(account: Any, box: SecretBox, *, timeout_s: float) -> SmtpAccount:
    """How to reach an account's server: its stored settings, the password decrypted
    (for a send, or `outbox account test`), never stored or logged."""
    password = (
        box.decrypt(account.smtp_password_encrypted) if account.smtp_password_encrypted else None
    )
    return SmtpAccount(
        key=smtp_key(account),
        host=account.smtp_host,
        port=account.smtp_port,
        username=account.smtp_username,
        password=password,
        tls=TlsMode(account.tls_mode),
        ca_pem=account.ca_pem,
        timeout_s=timeout_s,
    )


class DeliveryEngine:
    """Sends each account's mail through its own SMTP server; one per worker process.

    `drain(account_id)` is the one way mail leaves by SMTP: every wake-up (intake, a
    retry's countdown, the sweeper, an operator, an old `outbox.send`) drains an account.
    """

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        pool: SmtpConnectionPool,
        config: EngineConfig,
        *,
        keeper: LeaseKeeper | None = None,
        clock: Clock = utcnow,
        rng: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
        holder: str | None = None,
    ) -> None:
        self.db = db
        self.box = box
        self.pool = pool
        self.config = config
        self.clock = clock
        self.rng = rng
        self.monotonic = monotonic
        self.holder = holder or default_holder()
        self.keeper = keeper or LeaseKeeper(db, lease_s=config.lease_s, clock=clock)
        self._pace = _PerMessageSeconds()

    # -- a drain -----------------------------------------------------------------------

    def drain(self, account_id: int) -> DrainOutcome:
        """Send a batch of the account's due mail over one connection, then say what
        follows. Safe to run any number of times, at once or late: at most
        `max_connections` drains of an account hold a slot, and each message is claimed
        by one drain."""
        now = self.clock()
        token = uuid.uuid4().hex
        holder = f"{self.holder}:{token[:8]}"
        with self.db.session() as session:
            start = drains.begin_drain(
                session, account_id, holder=holder, now=now, hold_s=self.config.lease_s
            )
        if start is None:
            return DrainOutcome(account_id, skipped="no such account")
        if start.slot is None:
            return DrainOutcome(account_id, skipped="every connection slot is busy")
        account = start.account
        outcome = DrainOutcome(account_id, webhook=account.events_webhook is not None)
        lease = self.keeper.hold(
            token=token,
            account_id=account_id,
            holder=holder,
            until=now + timedelta(seconds=self.config.lease_s),
        )
        try:
            self._send_batches(account, lease, outcome)
        finally:
            self.keeper.release(lease)
            self.pool.close(smtp_key(account))
            self._end(account, holder, token, outcome, keep=lease.in_doubt)
        return outcome

    def deliver(self, message_id: int) -> DrainOutcome | None:
        """A wake-up for one message (`outbox.send`, as published before the drains):
        drain its account. None: the message is missing or finished."""
        with self.db.session() as session:
            account_id = drains.account_of_message(session, message_id)
        return None if account_id is None else self.drain(account_id)

    def _send_batches(self, account: drains.DrainAccount, lease: Lease, out: DrainOutcome) -> None:
        now = self.clock()
        state = _AccountState(account.throttle_level, account.incident_id)
        if account.throttled(now):
            out.skipped = "the server asked us to slow down"
            return
        if account.incident_id is not None:
            if account.probe_busy(now):
                out.skipped = "the account's server is failing; waiting for the next test"
                return
            with self.db.session() as session:
                until = now + timedelta(seconds=self.config.lease_s)
                if not drains.take_probe(session, account.incident_id, now=now, until=until):
                    out.skipped = "another drain is testing the account's server"
                    return
            state.probing = True
        try:
            smtp_account = self.smtp_account(account)
        except SecretKeyError as exc:
            self._unreadable_password(account, exc, out)
            return

        started = self.monotonic()
        ends_at = started + self.config.batch_seconds
        left = self.config.batch_size
        while left > 0 and not state.stop and self.monotonic() < ends_at:
            now = self.clock()
            limit = 1 if state.probing else self._claim_size(account.id, left, ends_at)
            with self.db.session() as session:
                batch = drains.claim_batch(
                    session,
                    account.id,
                    token=lease.token,
                    limit=limit,
                    now=now,
                    lease_until=now + timedelta(seconds=self.config.lease_s),
                    early_tolerance_s=self.config.early_tolerance_s,
                    # The incident's probe is the message that failed last: its backoff
                    # paces the tests of the broken server.
                    first=account.probe_message_id if state.probing else None,
                )
            if not batch:
                return
            lease.claimed(batch[0].lease_until, [m.id for m in batch])
            for claimed in batch:
                if state.stop or self.monotonic() >= ends_at:
                    break  # the rest goes back to the queue when the drain ends
                if not lease.may_send(
                    claimed.id, now=self.clock(), margin_s=self.config.send_margin_s
                ):
                    state.stop = True
                    log.warning(
                        "drain of account %s stops: its lease could not be renewed", account.name
                    )
                    break
                t0 = self.monotonic()
                self._send_one(claimed, account, smtp_account, lease, state, out)
                self._pace.observe(account.id, self.monotonic() - t0)
                left -= 1

    def _claim_size(self, account_id: int, left: int, ends_at: float) -> int:
        per_message = self._pace.estimate(account_id)
        if per_message is None:
            return min(left, 10)
        fits = int((ends_at - self.monotonic()) / max(per_message, 1e-4)) + 1
        return max(1, min(left, fits))

    def _end(
        self,
        account: drains.DrainAccount,
        holder: str,
        token: str,
        out: DrainOutcome,
        *,
        keep: int | None,
    ) -> None:
        """Give back what was not sent and the slot; decide and note what follows.
        `keep`: a message sent but not recorded stays leased (see `Lease.in_doubt`)."""
        try:
            self.db.run(
                lambda session: self._plan_next(session, account, holder, token, out, keep),
                give_up_after_s=self.config.lease_s / 2,
            )
        except Exception:
            # The slot and the leases expire by themselves; the sweeper wakes the account.
            log.exception("could not end the drain of account %s cleanly", account.name)

    def _plan_next(
        self,
        session: Session,
        account: drains.DrainAccount,
        holder: str,
        token: str,
        out: DrainOutcome,
        keep: int | None,
    ) -> None:
        now = self.clock()
        account_id = account.id
        queue = drains.end_drain(
            session,
            account_id,
            holder=holder,
            token=token,
            now=now,
            count_up_to=self.config.batch_size * account.max_connections,
            early_tolerance_s=self.config.early_tolerance_s,
            keep=keep,
        )
        if queue is None:
            return
        plan = plan_after_drain(
            due_now=queue.due_now,
            free_slots=queue.free_slots,
            batch_size=self.config.batch_size,
            next_due_at=queue.next_due_at,
            paused_until=queue.account.paused_until(now),
            now=now,
            countdown_max_s=self.config.countdown_max_s,
        )
        out.continuations = plan.continuations
        timer_at = queue.timer_at
        out.timer_s = None
        if plan.timer_at is not None and drains.timer_needed(
            queue.timer_at, plan.timer_at, now=now, stale_s=self.config.wake_grace_s
        ):
            timer_at = plan.timer_at
            out.timer_s = (plan.timer_at - now).total_seconds()
        drains.set_drain_flags(
            session,
            account_id,
            # Mail is due: a continuation is published, or (every other slot busy) the
            # drains holding the slots look again when they end.
            queued_at=now if queue.due_now else None,
            timer_at=timer_at if timer_at is not None and timer_at > now else None,
        )

    # -- one message ---------------------------------------------------------------------

    def _send_one(
        self,
        claimed: Claimed,
        account: drains.DrainAccount,
        smtp_account: SmtpAccount,
        lease: Lease,
        state: _AccountState,
        out: DrainOutcome,
    ) -> None:
        now = self.clock()
        if not claimed.recipients:
            # Every recipient was settled by earlier attempts; only the status lagged.
            with self.db.session() as session:
                status = settle_without_sending(session, claimed, now=now)
            out.events_due = out.events_due or claimed.status_task is not None
            if status == MessageStatus.SENT.value:
                out.sent += 1
            else:
                out.failed += 1
            return
        email = claimed.email
        data = compose(email).as_bytes()
        lease.in_doubt = claimed.id  # from here on the server may hold the mail
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
        # The mail may have gone out: losing this record would send it again, so a
        # database restart here is waited out, at least one whole lease. Waiting past the
        # lease is safe: the record only lands while the message still carries our lease
        # token, and until the sweeper takes it back nobody else can send it.
        give_up_after_s = max(self.config.lease_s, lease.seconds_left(self.clock()) - 2.0)
        if self._touches_account(decision, state):
            action, owned, notices = self.db.run(
                lambda session: self._record_with_account(
                    session, claimed, result, decision, now, finished, state
                ),
                give_up_after_s=give_up_after_s,
            )
            out.notices.extend(notices)
        else:
            attempt, update_, action = self._attempt_and_update(
                claimed, result, decision, now, finished, decision.next_attempt_at
            )
            owned = self.db.attempts.record(
                self.db, claimed, attempt, update_, now=finished, give_up_after_s=give_up_after_s
            )
        lease.in_doubt = None
        out.events_due = out.events_due or claimed.status_task is not None
        if action is Action.SENT:
            out.sent += 1
        elif action is Action.FAILED:
            out.failed += 1
        else:
            out.deferred += 1
            if action is Action.BACKUP and owned:
                countdown = broker_countdown(
                    (claimed.deadline - finished).total_seconds(),
                    countdown_max_s=self.config.countdown_max_s,
                )
                if countdown is not None:
                    out.backups.append(BackupHandOff(claimed.id, countdown))
        if stops_the_batch(decision) or (state.probing and action is not Action.SENT):
            state.stop = True
        self._log_attempt(claimed, account.name, result.reply, decision, action)

    def _unreadable_password(
        self, account: drains.DrainAccount, exc: SecretKeyError, out: DrainOutcome
    ) -> None:
        """The stored password cannot be decrypted (a lost or rotated key): nothing of the
        account can go out until an operator acts; look again after one backoff cap."""
        log.error("OPERATOR ACTION NEEDED: account %s: %s", account.name, exc)
        until = self.clock() + timedelta(seconds=self.config.policy.max_s)
        with self.db.session() as session:
            account_store.pause(session, account.id, until=until, level=account.throttle_level)
        out.skipped = str(exc)

    @staticmethod
    def _touches_account(decision: Decision, state: _AccountState) -> bool:
        """Does this attempt change the account's state (slow-down, incident)?"""
        return bool(
            decision.throttle
            or decision.unreachable
            or (decision.reached_server and state.throttle_level)
            or decision.account_problem
            or (
                state.incident_id is not None
                and (decision.reached_server or decision.status == MessageStatus.SENT.value)
            )
        )

    def smtp_account(self, account: drains.DrainAccount | Any) -> SmtpAccount:
        """How to reach the account's server (the password decrypted here, only here)."""
        return smtp_account_for(account, self.box, timeout_s=self.config.smtp_timeout_s)

    def _record_with_account(
        self,
        session: Session,
        claimed: Claimed,
        result: SendResult,
        decision: Decision,
        started: datetime,
        finished: datetime,
        state: _AccountState,
    ) -> tuple[Action, bool, list[NoticeDue]]:
        """Record an attempt that also changes the account: a slow-down begins or ends,
        an incident opens or closes. One transaction for all of it."""
        account_id = claimed.account_id
        notices: list[NoticeDue] = []
        next_at = decision.next_attempt_at
        if decision.throttle or decision.unreachable:
            state.throttle_level += 1
            pause = throttle_pause_s(
                level=state.throttle_level,
                base_s=self.config.throttle_base_s,
                max_s=self.config.policy.max_s,
                rng=self.rng,
            )
            until = finished + timedelta(seconds=pause)
            account_store.pause(session, account_id, until=until, level=state.throttle_level)
            if next_at is not None and next_at < until:
                next_at = min(until, claimed.deadline)
        elif decision.reached_server and state.throttle_level:
            state.throttle_level = 0
            account_store.pause(session, account_id, until=None, level=0)

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
            state.incident_id = incident_id
            if opened:
                notices.append(notice_due(session, incident_id, NoticeKind.OPENED, now=finished))
        elif state.incident_id is not None and (
            decision.reached_server or decision.status == MessageStatus.SENT.value
        ):
            closed = incident_store.close_incident(session, account_id, now=finished)
            state.incident_id = None
            state.probing = False
            if closed is not None:
                notices.append(notice_due(session, closed, NoticeKind.RECOVERED, now=finished))
                # Mail that waited behind the incident goes out now, with this drain.
                account_store.wake_account(session, account_id, now=finished)

        attempt, update_, action = self._attempt_and_update(
            claimed, result, decision, started, finished, next_at
        )
        owned = record(session, claimed, attempt, update_, now=finished)
        return action, owned, notices

    def _attempt_and_update(
        self,
        claimed: Claimed,
        result: SendResult,
        decision: Decision,
        started: datetime,
        finished: datetime,
        next_at: datetime | None,
    ) -> tuple[AttemptRecord, MessageUpdate, Action]:
        """The attempt's row, the message's new state and what happens to it (no I/O)."""
        reply = decision.explanation.reply
        per_recipient: dict[str, RecipientResult] = {}
        for rcpt in claimed.recipients:
            r = result.refused.get(rcpt) or result.reply
            per_recipient[rcpt] = recipient_result(
                "sent" if rcpt in result.accepted else "refused",
                r,
                classify(r, Stage.RCPT if rcpt in result.refused else None),
            )
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
            recipients=dict(per_recipient),
            worker=self.holder,
        )
        events = after_attempt(
            status=decision.status,
            channel=Channel.SMTP.value,
            explanation=decision.explanation,
            accepted=result.accepted,
            refusals=refused_for_good(decision.refusals, decision.settled, claimed.delivered_to),
            next_attempt_at=next_at if decision.status == MessageStatus.PENDING.value else None,
            attempts=claimed.attempt_number,
        )
        if decision.status != MessageStatus.PENDING.value:
            sent = decision.status == MessageStatus.SENT.value
            update_ = MessageUpdate(
                status=decision.status,
                sent_via=Channel.SMTP.value if sent else None,
                delivered_to=decision.settled,
                last_verdict=decision.explanation.verdict.value,
                last_code=reply.code,
                last_enhanced=reply.enhanced,
                last_error=None if sent and not decision.refusals else str(reply)[:1000],
                events=events,
            )
            return attempt, update_, Action.SENT if sent else Action.FAILED
        assert next_at is not None
        due_at = claimed.deadline
        if decision.window_over:
            # The backup's turn at the deadline: handed over by this drain (a countdown)
            # when that is soon enough, else by the sweeper at `due_at`.
            countdown = broker_countdown(
                (claimed.deadline - finished).total_seconds(),
                countdown_max_s=self.config.countdown_max_s,
            )
            if countdown is not None:
                due_at = claimed.deadline + timedelta(seconds=self.config.wake_grace_s)
        update_ = MessageUpdate(
            status=MessageStatus.PENDING.value,
            next_attempt_at=next_at,
            due_at=due_at,
            delivered_to=decision.settled,
            last_verdict=decision.explanation.verdict.value,
            last_code=reply.code,
            last_enhanced=reply.enhanced,
            last_error=str(reply)[:1000],
            events=events,
        )
        return attempt, update_, Action.BACKUP if decision.window_over else Action.RETRY

    def _log_attempt(
        self, claimed: Claimed, account: str, reply: Reply, decision: Decision, action: Action
    ) -> None:
        log.info(
            "attempt message=%s account=%s attempt=%s verdict=%s code=%s enhanced=%s action=%s",
            claimed.id,
            account,
            claimed.attempt_number,
            decision.explanation.verdict.value,
            reply.code,
            reply.enhanced,
            action.value,
            extra={
                "event": "attempt",
                "message_id": claimed.id,
                "account": account,
                "attempt": claimed.attempt_number,
                "channel": "smtp",
                "verdict": decision.explanation.verdict.value,
                "code": reply.code,
                "enhanced": reply.enhanced,
                "stage": reply.stage.value if reply.stage else None,
                "action": action.value,
            },
        )
