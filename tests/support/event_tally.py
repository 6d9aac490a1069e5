"""Counting status events at a webhook as the tallies count mail: every event written
arrived, none that was not, a duplicate only as an exact copy (same id, same body), and
each message's events first arrived in their order."""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from standins.services import wait_until

#: The events secret of the fault and load suites and `make bench` (the receiver checks
#: every signature).
EVENTS_SECRET = "whsec_" + base64.b64encode(b"fault-suite-events-secret").decode()


def webhook_settings(url: str) -> dict[str, str]:
    """A global signed webhook for every account's events, on loopback."""
    return {
        "OUTBOX_EVENTS_WEBHOOK": url,
        "OUTBOX_EVENTS_SECRET": EVENTS_SECRET,
        "OUTBOX_EVENTS_ALLOW_PRIVATE": "1",
    }


@dataclass
class EventTally:
    written: int
    #: Events in the posts answered 2xx, copies included; `distinct`: their ids.
    received: int
    distinct: int
    unverified_posts: int
    lost: set[str] = field(default_factory=set)
    strangers: set[str] = field(default_factory=set)
    #: Repeats of an event id whose body differs from its first copy.
    differing: list[dict[str, Any]] = field(default_factory=list)
    #: message id -> its events' seq in first-arrival order, where not ascending.
    out_of_order: dict[int, list[int]] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.received - self.distinct

    @property
    def ok(self) -> bool:
        return not (self.lost or self.strangers or self.differing or self.out_of_order) and (
            self.unverified_posts == 0
        )

    def summary(self) -> str:
        return (
            f"{self.written:,} events written, {self.received:,} received "
            f"({self.duplicates} duplicates), {len(self.lost)} lost, "
            f"{len(self.strangers)} strangers, {len(self.out_of_order)} out of order"
        )


def written_events(db: Any) -> dict[str, int]:
    """Every event in the table: its id -> its message."""
    with db.session() as session:
        return dict(session.execute(text("SELECT event_id, message_id FROM events")).all())


def tally_webhook(db: Any, receiver: Any, *, timeout: float = 120.0) -> EventTally:
    """Once the receiver has every event the table holds (or the timeout is over)."""
    written = written_events(db)
    with contextlib.suppress(TimeoutError):  # what did not come is counted as lost
        wait_until(
            lambda: len({e["id"] for e in receiver.accepted_events()}) >= len(written),
            timeout=timeout,
            interval=0.5,
            message=f"the webhook to get all {len(written):,} events",
        )
    received = receiver.accepted_events()
    first: dict[str, dict[str, Any]] = {}
    tally = EventTally(
        written=len(written),
        received=len(received),
        distinct=len({e["id"] for e in received}),
        unverified_posts=sum(1 for p in receiver.posts if not p["verified"]),
    )
    for event in received:
        if event["id"] in first and event != first[event["id"]]:
            tally.differing.append(event)
        first.setdefault(event["id"], event)
    tally.lost = set(written) - set(first)
    tally.strangers = {i for i, e in first.items() if written.get(i) != e["message_id"]}
    seqs: dict[int, list[int]] = {}
    for event in first.values():  # dicts keep insertion order: the order of first arrival
        seqs.setdefault(event["message_id"], []).append(event["seq"])
    tally.out_of_order = {m: s for m, s in seqs.items() if s != sorted(s)}
    return tally
