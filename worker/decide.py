"""Delivery policy: pure decisions, no I/O, clock and randomness passed in.

`decide_after_smtp`: given who was still to be delivered, the replies of one attempt, the
clock's reading and the retry policy, which recipients are settled, whether the message is
sent, failed or still pending, when to try again, and what the account as a whole should
learn from it (an incident, a slow-down, a recovery, an unreachable relay).

Also written once here: what is recorded per recipient (`RecipientResult`), whether a wait
rides on a broker countdown or is parked in the database (`broker_countdown`), how long an
account pauses after a slow-down (`throttle_pause_s`), when a drain stops its batch
(`stops_the_batch`) and what an account's drain leaves behind it (`plan_after_drain`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NotRequired, TypedDict

from worker.backoff import next_attempt_at
from worker.replies import Explanation, Reply, Stage, Verdict, classify

#: Verdicts that end a recipient for good: another try or another route won't help.
PERMANENT = frozenset({Verdict.RECIPIENT, Verdict.MESSAGE})


@dataclass(frozen=True)
class RetryPolicy:
    window_s: float = 24 * 3600.0
    base_s: float = 60.0
    max_s: float = 2 * 3600.0


@dataclass(frozen=True)
class SmtpAttempt:
    """The facts of one SMTP attempt, as the transport reported them."""

    recipients: tuple[str, ...]  #: who this attempt tried to deliver to
    reply: Reply  #: the deciding reply (DATA's, or the one that stopped the session)
    accepted: tuple[str, ...]  #: delivered by this attempt
    refused: Mapping[str, Reply]  #: refused at RCPT


@dataclass(frozen=True)
class Decision:
    status: str  #: "sent" | "failed" | "pending"
    settled: dict[str, Any]  #: the message's delivered_to after this attempt
    explanation: Explanation  #: what people are shown as the latest outcome
    next_attempt_at: datetime | None = None  #: for pending: the next SMTP try
    window_over: bool = False  #: pending, but the window has closed: backup's turn
    account_problem: bool = False  #: open (or keep open) an incident on the account
    reached_server: bool = False  #: the account's server took us past AUTH: setup works
    throttle: bool = False  #: the server asked us to slow down (421, 4.7.x rate)
    #: The session failed before MAIL for a reason that may pass (a timeout, a dropped
    #: connection): the relay cannot be reached now, for any of the account's mail.
    unreachable: bool = False
    refusals: dict[str, Explanation] = field(default_factory=dict)


class RecipientResult(TypedDict):
    """What is kept per recipient, in `messages.delivered_to` and `attempts.recipients`."""

    outcome: str  #: "sent" | "refused" (for good) | "pending" (still to be tried)
    code: int | None
    enhanced: NotRequired[str | None]
    text: str
    verdict: NotRequired[str]  #: the reply's `Verdict` (SMTP only)
    channel: NotRequired[str]  #: "backup" when the backup provider delivered it


#: How much of the server's text is kept per recipient.
RECIPIENT_TEXT_CHARS = 500


def recipient_result(
    outcome: str, reply: Reply, explanation: Explanation | None = None
) -> RecipientResult:
    """One recipient's result of an SMTP attempt (`explanation` defaults to the reply's)."""
    explanation = explanation or classify(reply)
    return {
        "outcome": outcome,
        "code": reply.code,
        "enhanced": reply.enhanced,
        "text": reply.text[:RECIPIENT_TEXT_CHARS],
        "verdict": explanation.verdict.value,
    }


def backup_recipient_result(
    outcome: str, *, http_status: int | None, detail: str
) -> RecipientResult:
    """One recipient's result of a backup-provider attempt."""
    result: RecipientResult = {"outcome": outcome, "code": http_status, "text": detail[:200]}
    if outcome == "sent":
        result["channel"] = "backup"
    return result


def is_sent(result: Mapping[str, Any]) -> bool:
    """Did this recipient get the mail (through any channel)?"""
    return result.get("outcome") == "sent"


def is_throttle(reply: Reply) -> bool:
    """The server asks for fewer or slower connections: 421, or a 4.7.x deferral."""
    if reply.code == 421:
        return True
    return bool(
        reply.enhanced
        and reply.enhanced.startswith("4.7.")
        and reply.code
        and 400 <= reply.code < 500
        and "greylist" not in reply.text.lower()
    )


def decide_after_smtp(
    attempt: SmtpAttempt,
    *,
    settled_before: Mapping[str, Any],
    attempt_number: int,
    now: datetime,
    deadline: datetime,
    policy: RetryPolicy,
    rng: Callable[[], float] = random.random,
) -> Decision:
    settled = dict(settled_before)
    overall = classify(attempt.reply)
    refusals: dict[str, Explanation] = {}
    account_problem = overall.verdict is Verdict.ACCOUNT

    for rcpt in attempt.recipients:
        if rcpt in attempt.accepted:
            settled[rcpt] = recipient_result("sent", attempt.reply, overall)
        elif rcpt in attempt.refused:
            reply = attempt.refused[rcpt]
            explanation = classify(reply, Stage.RCPT)
            refusals[rcpt] = explanation
            if explanation.verdict in PERMANENT:
                settled[rcpt] = recipient_result("refused", reply, explanation)
            elif explanation.verdict is Verdict.ACCOUNT:
                account_problem = True
        elif overall.verdict in PERMANENT and attempt.reply.stage in (Stage.DATA, Stage.RCPT):
            # The server refused the message itself (too large, content) for everyone.
            settled[rcpt] = recipient_result("refused", attempt.reply, overall)

    remaining = [r for r in _all(attempt, settled_before) if r not in settled]
    any_sent = any(is_sent(v) for v in settled.values())
    # The deciding explanation people see: the server's last word on this message.
    shown = overall
    if not attempt.accepted and refusals and attempt.reply.stage == Stage.RCPT:
        shown = next(iter(refusals.values()))
    elif attempt.accepted and refusals:
        shown = next(iter(refusals.values())) if remaining else overall

    reached = attempt.reply.stage in (Stage.MAIL, Stage.RCPT, Stage.DATA) or bool(attempt.accepted)
    reached = reached and overall.verdict is not Verdict.ACCOUNT
    throttle = is_throttle(attempt.reply) or any(is_throttle(r) for r in attempt.refused.values())
    unreachable = (
        not reached
        and not attempt.accepted
        and overall.verdict is Verdict.RETRY
        and not throttle
        and attempt.reply.stage in (Stage.CONNECT, Stage.AUTH)
    )

    if not remaining:
        return Decision(
            status="sent" if any_sent else "failed",
            settled=settled,
            explanation=shown,
            account_problem=account_problem,
            reached_server=reached,
            throttle=throttle,
            unreachable=unreachable,
            refusals=refusals,
        )
    retry_at = next_attempt_at(
        failed_attempts=attempt_number,
        now=now,
        deadline=deadline,
        window_s=policy.window_s,
        base_s=policy.base_s,
        max_s=policy.max_s,
        rng=rng,
    )
    return Decision(
        status="pending",
        settled=settled,
        explanation=shown,
        next_attempt_at=retry_at if retry_at is not None else deadline,
        window_over=retry_at is None,
        account_problem=account_problem,
        reached_server=reached,
        throttle=throttle,
        unreachable=unreachable,
        refusals=refusals,
    )


def _all(attempt: SmtpAttempt, settled_before: Mapping[str, Any]) -> list[str]:
    return [*settled_before, *(r for r in attempt.recipients if r not in settled_before)]


def summary(explanation: Explanation) -> str:
    """One line for lists: the reply and its meaning."""
    return f"{explanation.reply} — {explanation.meaning}"


# -- waits, pauses and drains ------------------------------------------------------------


def broker_countdown(wait_s: float, *, countdown_max_s: float) -> float | None:
    """A wait of up to `countdown_max_s` rides on a Celery countdown (its seconds, never
    negative); a longer one is parked in the database and the sweeper wakes it (None).

    Redis redelivers a countdown longer than its visibility timeout again and again, and
    every countdown waits in worker memory: long waits must not live on the broker.
    """
    wait_s = max(0.0, wait_s)
    return wait_s if wait_s <= countdown_max_s else None


def throttle_pause_s(
    *, level: int, base_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """How long an account pauses after its `level`-th slow-down (421, 4.7.x) or
    unreachable relay in a row: `base_s` doubling per repeat, capped like retries (never
    below `base_s`: a pause shorter than asked for is no pause), jittered to 50-100%."""
    cap = max(max_s, base_s)
    return min(cap, base_s * 2 ** max(0, level - 1)) * (0.5 + 0.5 * rng())


def stops_the_batch(decision: Decision) -> bool:
    """After this attempt, should a drain stop sending the account's other mail?

    Yes when the problem is the account's, not the message's: its setup is broken (an
    incident), its relay asked us to slow down, or cannot be reached right now. Sending
    the rest of the batch would only repeat the failure against a struggling server.
    """
    return decision.account_problem or decision.throttle or decision.unreachable


@dataclass(frozen=True)
class DrainPlan:
    """What follows a drain of one account."""

    #: Drains to publish at once, at the back of the queue (mail is due and slots are free).
    continuations: int
    #: When a drain should run next for mail that is not due yet (a broker countdown), or
    #: None: nothing is waiting soon enough (the sweeper wakes what is parked longer).
    timer_at: datetime | None


def plan_after_drain(
    *,
    due_now: int,
    free_slots: int,
    batch_size: int,
    next_due_at: datetime | None,
    paused_until: datetime | None,
    now: datetime,
    countdown_max_s: float,
) -> DrainPlan:
    """The follow-up of a drain, decided after it gave its connection slot back.

    `due_now`: the account's mail that is due and not held by another drain (counted up to
    `free_slots * batch_size`); `next_due_at`: its earliest not-yet-due mail;
    `paused_until`: the account may not talk to its server before this (a slow-down, or
    an incident whose next probe is later).

    One continuation per batch of due mail, up to the free connection slots, so a backlog
    is drained by as many connections as the account allows. A paused account gets no
    continuation, only a timer for the end of its pause.
    """
    if paused_until is not None and paused_until > now:
        wake_at: datetime | None = paused_until
    elif due_now > 0:
        wanted = max(1, math.ceil(due_now / max(1, batch_size)))
        # No free slot: the drains holding them look at the queue when they end.
        return DrainPlan(continuations=min(free_slots, wanted), timer_at=None)
    else:
        wake_at = next_due_at
    if wake_at is None:
        return DrainPlan(continuations=0, timer_at=None)
    countdown = broker_countdown((wake_at - now).total_seconds(), countdown_max_s=countdown_max_s)
    if countdown is None:
        return DrainPlan(continuations=0, timer_at=None)
    return DrainPlan(continuations=0, timer_at=now + timedelta(seconds=countdown))
