"""Flower behind basic auth, with message content masked: real Flower, worker, Redis, SMTP.

`outbox flower` runs as a real process on a free loopback port; an email is enqueued
through Flower's send-task API and by a bare Celery client, delivered to the scripted
SMTP server, and Flower's task list shows the account and counts but none of the
content.
"""

from __future__ import annotations

import base64
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from celery import Celery

from standins.accounts import make_account
from standins.services import OutboxProcess, wait_until

pytestmark = pytest.mark.integration

USER = "ops"
PASSWORD = f"pw-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Flower:
    process: OutboxProcess
    url: str

    def client(self, *, auth: bool = True) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, auth=(USER, PASSWORD) if auth else None, timeout=10.0
        )


@pytest.fixture
def flower(env) -> Iterator[Flower]:
    port = free_port()
    values = {
        **env.values,
        "OUTBOX_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "OUTBOX_FLOWER_PORT": str(port),
    }
    process = OutboxProcess(
        [sys.executable, "-m", "worker.cli", "flower"],
        values,
        env.tmp / "flower.log",
        ready_marker="Visit me at",
    )
    process.start()
    try:
        # Flower's event receiver subscribes after the banner; events before it are lost.
        wait_until(lambda: "Connected to" in process.log(), timeout=15, message="Flower's events")
        yield Flower(process, f"http://127.0.0.1:{port}")
    finally:
        process.stop()


def _email(marker: str, key: str) -> dict:
    return {
        "account": "acme",
        "to": ["bob@example.com"],
        "cc": ["carol@example.org"],
        "subject": f"Subject {marker}",
        "text": f"Body {marker}",
        "html": f"<p>{marker}</p>",
        "attachments": [
            {
                "filename": f"{marker}.txt",
                "content_type": "text/plain",
                "content": base64.b64encode(marker.encode()).decode(),
            }
        ],
        "idempotency_key": key,
    }


def _delivered(server, marker: str) -> bool:
    return any(marker in str(m.message["Subject"]) for m in server.messages)


def _enqueue_tasks(api: httpx.Client) -> dict:
    tasks = api.get("/api/tasks", params={"taskname": "outbox.enqueue"}).raise_for_status()
    return tasks.json()


def test_flower_needs_the_password_and_never_shows_message_content(
    env, db, box, plain_smtp_server, start_worker, flower
):
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    worker = start_worker()
    via_flower, via_client = f"mark-{uuid.uuid4().hex}", f"mark-{uuid.uuid4().hex}"

    with flower.client(auth=False) as anonymous, flower.client() as api:
        assert anonymous.get("/healthcheck").text == "OK"
        # Flower 2.2 serves /metrics without authentication; it holds no task arguments.
        wait_until(
            lambda: 'flower_worker_online{worker="' in anonymous.get("/metrics").text,
            timeout=15,
            message="Flower to see the worker's events",
        )

        send = "/api/task/send-task/outbox.enqueue"
        body = {"kwargs": _email(via_flower, "order-77")}
        assert anonymous.post(send, json=body).status_code == 401
        with httpx.Client(base_url=flower.url, auth=(USER, "wrong"), timeout=10) as wrong:
            assert wrong.post(send, json=body).status_code == 401
        assert anonymous.get("/api/tasks").status_code == 401
        assert anonymous.get("/").status_code == 401

        sent = api.post(send, json=body)
        assert sent.status_code == 200, sent.text
        flower_task = sent.json()["task-id"]

        # A caller with none of our code, who masks nothing: the worker masks.
        producer = Celery(broker=env.values["OUTBOX_BROKER_URL"], set_as_current=False)
        producer.conf.task_send_sent_event = False
        client_task = producer.send_task("outbox.enqueue", kwargs=_email(via_client, "order-78")).id

        wait_until(
            lambda: (
                _delivered(plain_smtp_server, via_flower)
                and _delivered(plain_smtp_server, via_client)
            ),
            timeout=20,
            message="both emails to reach the SMTP server",
        )
        tasks = wait_until(
            lambda: (
                (
                    t
                    if all(
                        t.get(i, {}).get("state") == "SUCCESS" for i in (flower_task, client_task)
                    )
                    else None
                )
                if (t := _enqueue_tasks(api))
                else None
            ),
            timeout=15,
            message="Flower to list both enqueue tasks as succeeded",
        )
        listing = api.get("/api/tasks").text  # everything Flower holds, unfiltered
        info = api.get(f"/api/task/info/{client_task}").text

    for task_id, key in ((flower_task, "order-77"), (client_task, "order-78")):
        task = tasks[task_id]
        assert task["name"] == "outbox.enqueue"
        assert task["args"] == "()"
        assert task["kwargs"] == (
            f"{{'account': 'acme', 'recipients': 2, 'idempotency_key': '{key}', 'attachments': 1}}"
        )
        assert "'created': True" in task["result"] and "'id': " in task["result"]
    assert "acme" in listing
    for marker in (via_flower, via_client):
        assert marker not in listing and marker not in info
        assert marker not in worker.log()
        assert marker not in flower.process.log()

    # The password is on no command line and in no log.
    assert PASSWORD not in Path(f"/proc/{flower.process.pid}/cmdline").read_text()
    assert PASSWORD not in flower.process.log()


def test_flower_masks_what_it_sends_itself_while_no_worker_runs(flower):
    """With the workers down, Flower knows a task only from its own `task-sent` event."""
    marker = f"mark-{uuid.uuid4().hex}"
    with flower.client() as api:
        # Flower's event receiver subscribes shortly after it logs "Connected": send a
        # probe (to a queue nobody reads) until Flower has seen one.
        def probe_seen() -> bool:
            api.post(
                "/api/task/send-task/test.probe", json={"queue": "test.probe"}
            ).raise_for_status()
            tasks = api.get("/api/tasks", params={"taskname": "test.probe"}).json()
            return bool(tasks)

        wait_until(probe_seen, timeout=10, interval=0.2, message="Flower to see its events")

        sent = api.post(
            "/api/task/send-task/outbox.enqueue", json={"kwargs": _email(marker, "order-79")}
        )
        assert sent.status_code == 200, sent.text
        task_id = sent.json()["task-id"]
        tasks = wait_until(
            lambda: (t := _enqueue_tasks(api)) and task_id in t and t,
            timeout=10,
            message="Flower to list the task it sent",
        )
        listing = api.get("/api/tasks").text

    assert tasks[task_id]["state"] == "PENDING"
    assert tasks[task_id]["kwargs"] == (
        "{'account': 'acme', 'recipients': 2, 'idempotency_key': 'order-79', 'attachments': 1}"
    )
    assert marker not in listing
    assert marker not in flower.process.log()
