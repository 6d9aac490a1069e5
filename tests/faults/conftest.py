"""Fault-injection and load tests: real workers, real PostgreSQL and Redis, real SMTP.

Run with ``pytest -q tests/faults`` (``make test-slow``). The figures each scenario
records go to ``var/reliability/results.jsonl`` (``OUTBOX_RELIABILITY_REPORT``) and are
printed at the end of the run; ``python -m tests.faults.report`` renders them.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults import report

#: Time compressed for fault tests: short lease so dead workers are noticed in seconds,
#: a window long enough that nothing reaches the backup unless a test wants it to.
FAULT_SETTINGS = {
    "OUTBOX_RETRY_WINDOW": "600",
    "OUTBOX_RETRY_BASE": "0.2",
    "OUTBOX_RETRY_MAX": "1",
    "OUTBOX_SWEEP_INTERVAL": "1",
    "OUTBOX_WAKE_GRACE": "2",
    "OUTBOX_SMTP_TIMEOUT": "1",
    "OUTBOX_LEASE": "6",
    "OUTBOX_THROTTLE_BASE": "0.5",
}

_session_results: list[dict[str, Any]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: fault-injection and load tests, minutes long (make test-slow)"
    )


@pytest.fixture
def fenv(env):
    """The test environment with the compressed fault-test settings."""
    env.values.update(FAULT_SETTINGS)
    return env


class Reliability:
    """What a test hands over for the README's reliability table."""

    def record(self, scenario: str, **figures: Any) -> dict[str, Any]:
        entry = report.record(scenario, **figures)
        _session_results.append(entry)
        print(f"\n[reliability] {entry}")
        return entry


@pytest.fixture
def reliability() -> Reliability:
    return Reliability()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _session_results:
        return
    terminalreporter.section("reliability figures (this run)")
    terminalreporter.write(report.render(_session_results))
    for entry in _session_results:
        extra = {
            k: v for k, v in entry.items() if k not in {"scenario", "faults", "note", "recorded_at"}
        }
        terminalreporter.write_line(f"{entry['scenario']}: {extra}")
    terminalreporter.write_line(f"(appended to {report.report_path()})")
