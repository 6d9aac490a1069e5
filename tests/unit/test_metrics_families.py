"""The exporter's pure parts: at most N accounts per metric, the rest as `_other`, and the
families built from one database snapshot (no database here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.cardinality import OTHER, split_top, top_accounts
from worker.metrics import SERVED, families
from worker.store.metrics import MetricsSnapshot, OpenIncident, PendingGroup, TaskRun

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_the_largest_are_named_and_the_rest_summed() -> None:
    values = {"a": 5.0, "b": 9.0, "c": 1.0, "d": 5.0}
    assert top_accounts(values, limit=2) == {"b": 9.0, "a": 5.0, OTHER: 6.0}  # tie: by name
    assert top_accounts(values, limit=2, rest=max) == {"b": 9.0, "a": 5.0, OTHER: 5.0}
    assert top_accounts(values, limit=10) == values
    assert top_accounts(values, limit=0) == {OTHER: 20.0}
    assert top_accounts({}, limit=3) == {}
    assert split_top(values, limit=1) == (["b"], ["a", "d", "c"])


def _snapshot(**changes: object) -> MetricsSnapshot:
    base = {
        "taken_at": NOW,
        "accounts": 3,
        "pending": [
            PendingGroup("acme", "none", 2, NOW - timedelta(seconds=30)),
            PendingGroup("acme", "retry", 1, NOW - timedelta(hours=2)),
            PendingGroup("beta", "account", 4, NOW - timedelta(minutes=5)),
            PendingGroup("gamma", "none", 1, NOW + timedelta(days=1)),  # scheduled
        ],
        "finished": {("sent", "smtp"): 7, ("sent", "none"): 1},
        "attempts": {("smtp", "sent", "ok"): 7},
        "incidents": [
            OpenIncident("beta", NOW - timedelta(hours=5)),
            OpenIncident("gamma", NOW - timedelta(hours=1)),
            OpenIncident("delta", NOW - timedelta(hours=3)),
        ],
        "slots_in_use": {"acme": 2},
        "drains_waiting": 1,
        "past_grace": 0,
        "last_sweep": TaskRun(NOW - timedelta(seconds=20), NOW - timedelta(seconds=19)),
    }
    base.update(changes)
    return MetricsSnapshot(**base)  # type: ignore[arg-type]


def _samples(snapshot: MetricsSnapshot, limit: int) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in families(snapshot, max_accounts=limit):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_one_snapshot_becomes_every_served_family() -> None:
    samples = _samples(_snapshot(), limit=10)
    assert set(samples) | {"outbox_up", "outbox_scrape_duration_seconds"} == SERVED
    assert samples["outbox_messages_pending"] == {
        (("account", "acme"),): 3,
        (("account", "beta"),): 4,
        (("account", "gamma"),): 1,
    }
    assert samples["outbox_oldest_pending_seconds"] == {
        (("account", "acme"),): 7200,
        (("account", "beta"),): 300,
        (("account", "gamma"),): 0,  # not due yet: not late
    }
    verdicts = {k[0][1]: v for k, v in samples["outbox_messages_pending_by_verdict"].items()}
    assert verdicts == {"none": 3, "retry": 1, "account": 4, "recipient": 0, "message": 0}
    # The usual series are there at zero; an unusual one that occurred is there too.
    assert samples["outbox_messages_finished_total"] == {
        (("channel", "smtp"), ("status", "sent")): 7,
        (("channel", "backup"), ("status", "sent")): 0,
        (("channel", "none"), ("status", "failed")): 0,
        (("channel", "none"), ("status", "cancelled")): 0,
        (("channel", "none"), ("status", "sent")): 1,
    }
    assert samples["outbox_sweeper_last_run_timestamp_seconds"] == {
        (): (NOW - timedelta(seconds=19)).timestamp()
    }
    assert samples["outbox_sweeper_last_run_duration_seconds"] == {(): 1.0}


def test_the_longest_open_incidents_are_named_the_others_counted() -> None:
    samples = _samples(_snapshot(), limit=1)
    assert samples["outbox_incidents_open"] == {(("account", "beta"),): 1, (("account", OTHER),): 2}
    assert samples["outbox_incident_open_seconds"] == {
        (("account", "beta"),): 5 * 3600,
        (("account", OTHER),): 3 * 3600,
    }
    assert samples["outbox_messages_pending"] == {
        (("account", "beta"),): 4,
        (("account", OTHER),): 4,
    }
    assert samples["outbox_oldest_pending_seconds"] == {
        (("account", "acme"),): 7200,
        (("account", OTHER),): 300,
    }


def test_no_sweep_on_record_means_no_sweeper_series() -> None:
    samples = _samples(_snapshot(last_sweep=None), limit=10)
    assert "outbox_sweeper_last_run_timestamp_seconds" not in samples
    assert "outbox_sweeper_last_run_duration_seconds" not in samples
