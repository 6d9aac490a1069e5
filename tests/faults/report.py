"""Reliability figures: the fault and load tests append results; this renders them.

Each test appends one JSON object per scenario to ``var/reliability/results.jsonl``
(``OUTBOX_RELIABILITY_REPORT`` overrides the path). ``python -m tests.faults.report``
prints a Markdown table of the latest result of each scenario, for the README:

    python -m tests.faults.report            # latest run of each scenario
    python -m tests.faults.report --all      # every recorded run
    python -m tests.faults.report --path other.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO / "var" / "reliability" / "results.jsonl"

COLUMNS = (
    "Scenario",
    "Messages",
    "Faults injected",
    "Lost",
    "Duplicates",
    "Refusals",
    "Webhook events lost / copies",
    "Duration",
)


def report_path() -> Path:
    raw = os.environ.get("OUTBOX_RELIABILITY_REPORT", "").strip()
    return Path(raw) if raw else DEFAULT_PATH


def record(
    scenario: str,
    *,
    messages: int,
    faults: str,
    lost: int,
    duplicates: int,
    refusals: int,
    duration_s: float,
    note: str = "",
    path: Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Append one scenario's figures; returns what was written.

    ``refusals``: messages that ended failed with a reason (refused for good by the
    server, or given up on by the backup) — honest endings, not losses. ``note`` is a
    sentence explaining the duplicates (which documented window they fall in).
    """
    entry: dict[str, Any] = {
        "scenario": scenario,
        "messages": messages,
        "faults": faults,
        "lost": lost,
        "duplicates": duplicates,
        "refusals": refusals,
        "duration_s": round(duration_s, 1),
        "note": note,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    target = path or report_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as out:
        out.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    return entry


def load(path: Path | None = None) -> list[dict[str, Any]]:
    target = path or report_path()
    if not target.exists():
        return []
    entries = []
    for line in target.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by an interrupted run
    return entries


def latest(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last entry of each scenario, in the order scenarios first appeared."""
    entries = list(entries)
    order: dict[str, int] = {}
    last: dict[str, dict[str, Any]] = {}
    for entry in entries:
        order.setdefault(entry["scenario"], len(order))
        last[entry["scenario"]] = entry
    return sorted(last.values(), key=lambda e: order[e["scenario"]])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _events(entry: dict[str, Any]) -> str:
    """Webhook events lost and extra copies (same id), where the scenario counted them."""
    if "events_lost" not in entry:
        return "—"
    return f"{entry['events_lost']} / {entry.get('event_duplicates', 0)}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(entries: list[dict[str, Any]]) -> str:
    """A Markdown table, with the duplicate explanations as numbered notes below it."""
    if not entries:
        return "_No reliability results recorded yet: run `make test-slow`._\n"
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---", "---:", "---", "---:", "---:", "---:", "---:", "---:"]) + "|",
    ]
    notes: list[str] = []  # each distinct explanation once, numbered in order
    for entry in entries:
        duplicates = str(entry.get("duplicates", 0))
        if entry.get("note"):
            if entry["note"] not in notes:
                notes.append(entry["note"])
            duplicates += f" [{notes.index(entry['note']) + 1}]"
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    entry["scenario"],
                    f"{entry.get('messages', 0):,}",
                    entry.get("faults", ""),
                    entry.get("lost", 0),
                    duplicates,
                    entry.get("refusals", 0),
                    _events(entry),
                    _duration(float(entry.get("duration_s", 0.0))),
                )
            )
            + " |"
        )
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n" + "\n".join(f"[{i}] {_cell(n)}" for i, n in enumerate(notes, 1)) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the reliability results as Markdown.")
    parser.add_argument("--path", type=Path, default=None, help="results file (JSON lines)")
    parser.add_argument("--all", action="store_true", help="every run, not only the latest")
    args = parser.parse_args(argv)
    entries = load(args.path)
    sys.stdout.write(render(entries if args.all else latest(entries)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
