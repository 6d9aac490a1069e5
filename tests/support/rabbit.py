"""RabbitMQ as the broker in tests: a vhost of this test session's own on the machine's
RabbitMQ (127.0.0.1:5672, guest/guest), emptied before each test.

Load with ``pytest_plugins = ["tests.support.rabbit"]``. The fixtures skip, saying why,
only when RabbitMQ is not there (no `rabbitmqctl`, or nothing listening on 5672).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from worker.contract import INTAKE_QUEUE, QUEUES

HOST = os.environ.get("OUTBOX_TEST_RABBITMQ_HOST", "127.0.0.1")
PORT = int(os.environ.get("OUTBOX_TEST_RABBITMQ_PORT", "5672"))


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout


def _listening() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=2.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost for this session (so parallel sessions never consume each other's tasks)."""
    if shutil.which("rabbitmqctl") is None or not _listening():
        pytest.skip(f"RabbitMQ is not running on {HOST}:{PORT} (`rabbitmq-server -detached`)")
    vhost = f"outbox_test_{os.getpid()}_{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            rabbitmqctl("delete_vhost", vhost)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"


def empty_queues(url: str) -> None:
    """Delete Outbox's queues in the vhost: each test starts with nothing on the broker."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in (*QUEUES, INTAKE_QUEUE):
            channel.queue_delete(name)
        channel.close()


def queue_depths(url: str) -> dict[str, int]:
    """Messages ready in each of Outbox's queues (not those a worker holds unacked)."""
    from kombu import Connection

    depths: dict[str, int] = {}
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in QUEUES:
            try:
                depths[name] = channel.queue_declare(name, passive=True).message_count
            except Exception:
                channel = conn.channel()
                depths[name] = 0
        channel.close()
    return depths


@pytest.fixture
def rabbit_env(env, rabbitmq_vhost: str):
    """The test environment with RabbitMQ as the broker (results stay on Redis)."""
    url = amqp_url(rabbitmq_vhost)
    empty_queues(url)
    env.values["OUTBOX_BROKER_URL"] = url
    return env
