"""Unit tests for the status events of an attempt (worker.events): pure, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.events import _queue_id, after_attempt, backup_event, refused_for_good
from worker.replies import Stage, classify, reply_from
from worker.store.models import EventType

NEXT = datetime(2025, 3, 1, 12, 5, tzinfo=UTC)
OK = classify(reply_from(250, "2.0.0 Ok: queued as 4F2A1B", Stage.DATA))
GREY = classify(reply_from(451, "4.7.1 greylisted, try again later", Stage.RCPT))
GONE = classify(reply_from(550, "5.1.1 no such user", Stage.RCPT))


def _types(drafts) -> list[str]:
    return [d.type.value for d in drafts]


def test_a_deferral_says_why_what_to_do_and_when_next():
    [event] = after_attempt(
        status="pending",
        channel="smtp",
        explanation=GREY,
        accepted=(),
        refusals={},
        next_attempt_at=NEXT,
        attempts=1,
    )
    assert event.type is EventType.DEFERRED
    assert event.data["code"] == 451 and event.data["enhanced"] == "4.7.1"
    assert event.data["verdict"] == GREY.verdict.value
    assert event.data["meaning"] == GREY.meaning and event.data["advice"] == GREY.advice
    assert event.data["next_attempt_at"] == NEXT.isoformat()
    assert event.data["attempts"] == 1


def test_a_partial_delivery_names_the_refused_recipient_then_the_sent_ones():
    drafts = after_attempt(
        status="sent",
        channel="smtp",
        explanation=OK,
        accepted=("ok@example.com",),
        refusals={"gone@example.com": GONE},
        next_attempt_at=None,
        attempts=1,
    )
    assert _types(drafts) == ["recipient_failed", "sent"]
    assert drafts[0].data["recipient"] == "gone@example.com"
    assert drafts[0].data["enhanced"] == "5.1.1"
    assert drafts[1].data["recipients"] == ["ok@example.com"]
    assert drafts[1].data["queue_id"] == "4F2A1B"


def test_a_refusal_of_everyone_is_a_recipient_failure_and_the_end():
    drafts = after_attempt(
        status="failed",
        channel="smtp",
        explanation=GONE,
        accepted=(),
        refusals={"gone@example.com": GONE},
        next_attempt_at=None,
        attempts=1,
    )
    assert _types(drafts) == ["recipient_failed", "failed"]


def test_every_draft_has_its_own_id():
    drafts = after_attempt(
        status="sent",
        channel="smtp",
        explanation=OK,
        accepted=("a@x.example",),
        refusals={"b@x.example": GONE},
        next_attempt_at=None,
        attempts=2,
    )
    assert len({d.event_id for d in drafts}) == 2


def test_queue_ids_are_read_from_the_usual_replies_only():
    assert _queue_id("2.0.0 Ok: queued as 4F2A1B") == "4F2A1B"
    assert _queue_id("OK queued as <abc123>.") == "abc123"
    assert _queue_id("2.0.0 OK 1700000000 x12si") is None
    assert _queue_id(None) is None


def test_a_backup_event_names_its_channel():
    event = backup_event(EventType.SENT, "sendgrid: accepted", code=202, queue_id="sg-1")
    assert event.data == {
        "channel": "backup",
        "server_text": "sendgrid: accepted",
        "code": 202,
        "queue_id": "sg-1",
    }


def test_only_new_refusals_for_good_become_recipient_failures():
    unknown = classify(reply_from(550, "5.1.1 no such user"), Stage.RCPT)
    grey = classify(reply_from(450, "4.2.0 greylisted"), Stage.RCPT)
    refusals = {"gone@x.org": unknown, "grey@x.org": grey, "told@x.org": unknown}
    settled = {
        "gone@x.org": {"outcome": "refused"},
        "grey@x.org": {"outcome": "deferred"},  # a deferral: tried again later
        "told@x.org": {"outcome": "refused"},
    }
    before = {"told@x.org": {"outcome": "refused"}}  # an earlier attempt reported it
    assert refused_for_good(refusals, settled, before) == {"gone@x.org": unknown}
