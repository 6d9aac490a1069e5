"""The reliability report: what the tests append, and the Markdown the README gets."""

from __future__ import annotations

from tests.faults import report


def test_latest_result_of_each_scenario_in_first_seen_order(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    monkeypatch.setenv("OUTBOX_RELIABILITY_REPORT", str(path))
    common = {"faults": "f", "lost": 0, "refusals": 0}
    report.record("A", messages=1, duplicates=0, duration_s=1.0, **common)
    report.record("B", messages=2, duplicates=1, duration_s=75.4, note="window", **common)
    report.record(
        "A",
        messages=3,
        duplicates=1,
        duration_s=125.6,
        note="window",
        events_lost=0,
        event_duplicates=2,
        **common,
    )
    path.open("a").write("{not json\n")  # a line cut short by an interrupted run
    entries = report.latest(report.load())
    assert [(e["scenario"], e["messages"]) for e in entries] == [("A", 3), ("B", 2)]
    table = report.render(entries)
    assert table.splitlines()[0].startswith("| Scenario | Messages | Faults injected |")
    assert "| A | 3 | f | 0 | 1 [1] | 0 | 0 / 2 | 2 min 06 s |" in table
    # One note, one number; no webhook counted in B.
    assert "| B | 2 | f | 0 | 1 [1] | 0 | — | 75.4 s |" in table
    assert table.rstrip().endswith("[1] window")


def test_no_results_yet(tmp_path):
    assert "No reliability results" in report.render(report.latest([]))
    assert report.load(tmp_path / "missing.jsonl") == []
