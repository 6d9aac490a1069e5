"""A real `outbox flower` process on a free loopback port, as `test_flower.py` runs it.

For tests in other modules that need Flower's HTTP API (basic auth) without importing a
test module.
"""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from standins.services import OutboxProcess, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningFlower:
    process: OutboxProcess
    url: str
    user: str
    password: str

    def client(self, *, auth: bool = True) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, auth=(self.user, self.password) if auth else None, timeout=10.0
        )


@contextmanager
def running_flower(
    values: Mapping[str, str],
    log_path: Path,
    *,
    user: str = "ops",
    password: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[RunningFlower]:
    """`outbox flower` with `values` as its environment and one basic-auth user."""
    password = password or f"pw-{uuid.uuid4().hex}"
    port = free_port()
    env = {
        **values,
        **(extra_env or {}),
        "OUTBOX_FLOWER_BASIC_AUTH": f"{user}:{password}",
        "OUTBOX_FLOWER_PORT": str(port),
    }
    process = OutboxProcess(
        [sys.executable, "-m", "worker.cli", "flower"], env, log_path, ready_marker="Visit me at"
    )
    process.start()
    try:
        # Flower's event receiver subscribes after the banner; events before it are lost.
        wait_until(lambda: "Connected to" in process.log(), timeout=15, message="Flower's events")
        yield RunningFlower(process, f"http://127.0.0.1:{port}", user, password)
    finally:
        process.stop()
