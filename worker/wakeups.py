"""Waking an account's drain: at most one wake-up in the broker per account, not one per email.

Whoever makes an account's mail due calls `Wakeups.mail_due` after committing (an
operator's retry, a settings change), or `requested` inside the transaction that stores
the mail and `publish` after it (intake: one commit for both). The account's flags and
slots (store.drains) say whether a drain is already on its way or running; only if none
is, a wake-up is published. Publishing is
passed in (`Publish`): inside a worker it is the drain task itself, elsewhere a producer
that sends `outbox.drain` by name, with none of the worker's code. A publish that fails
is logged and left to the sweeper: the mail is already safe in the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from worker.clock import Clock, utcnow
from worker.decide import broker_countdown
from worker.store import drains
from worker.store.db import Database

log = logging.getLogger("outbox.wakeups")

#: Publish a drain of the account, after `countdown_s` seconds (None: now).
Publish = Callable[[int, float | None], None]


@dataclass(frozen=True)
class WakeUp:
    """A drain of the account to publish: now (`countdown_s` None) or after a countdown."""

    account_id: int
    countdown_s: float | None


class Wakeups:
    """Coalesced drain wake-ups for accounts whose mail became due."""

    def __init__(
        self,
        db: Database,
        publish: Publish,
        *,
        grace_s: float,
        countdown_max_s: float,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.publisher = publish
        self.grace_s = grace_s
        self.countdown_max_s = countdown_max_s
        self.clock = clock

    def mail_due(self, account_id: int, at: datetime | None = None) -> bool:
        """Mail of the account is due at `at` (default now): make sure a drain runs then.

        Returns whether a wake-up was published. Mail due further ahead than
        `OUTBOX_COUNTDOWN_MAX` publishes nothing: the sweeper wakes the account then.
        """
        return self.accounts_due([(account_id, at)]) > 0

    def accounts_due(self, due: Iterable[tuple[int, datetime | None]]) -> int:
        """`mail_due` for each (account, when) once, the earliest time per account;
        returns how many wake-ups were published."""
        with self.db.session() as session:
            wanted = self.requested(session, due)
        return self.publish(wanted)

    def requested(
        self, session: Session, due: Iterable[tuple[int, datetime | None]]
    ) -> list[WakeUp]:
        """In the caller's transaction (the one that made the mail due, or one after it):
        the wake-ups to publish once it commits, at most one per account.

        The accounts are locked in id order, so two of these never deadlock.
        """
        now = self.clock()
        wanted: list[WakeUp] = []
        for account_id, at in sorted(_earliest(due).items()):
            countdown: float | None = None
            if at is not None and at > now + timedelta(seconds=1.0):
                countdown = broker_countdown(
                    (at - now).total_seconds(), countdown_max_s=self.countdown_max_s
                )
                if countdown is None:
                    continue
            if drains.request_drain(session, account_id, now=now, at=at, stale_s=self.grace_s):
                wanted.append(WakeUp(account_id, countdown))
        return wanted

    def publish(self, wanted: Iterable[WakeUp]) -> int:
        """Publish wake-ups `requested` returned, after their transaction committed; a
        failure is logged and left to the sweeper. Returns how many went out."""
        published = 0
        for wake in wanted:
            try:
                self.publisher(wake.account_id, wake.countdown_s)
            except Exception:
                log.warning(
                    "the wake-up of account %s could not be published; the sweeper will wake it",
                    wake.account_id,
                    exc_info=True,
                )
                continue
            published += 1
        return published


def _earliest(due: Iterable[tuple[int, datetime | None]]) -> dict[int, datetime | None]:
    """The earliest time each account's mail is due (None, now, beats any time)."""
    earliest: dict[int, datetime | None] = {}
    for account_id, at in due:
        if account_id not in earliest:
            earliest[account_id] = at
        else:
            known = earliest[account_id]
            if known is not None and (at is None or at < known):
                earliest[account_id] = at
    return earliest
