"""What an attempt's replies mean for the message: pure decisions, no I/O.

Given who was still to be delivered, the replies of one attempt, the clock's reading
and the retry policy, `decide_after_smtp` says which recipients are settled, whether
the message is sent, failed or still pending, when to try again, and what the account
as a whole should learn from it (an incident, a slow-down, a recovery).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
    refusals: dict[str, Explanation] = field(default_factory=dict)


def _entry(outcome: str, reply: Reply, explanation: Explanation) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "code": reply.code,
        "enhanced": reply.enhanced,
        "text": reply.text[:500],
        "verdict": explanation.verdict.value,
    }


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
            settled[rcpt] = _entry("sent", attempt.reply, overall)
        elif rcpt in attempt.refused:
            reply = attempt.refused[rcpt]
            explanation = classify(reply, Stage.RCPT)
            refusals[rcpt] = explanation
            if explanation.verdict in PERMANENT:
                settled[rcpt] = _entry("refused", reply, explanation)
            elif explanation.verdict is Verdict.ACCOUNT:
                account_problem = True
        elif overall.verdict in PERMANENT and attempt.reply.stage in (Stage.DATA, Stage.RCPT):
            # The server refused the message itself (too large, content) for everyone.
            settled[rcpt] = _entry("refused", attempt.reply, overall)

    remaining = [r for r in _all(attempt, settled_before) if r not in settled]
    any_sent = any(v.get("outcome") == "sent" for v in settled.values())
    # The deciding explanation people see: the server's last word on this message.
    shown = overall
    if not attempt.accepted and refusals and attempt.reply.stage == Stage.RCPT:
        shown = next(iter(refusals.values()))
    elif attempt.accepted and refusals:
        shown = next(iter(refusals.values())) if remaining else overall

    reached = attempt.reply.stage in (Stage.MAIL, Stage.RCPT, Stage.DATA) or bool(attempt.accepted)
    reached = reached and overall.verdict is not Verdict.ACCOUNT
    throttle = is_throttle(attempt.reply) or any(is_throttle(r) for r in attempt.refused.values())

    if not remaining:
        return Decision(
            status="sent" if any_sent else "failed",
            settled=settled,
            explanation=shown,
            account_problem=account_problem,
            reached_server=reached,
            throttle=throttle,
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
        refusals=refusals,
    )


def _all(attempt: SmtpAttempt, settled_before: Mapping[str, Any]) -> list[str]:
    return [*settled_before, *(r for r in attempt.recipients if r not in settled_before)]


def summary(explanation: Explanation) -> str:
    """One line for lists: the reply and its meaning."""
    return f"{explanation.reply} — {explanation.meaning}"
