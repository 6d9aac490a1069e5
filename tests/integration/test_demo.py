"""`make demo` works on a machine with only Python: `python -m demo` tells its whole story.

The demo brings its own SMTP servers, backup-provider stand-in and worker on the embedded
defaults (SQLite database and broker in a temporary directory), so this test needs no
PostgreSQL or Redis; it only runs the command and reads what it printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def test_demo_runs_by_itself_and_every_message_ends_as_scripted() -> None:
    # The demo must not depend on whatever OUTBOX_* the machine (or CI) has set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "demo"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr

    assert done.returncode == 0, output[-6000:]
    for outcome in ("Sent via backup", "Failed", "Sent"):
        assert outcome in done.stdout, f"{outcome!r} missing from:\n{output[-6000:]}"
    assert "NOT AS SCRIPTED" not in done.stdout
    assert took < TIMEOUT_S
    # It used a temporary directory, never the repository's own var/.
    assert str(REPO / "var") not in output
