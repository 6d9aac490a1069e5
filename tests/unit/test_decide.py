"""Unit tests for what one SMTP attempt means for the message (worker.decide)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from worker.decide import (
    Decision,
    DrainPlan,
    RetryPolicy,
    SmtpAttempt,
    broker_countdown,
    decide_after_smtp,
    is_throttle,
    plan_after_drain,
    stops_the_batch,
    throttle_pause_s,
)
from worker.replies import (
    ConnectionFailure,
    Reply,
    Stage,
    Verdict,
    connection_reply,
    reply_from,
)

POLICY = RetryPolicy()
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DEADLINE = NOW + timedelta(hours=23)
BOB, CAROL = "bob@example.com", "carol@example.org"

OK_DATA = reply_from(250, "2.0.0 Ok: queued as 4F2A", Stage.DATA)
NO_SUCH_USER = reply_from(550, "5.1.1 <carol@example.org>: Recipient address rejected", Stage.RCPT)
GREYLISTED = reply_from(451, "4.7.1 <carol@example.org>: greylisted, try again later", Stage.RCPT)
RATE_LIMITED = reply_from(450, "4.7.0 too many messages, slow down", Stage.RCPT)
BAD_LOGIN = reply_from(535, "5.7.8 Authentication credentials invalid", Stage.AUTH)
TOO_MANY_CONNECTIONS = reply_from(421, "4.7.0 too many connections from your host", Stage.CONNECT)
TOO_BIG = reply_from(552, "5.3.4 Message size exceeds fixed limit", Stage.DATA)


def _decide(
    *,
    recipients: tuple[str, ...],
    reply: Reply,
    accepted: tuple[str, ...] = (),
    refused: Mapping[str, Reply] | None = None,
    settled_before: Mapping[str, object] | None = None,
    attempt_number: int = 1,
    now: datetime = NOW,
    deadline: datetime = DEADLINE,
) -> Decision:
    return decide_after_smtp(
        SmtpAttempt(
            recipients=recipients, reply=reply, accepted=accepted, refused=dict(refused or {})
        ),
        settled_before=dict(settled_before or {}),
        attempt_number=attempt_number,
        now=now,
        deadline=deadline,
        policy=POLICY,
        rng=lambda: 0.5,
    )


def _outcomes(decision: Decision) -> dict[str, str]:
    return {rcpt: entry["outcome"] for rcpt, entry in decision.settled.items()}


def test_all_accepted_is_sent_and_each_recipient_settled_as_sent():
    decision = _decide(recipients=(BOB, CAROL), reply=OK_DATA, accepted=(BOB, CAROL))
    assert decision.status == "sent"
    assert _outcomes(decision) == {BOB: "sent", CAROL: "sent"}
    assert decision.settled[BOB]["code"] == 250
    assert decision.settled[BOB]["verdict"] == "ok"
    assert decision.next_attempt_at is None
    assert decision.window_over is False
    assert decision.refusals == {}
    assert decision.reached_server is True
    assert decision.account_problem is False
    assert decision.throttle is False


def test_unknown_user_on_the_only_recipient_fails_without_retry():
    decision = _decide(recipients=(CAROL,), reply=NO_SUCH_USER, refused={CAROL: NO_SUCH_USER})
    assert decision.status == "failed"
    assert decision.next_attempt_at is None
    assert _outcomes(decision) == {CAROL: "refused"}
    assert decision.settled[CAROL]["enhanced"] == "5.1.1"
    assert decision.settled[CAROL]["verdict"] == "recipient"
    assert decision.explanation.verdict is Verdict.RECIPIENT
    assert decision.refusals[CAROL].verdict is Verdict.RECIPIENT
    assert decision.account_problem is False


def test_one_accepted_one_unknown_user_is_sent_with_the_refusal_reported():
    decision = _decide(
        recipients=(BOB, CAROL), reply=OK_DATA, accepted=(BOB,), refused={CAROL: NO_SUCH_USER}
    )
    assert decision.status == "sent"
    assert _outcomes(decision) == {BOB: "sent", CAROL: "refused"}
    assert set(decision.refusals) == {CAROL}
    assert decision.refusals[CAROL].reply.enhanced == "5.1.1"
    assert decision.next_attempt_at is None


def test_one_accepted_one_greylisted_retries_only_the_greylisted_one():
    first = _decide(
        recipients=(BOB, CAROL), reply=OK_DATA, accepted=(BOB,), refused={CAROL: GREYLISTED}
    )
    assert first.status == "pending"
    assert _outcomes(first) == {BOB: "sent"}
    assert CAROL not in first.settled
    assert first.refusals[CAROL].verdict is Verdict.RETRY
    assert first.explanation.verdict is Verdict.RETRY  # what is still wrong is shown
    assert first.next_attempt_at == NOW + timedelta(seconds=30)
    assert first.window_over is False
    assert first.throttle is False  # greylisting is not a request to slow down

    # The retry goes to Carol only; Bob stays delivered once.
    later = first.next_attempt_at
    second = _decide(
        recipients=(CAROL,),
        reply=reply_from(250, "2.0.0 Ok", Stage.DATA),
        accepted=(CAROL,),
        settled_before=first.settled,
        attempt_number=2,
        now=later,
    )
    assert second.status == "sent"
    assert _outcomes(second) == {BOB: "sent", CAROL: "sent"}
    assert second.settled[BOB] == first.settled[BOB]


def test_bad_login_is_an_account_problem_that_stays_pending():
    decision = _decide(recipients=(BOB,), reply=BAD_LOGIN)
    assert decision.status == "pending"
    assert decision.account_problem is True
    assert decision.reached_server is False
    assert decision.settled == {}
    assert decision.explanation.verdict is Verdict.ACCOUNT
    assert decision.next_attempt_at is not None


def test_421_at_connect_is_a_throttle_and_stays_pending():
    decision = _decide(recipients=(BOB,), reply=TOO_MANY_CONNECTIONS)
    assert decision.status == "pending"
    assert decision.throttle is True
    assert decision.reached_server is False
    assert decision.settled == {}


def test_rate_limit_deferral_at_rcpt_is_a_throttle():
    decision = _decide(
        recipients=(BOB, CAROL), reply=OK_DATA, accepted=(BOB,), refused={CAROL: RATE_LIMITED}
    )
    assert decision.status == "pending"
    assert decision.throttle is True


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (reply_from(421, "Service not available, closing channel", Stage.CONNECT), True),
        (TOO_MANY_CONNECTIONS, True),
        (RATE_LIMITED, True),
        (reply_from(451, "4.7.1 Please try again later, rate limited", Stage.RCPT), True),
        (GREYLISTED, False),
        (reply_from(451, "4.7.1 Greylisting in action", Stage.RCPT), False),
        (reply_from(451, "4.3.0 Temporary lookup failure", Stage.RCPT), False),
        (reply_from(550, "5.7.1 Relaying denied", Stage.RCPT), False),
        (NO_SUCH_USER, False),
        (OK_DATA, False),
        (connection_reply(ConnectionFailure.TIMEOUT, "timed out"), False),
    ],
)
def test_is_throttle(reply, expected):
    assert is_throttle(reply) is expected


def test_message_refused_at_data_fails_for_every_recipient():
    decision = _decide(recipients=(BOB, CAROL), reply=TOO_BIG)
    assert decision.status == "failed"
    assert _outcomes(decision) == {BOB: "refused", CAROL: "refused"}
    assert decision.settled[BOB]["verdict"] == "message"
    assert decision.explanation.verdict is Verdict.MESSAGE
    assert decision.next_attempt_at is None
    assert decision.reached_server is True


def test_recipients_settled_by_an_earlier_attempt_are_kept():
    earlier = {BOB: {"outcome": "sent", "code": 250, "enhanced": "2.0.0", "text": "Ok"}}
    decision = _decide(
        recipients=(CAROL,),
        reply=NO_SUCH_USER,
        refused={CAROL: NO_SUCH_USER},
        settled_before=earlier,
        attempt_number=3,
    )
    assert decision.settled[BOB] == earlier[BOB]
    assert _outcomes(decision) == {BOB: "sent", CAROL: "refused"}
    assert decision.status == "sent"  # delivered to at least one recipient


def test_earlier_settled_recipient_and_transient_failure_stays_pending():
    earlier = {BOB: {"outcome": "sent", "code": 250, "enhanced": None, "text": "Ok"}}
    decision = _decide(
        recipients=(CAROL,), reply=GREYLISTED, refused={CAROL: GREYLISTED}, settled_before=earlier
    )
    assert decision.status == "pending"
    assert decision.settled == earlier


def test_window_over_leaves_message_pending_for_the_backup_at_the_deadline():
    deadline = NOW + timedelta(seconds=30)  # inside the final minute: no SMTP try left
    decision = _decide(
        recipients=(BOB,), reply=GREYLISTED, refused={BOB: GREYLISTED}, deadline=deadline
    )
    assert decision.status == "pending"
    assert decision.window_over is True
    assert decision.next_attempt_at == deadline


def test_backoff_grows_with_the_attempt_number():
    first = _decide(recipients=(BOB,), reply=TOO_MANY_CONNECTIONS, attempt_number=1)
    fourth = _decide(recipients=(BOB,), reply=TOO_MANY_CONNECTIONS, attempt_number=4)
    assert first.next_attempt_at == NOW + timedelta(seconds=30)
    assert fourth.next_attempt_at == NOW + timedelta(seconds=240)


@pytest.mark.parametrize(
    ("reply", "accepted", "refused"),
    [
        (reply_from(250, "2.1.0 Sender ok", Stage.MAIL), (), {}),
        (reply_from(250, "2.1.5 Recipient ok", Stage.RCPT), (), {}),
        (OK_DATA, (BOB,), {}),
        (GREYLISTED, (), {BOB: GREYLISTED}),
    ],
    ids=["250-mail", "250-rcpt", "250-data", "451-rcpt"],
)
def test_reached_server_after_mail_rcpt_or_data(reply, accepted, refused):
    decision = _decide(recipients=(BOB,), reply=reply, accepted=accepted, refused=refused)
    assert decision.reached_server is True


def test_connection_refused_is_an_account_problem():
    reply = connection_reply(ConnectionFailure.REFUSED, "[Errno 111] Connection refused")
    decision = _decide(recipients=(BOB,), reply=reply)
    assert decision.status == "pending"
    assert decision.account_problem is True
    assert decision.reached_server is False
    assert decision.settled == {}


# -- waits, pauses and drains ------------------------------------------------------------


T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("wait_s", "expected"), [(-5.0, 0.0), (0.0, 0.0), (30.0, 30.0), (60.0, 60.0), (60.1, None)]
)
def test_a_wait_rides_on_the_broker_up_to_the_countdown_limit_else_it_is_parked(wait_s, expected):
    assert broker_countdown(wait_s, countdown_max_s=60.0) == expected


@pytest.mark.parametrize(
    ("level", "full_s"), [(0, 10.0), (1, 10.0), (2, 20.0), (3, 40.0), (9, 60.0)]
)
def test_throttle_pauses_double_per_repeat_up_to_the_cap(level, full_s):
    assert throttle_pause_s(level=level, base_s=10.0, max_s=60.0, rng=lambda: 1.0) == full_s
    assert throttle_pause_s(level=level, base_s=10.0, max_s=60.0, rng=lambda: 0.0) == full_s / 2


def test_a_throttle_cap_below_the_base_is_no_shorter_than_the_base():
    assert throttle_pause_s(level=5, base_s=30.0, max_s=10.0, rng=lambda: 1.0) == 30.0


@pytest.mark.parametrize(
    ("reply", "stops"),
    [
        (GREYLISTED, False),  # this recipient's problem: the next mail may go through
        (NO_SUCH_USER, False),
        (TOO_BIG, False),
        (BAD_LOGIN, True),  # the account's setup: every mail would fail the same way
        (TOO_MANY_CONNECTIONS, True),  # the relay asks us to slow down
        (connection_reply(ConnectionFailure.REFUSED, "Connection refused"), True),
    ],
    ids=["greylisted", "unknown-user", "too-big", "bad-login", "421", "refused"],
)
def test_only_the_accounts_own_problems_stop_the_batch(reply, stops):
    refused = {CAROL: reply} if reply.stage == Stage.RCPT else None
    decision = _decide(recipients=(CAROL,), reply=reply, refused=refused)
    assert stops_the_batch(decision) is stops


def _plan(**changes) -> DrainPlan:
    args = {
        "due_now": 0,
        "free_slots": 2,
        "batch_size": 50,
        "next_due_at": None,
        "paused_until": None,
        "now": T0,
        "countdown_max_s": 60.0,
    }
    args.update(changes)
    return plan_after_drain(**args)


def test_a_backlog_gets_one_continuation_per_batch_up_to_the_free_slots():
    assert _plan(due_now=1) == DrainPlan(continuations=1, timer_at=None)
    assert _plan(due_now=51) == DrainPlan(continuations=2, timer_at=None)
    assert _plan(due_now=5000) == DrainPlan(continuations=2, timer_at=None)
    assert _plan(due_now=5000, free_slots=0) == DrainPlan(continuations=0, timer_at=None)


def test_mail_due_soon_gets_a_timer_and_mail_due_later_is_left_to_the_sweeper():
    soon = T0 + timedelta(seconds=20)
    assert _plan(next_due_at=soon) == DrainPlan(continuations=0, timer_at=soon)
    assert _plan(next_due_at=T0 + timedelta(minutes=10)) == DrainPlan(0, None)
    assert _plan() == DrainPlan(0, None)


def test_a_paused_account_gets_no_continuation_only_a_timer_for_the_pause_end():
    end = T0 + timedelta(seconds=30)
    assert _plan(due_now=500, paused_until=end) == DrainPlan(continuations=0, timer_at=end)
    assert _plan(due_now=500, paused_until=T0 + timedelta(hours=1)) == DrainPlan(0, None)
    # A pause that is over is no pause.
    assert _plan(due_now=10, paused_until=T0 - timedelta(seconds=1)) == DrainPlan(1, None)
