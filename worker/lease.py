"""Keeping a running drain's lease alive, so the lease itself can be short.

A drain leases the batch of messages it is sending and holds one of the account's
connection slots; if its worker dies, both expire and the sweeper gives the mail to the
other workers. The shorter the lease, the sooner that happens, but a lease shorter than a
slow send would let a second worker take mail that is still on the wire. So leases are
short (`OUTBOX_LEASE`, 30 s by default) and renewed: a thread in each worker process
extends the leases of the drains running there every third of a lease, whatever the drain
itself is blocked on (a slow server, a long DATA). A dead process renews nothing.

A drain asks `Lease.may_send` before each message: not when the last renewal is too old
(the database was unreachable; the sweeper may free the mail when the lease ends) or the
sweeper already freed that message.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from worker.clock import Clock, utcnow
from worker.store import drains
from worker.store.db import Database

log = logging.getLogger("outbox.lease")


@dataclass
class Lease:
    """One drain's hold on its batch and its connection slot."""

    token: str
    account_id: int
    holder: str
    #: Until when the lease is known to hold (the claim's, then each renewal's).
    valid_until: datetime
    #: The messages still held as of the last renewal (None: not renewed yet).
    held: set[int] | None = None
    #: The sweeper took the connection slot back (the lease ran out once).
    slot_lost: bool = False
    #: The message whose send is done but not recorded yet: the server may have its 250.
    #: If the drain fails here, this one is not given back: it stays leased until the
    #: sweeper records it as interrupted (the one duplicate window), never resent at once.
    in_doubt: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def may_send(self, message_id: int, *, now: datetime, margin_s: float) -> bool:
        """Is this message still ours, with time to spare for a send and its record?"""
        with self._lock:
            if self.slot_lost or now + timedelta(seconds=margin_s) >= self.valid_until:
                return False
            return self.held is None or message_id in self.held

    def seconds_left(self, now: datetime) -> float:
        with self._lock:
            return (self.valid_until - now).total_seconds()

    def renewed(self, until: datetime, held: set[int], slot_held: bool) -> None:
        with self._lock:
            self.valid_until = until
            self.held = held
            self.slot_lost = self.slot_lost or not slot_held

    def claimed(self, until: datetime, message_ids: list[int]) -> None:
        """A new batch was claimed under this lease, valid until `until`."""
        with self._lock:
            self.valid_until = min(self.valid_until, until)
            if self.held is not None:
                self.held |= set(message_ids)


class LeaseKeeper:
    """Renews the leases of this process's running drains from a background thread."""

    def __init__(self, db: Database, *, lease_s: float, clock: Clock = utcnow) -> None:
        self.db = db
        self.lease_s = lease_s
        self.clock = clock
        self.interval_s = lease_s / 3
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, *, token: str, account_id: int, holder: str, until: datetime) -> Lease:
        lease = Lease(token=token, account_id=account_id, holder=holder, valid_until=until)
        with self._lock:
            self._leases[token] = lease
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="outbox-lease-keeper", daemon=True
                )
                self._thread.start()
        return lease

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.token, None)

    def renew_all(self) -> None:
        """Renew every lease held now (what the thread does every `interval_s`)."""
        with self._lock:
            leases = list(self._leases.values())
        for lease in leases:
            until = self.clock() + timedelta(seconds=self.lease_s)
            try:
                with self.db.session() as session:
                    held, slot_held = drains.renew_lease(
                        session,
                        token=lease.token,
                        account_id=lease.account_id,
                        holder=lease.holder,
                        until=until,
                    )
            except Exception:  # the database is away: the drain stops when the lease ends
                log.warning("could not renew the lease of a drain of account %s", lease.account_id)
                continue
            lease.renewed(until, held, slot_held)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew_all()
            except Exception:  # never let the keeper die
                log.exception("lease keeper failed; retrying")
