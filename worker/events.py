"""What a sender is told after each change: the status events of an attempt, pure.

The engine turns its decision into these drafts; the store writes them in the same
statement or transaction as the change (worker.store.events), so they can never
describe a change that did not happen. Field names are the event schema's (README).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from worker.replies import Explanation
from worker.store.events import EventDraft
from worker.store.models import EventType


def _why(explanation: Explanation) -> dict[str, Any]:
    reply = explanation.reply
    return {
        "verdict": explanation.verdict.value,
        "code": reply.code,
        "enhanced": reply.enhanced,
        "server_text": (reply.text or str(reply))[:1000],
        "meaning": explanation.meaning,
        "advice": explanation.advice,
    }


def after_attempt(
    *,
    status: str,
    channel: str,
    explanation: Explanation,
    accepted: tuple[str, ...] | list[str],
    refusals: Mapping[str, Explanation],
    next_attempt_at: datetime | None,
    attempts: int,
    queue_id: str | None = None,
) -> tuple[EventDraft, ...]:
    """The events of one attempt: who was refused for good, then the message's news —
    `sent` (some recipients took it now), `failed` (it ended), or `deferred`."""
    drafts = [
        EventDraft(EventType.RECIPIENT_FAILED, {"recipient": rcpt, **_why(why)})
        for rcpt, why in refusals.items()
    ]
    if accepted:
        reply = explanation.reply
        drafts.append(
            EventDraft(
                EventType.SENT,
                {
                    "channel": channel,
                    "code": reply.code,
                    "server_text": (reply.text or str(reply))[:1000],
                    "queue_id": queue_id if queue_id is not None else _queue_id(reply.text),
                    "recipients": list(accepted),
                    "attempts": attempts,
                },
            )
        )
    if status == "failed":
        drafts.append(EventDraft(EventType.FAILED, {"channel": channel, **_why(explanation)}))
    elif status == "pending":
        drafts.append(
            EventDraft(
                EventType.DEFERRED,
                {
                    "channel": channel,
                    **_why(explanation),
                    "next_attempt_at": next_attempt_at.isoformat() if next_attempt_at else None,
                    "attempts": attempts,
                },
            )
        )
    return tuple(drafts)


def refused_for_good(
    refusals: Mapping[str, Explanation],
    settled: Mapping[str, Mapping[str, Any]],
    settled_before: Mapping[str, Mapping[str, Any]],
) -> dict[str, Explanation]:
    """The recipients this attempt refused for good, each told once: a refusal that is
    only a deferral (a greylisted RCPT) is not one, nor one an earlier attempt reported."""
    return {
        rcpt: why
        for rcpt, why in refusals.items()
        if settled.get(rcpt, {}).get("outcome") == "refused"
        and settled_before.get(rcpt, {}).get("outcome") != "refused"
    }


def _queue_id(text: str | None) -> str | None:
    """The server's queue id from a 250 reply ("2.0.0 Ok: queued as 4F2A1B"), if it says."""
    if not text:
        return None
    marker = "queued as "
    at = text.lower().find(marker)
    if at < 0:
        return None
    word = text[at + len(marker) :].split()
    return word[0].strip("<>.,;") if word else None


def ended(type_: EventType, reason: str, **fields: Any) -> EventDraft:
    """A message ended without an attempt of its own: cancelled, or its window ran out."""
    return EventDraft(type_, {"reason": reason, **fields})


def backup_event(type_: EventType, server_text: str, **fields: Any) -> EventDraft:
    """An event of the backup provider's channel: its HTTP status as `code`, its answer
    as `server_text`."""
    return EventDraft(type_, {"channel": "backup", "server_text": server_text[:1000], **fields})
