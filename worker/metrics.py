"""The Prometheus exporter (`outbox metrics`): every scrape reads one snapshot of the
database (`worker.store.metrics`) and reports it; nothing is kept in the process, so any
number of exporters agree and a restarted one loses nothing.

A scrape that cannot read the database answers all the same, with `outbox_up 0`, so
Prometheus tells "the database is unreachable" apart from "the exporter is gone".
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.cardinality import OTHER, split_top, top_accounts
from worker.clock import Clock, utcnow
from worker.replies import Verdict
from worker.store.db import Database
from worker.store.metrics import (
    NONE,
    MetricsSnapshot,
    fold_counters,
    read_snapshot,
    snapshot_session,
)
from worker.store.models import Channel, MessageStatus

log = logging.getLogger(__name__)

#: Series every scrape reports even at zero, so `rate()` and alerts have them from the
#: start: (status, channel) of finished mail.
FINISHED_SERIES = (
    (MessageStatus.SENT.value, Channel.SMTP.value),
    (MessageStatus.SENT.value, Channel.BACKUP.value),
    (MessageStatus.FAILED.value, NONE),
    (MessageStatus.CANCELLED.value, NONE),
)
#: Last verdicts pending mail can carry ("none": not tried yet, or no verdict).
PENDING_VERDICTS = (NONE, *(v.value for v in Verdict if v is not Verdict.OK))


#: Every sample name a scrape can carry (the sweeper's only once it has run): the alert
#: rules and the dashboard under deploy/ may name only these (tests check both).
SERVED = frozenset(
    {
        "outbox_up",
        "outbox_scrape_duration_seconds",
        "outbox_accounts",
        "outbox_messages_pending",
        "outbox_messages_pending_by_verdict",
        "outbox_oldest_pending_seconds",
        "outbox_messages_finished_total",
        "outbox_attempts_total",
        "outbox_incidents_open",
        "outbox_incident_open_seconds",
        "outbox_smtp_slots_in_use",
        "outbox_drains_waiting",
        "outbox_messages_past_grace",
        "outbox_sweeper_last_run_timestamp_seconds",
        "outbox_sweeper_last_run_duration_seconds",
    }
)


@dataclass(frozen=True)
class MetricsConfig:
    #: Accounts named per account-labelled metric (`worker.cardinality`).
    max_accounts: int = 200
    #: How old a finish or an attempt must be before a fold moves it into its counter's
    #: tally: longer than any worker takes to commit a record (twice the lease).
    settle_s: float = 120.0
    #: `OUTBOX_WAKE_GRACE`: when a queued drain flag is stale and pending mail overdue.
    wake_grace_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Any) -> MetricsConfig:
        return cls(
            max_accounts=settings.metrics_max_accounts,
            settle_s=max(120.0, 2 * settings.lease_s),
            wake_grace_s=settings.wake_grace_s,
        )


def _gauge_by_account(
    name: str, documentation: str, values: dict[str, float], *, limit: int, rest: Any = sum
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["account"])
    for account, value in top_accounts(values, limit=limit, rest=rest).items():
        family.add_metric([account], value)
    return family


def families(snapshot: MetricsSnapshot, *, max_accounts: int) -> list[Metric]:
    """The metric families of one snapshot (without `outbox_up` and the scrape time)."""
    now = snapshot.taken_at
    limit = max_accounts

    pending: dict[str, float] = {}
    oldest: dict[str, datetime] = {}
    by_verdict: dict[str, float] = dict.fromkeys(PENDING_VERDICTS, 0)
    for group in snapshot.pending:
        pending[group.account] = pending.get(group.account, 0) + group.count
        by_verdict[group.verdict] = by_verdict.get(group.verdict, 0) + group.count
        if group.account not in oldest or group.oldest_start < oldest[group.account]:
            oldest[group.account] = group.oldest_start
    ages = {a: max(0.0, (now - start).total_seconds()) for a, start in oldest.items()}

    verdicts = GaugeMetricFamily(
        "outbox_messages_pending_by_verdict",
        "Pending messages by the verdict of their last failed attempt (none: not tried yet).",
        labels=["verdict"],
    )
    for verdict, count in sorted(by_verdict.items()):
        verdicts.add_metric([verdict], count)

    finished = CounterMetricFamily(
        "outbox_messages_finished",
        "Messages that reached a final status, by status and delivering channel (none unless "
        "sent). Counts events: purge does not lower it, a retried failure stays counted.",
        labels=["status", "channel"],
    )
    for key in sorted({*FINISHED_SERIES, *snapshot.finished}):
        finished.add_metric(list(key), snapshot.finished.get(key, 0))

    attempts = CounterMetricFamily(
        "outbox_attempts",
        "Delivery attempts by channel, outcome and verdict of the reply (none: no SMTP reply).",
        labels=["channel", "outcome", "verdict"],
    )
    for attempt_key, count in sorted(snapshot.attempts.items()):
        attempts.add_metric(list(attempt_key), count)

    incident_ages = {
        i.account: max(0.0, (now - i.opened_at).total_seconds()) for i in snapshot.incidents
    }
    # Both incident families name the longest open ones.
    named, others = split_top(incident_ages, limit=limit)
    open_incidents = GaugeMetricFamily(
        "outbox_incidents_open",
        "Open incidents (an account's SMTP setup is broken): 1 per account named, the "
        "number of the others for _other.",
        labels=["account"],
    )
    for account in named:
        open_incidents.add_metric([account], 1)
    if others:
        open_incidents.add_metric([OTHER], len(others))

    out: list[Metric] = [
        GaugeMetricFamily("outbox_accounts", "Accounts configured.", value=snapshot.accounts),
        _gauge_by_account(
            "outbox_messages_pending",
            "Pending messages (accepted, not yet delivered or ended).",
            pending,
            limit=limit,
        ),
        verdicts,
        _gauge_by_account(
            "outbox_oldest_pending_seconds",
            "Age of the account's oldest pending message, from when it was first meant to go "
            "out (its send_at, else its arrival).",
            ages,
            limit=limit,
            rest=max,
        ),
        finished,
        attempts,
        open_incidents,
        _gauge_by_account(
            "outbox_incident_open_seconds",
            "How long the account's open incident has been open.",
            incident_ages,
            limit=limit,
            rest=max,
        ),
        _gauge_by_account(
            "outbox_smtp_slots_in_use",
            "SMTP connection slots with a live holder: drains running (or their connection "
            "kept open for reuse).",
            {a: float(n) for a, n in snapshot.slots_in_use.items()},
            limit=limit,
        ),
        GaugeMetricFamily(
            "outbox_drains_waiting",
            "Accounts whose drain wake-up is queued and not yet taken by a drain.",
            value=snapshot.drains_waiting,
        ),
        GaugeMetricFamily(
            "outbox_messages_past_grace",
            "Pending messages the sweeper should have looked at more than OUTBOX_WAKE_GRACE "
            "ago: a sweeper that is not running, or not keeping up.",
            value=snapshot.past_grace,
        ),
    ]
    if snapshot.last_sweep is not None:
        run = snapshot.last_sweep
        out.append(
            GaugeMetricFamily(
                "outbox_sweeper_last_run_timestamp_seconds",
                "When the sweeper last finished a run (Unix time).",
                value=run.finished_at.timestamp(),
            )
        )
        out.append(
            GaugeMetricFamily(
                "outbox_sweeper_last_run_duration_seconds",
                "How long the sweeper's last completed run took.",
                value=max(0.0, (run.finished_at - run.started_at).total_seconds()),
            )
        )
    return out


class OutboxCollector(Collector):
    """Reads the database at every scrape: folds the counters, then one snapshot."""

    def __init__(
        self,
        db: Database,
        config: MetricsConfig,
        *,
        clock: Clock = utcnow,
        perf_counter: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.perf_counter = perf_counter

    def describe(self) -> list[Metric]:
        # Registering must not read the database (the registry calls collect() otherwise).
        return []

    def fold(self) -> None:
        """Move settled finishes and attempts into the counters' tallies. A failure here
        (a read-only replica, a lock timeout) only makes this scrape read more rows."""
        try:
            with self.db.session() as session:
                fold_counters(session, now=self.clock(), settle_s=self.config.settle_s)
        except Exception as exc:
            log.warning("could not fold the counters (%s); reading without", exc)

    def snapshot(self) -> MetricsSnapshot:
        self.fold()
        with snapshot_session(self.db) as session:
            return read_snapshot(
                session,
                now=self.clock(),
                wake_grace_s=self.config.wake_grace_s,
                drain_fresh_s=self.config.wake_grace_s,
            )

    def collect(self) -> Iterator[Metric]:
        started = self.perf_counter()
        try:
            metrics = families(self.snapshot(), max_accounts=self.config.max_accounts)
            up = 1
        except Exception:
            log.exception("scrape failed: could not read the database")
            metrics, up = [], 0
        yield from metrics
        yield GaugeMetricFamily(
            "outbox_up", "1 if this scrape could read Outbox's database, else 0.", value=up
        )
        yield GaugeMetricFamily(
            "outbox_scrape_duration_seconds",
            "How long this scrape took to read the database.",
            value=self.perf_counter() - started,
        )


def registry_for(collector: OutboxCollector) -> CollectorRegistry:
    """A registry with Outbox's metrics alone (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def serve(
    collector: OutboxCollector,
    *,
    host: str,
    port: int,
    announce: Callable[[str], None],
) -> None:
    """Serve /metrics until SIGTERM or SIGINT. Port 0 takes a free one; `announce` is told
    the address actually listened on."""
    server, thread = start_http_server(port, addr=host, registry=registry_for(collector))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    shown = f"[{host}]" if ":" in host else host
    announce(f"Outbox metrics on http://{shown}:{server.server_port}/metrics")
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
    collector.db.dispose()
