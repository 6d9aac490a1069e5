"""Waking an account's drain: at most one wake-up in the broker per account, not one per email.

Whoever makes an account's mail due (intake, an operator's retry, a settings change)
calls `Wakeups.mail_due` after committing; the account's flags (store.drains) say whether
a wake-up is already on its way, and only if none is, one is published. Publishing is
passed in (`Publish`): inside a worker it is the drain task itself, elsewhere a producer
that sends `outbox.drain` by name, with none of the worker's code. A publish that fails
is logged and left to the sweeper: the mail is already safe in the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from worker.clock import Clock, utcnow
from worker.decide import broker_countdown
from worker.store import drains
from worker.store.db import Database

log = logging.getLogger("outbox.wakeups")

#: Publish a drain of the account, after `countdown_s` seconds (None: now).
Publish = Callable[[int, float | None], None]


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
        self.publish = publish
        self.grace_s = grace_s
        self.countdown_max_s = countdown_max_s
        self.clock = clock

    def mail_due(self, account_id: int, at: datetime | None = None) -> bool:
        """Mail of the account is due at `at` (default now): make sure a drain runs then.

        Returns whether a wake-up was published. Mail due further ahead than
        `OUTBOX_COUNTDOWN_MAX` publishes nothing: the sweeper wakes the account then.
        """
        now = self.clock()
        countdown: float | None = None
        if at is not None and at > now + timedelta(seconds=1.0):
            countdown = broker_countdown(
                (at - now).total_seconds(), countdown_max_s=self.countdown_max_s
            )
            if countdown is None:
                return False
        with self.db.session(single_statement=True) as session:
            needed = drains.request_drain(session, account_id, now=now, at=at, stale_s=self.grace_s)
        if not needed:
            return False
        try:
            self.publish(account_id, countdown)
        except Exception:
            log.warning(
                "the wake-up of account %s could not be published; the sweeper will wake it",
                account_id,
                exc_info=True,
            )
            return False
        return True

    def accounts_due(self, due: Iterable[tuple[int, datetime | None]]) -> int:
        """`mail_due` for each (account, when) once, the earliest time per account;
        returns how many wake-ups were published."""
        earliest: dict[int, datetime | None] = {}
        for account_id, at in due:
            if account_id not in earliest:
                earliest[account_id] = at
            else:
                known = earliest[account_id]
                if known is not None and (at is None or at < known):
                    earliest[account_id] = at
        return sum(self.mail_due(account_id, at) for account_id, at in earliest.items())
