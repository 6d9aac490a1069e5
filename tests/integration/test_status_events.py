"""Status events back to the sending service, by task name: a separate Celery app that
imports none of Outbox's code receives every event of its mail, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery

from standins.accounts import make_account
from standins.services import wait_until
from tests.support.outbox import cli, wait_for_status
from worker.clock import utcnow

GREYLISTED = "451 4.7.1 Greylisted, please try again later"

RECEIVER = """
import json, os
from celery import Celery

app = Celery("billing", broker=os.environ["BROKER"])
app.conf.worker_hijack_root_logger = False


@app.task(name="billing.mail_status")
def mail_status(**event):
    with open(os.environ["EVENTS_FILE"], "a") as f:
        f.write(json.dumps(event) + "\\n")
"""


@pytest.fixture
def receiver(env, tmp_path: Path):
    """The caller's own worker, consuming `outbox.events` with none of our code."""
    home = tmp_path / "billing"
    home.mkdir()
    (home / "billing_app.py").write_text(textwrap.dedent(RECEIVER))
    events_file = home / "events.jsonl"
    events_file.touch()
    log = open(home / "worker.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "billing_app",
            "worker",
            "-Q",
            "outbox.events",
            "-P",
            "solo",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "INFO",
        ],
        cwd=home,
        env={
            "PATH": os.environ["PATH"],
            "BROKER": env.values["OUTBOX_BROKER_URL"],
            "EVENTS_FILE": str(events_file),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def received() -> list[dict]:
        return [json.loads(line) for line in events_file.read_text().splitlines() if line]

    yield received
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def test_a_service_with_none_of_our_code_learns_every_change_in_order(
    env, db, box, plain_smtp_server, start_worker, receiver
):
    env.values.update({"OUTBOX_RETRY_BASE": "1", "OUTBOX_RETRY_MAX": "2"})
    plain_smtp_server.script.rcpt["bob@example.com"] = [GREYLISTED, GREYLISTED]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    caller = Celery(
        broker=env.values["OUTBOX_BROKER_URL"],
        backend=env.values["OUTBOX_RESULT_BACKEND"],
        set_as_current=False,
    )
    accepted = caller.send_task(
        "outbox.enqueue",
        kwargs={
            "account": "acme",
            "to": ["bob@example.com"],
            "subject": "Invoice 42",
            "text": "Hello",
            "metadata": {"invoice": "INV-42", "customer": 7},
            "status_task": "billing.mail_status",
        },
    ).get(timeout=30)
    mid = accepted["id"]
    wait_for_status(db, mid, "sent", timeout=30)
    wait_until(lambda: len(receiver()) >= 4, timeout=30, message="four events")
    got = receiver()

    assert [e["type"] for e in got] == ["accepted", "deferred", "deferred", "sent"], got
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    assert len({e["id"] for e in got}) == 4
    for e in got:
        assert e["message_id"] == mid and e["account"] == "acme"
        assert e["metadata"] == {"invoice": "INV-42", "customer": 7}
    for deferral in got[1:3]:
        assert deferral["code"] == 451 and deferral["enhanced"] == "4.7.1"
        assert deferral["verdict"] == "retry"
        assert "greylist" in deferral["meaning"].lower()
        assert deferral["advice"]
        assert deferral["next_attempt_at"]
    assert got[1]["attempts"] == 1 and got[2]["attempts"] == 2
    assert got[3]["channel"] == "smtp" and got[3]["recipients"] == ["bob@example.com"]
    assert got[3]["code"] == 250

    # Polling by name says the same; the operator sees the same events.
    [status] = caller.send_task("outbox.status", args=([mid],)).get(timeout=30)
    assert status["status"] == "sent" and status["metadata"]["invoice"] == "INV-42"
    shown = json.loads(cli(env, "events", "--message", str(mid), "--json").stdout)
    assert [e["id"] for e in shown] == [e["id"] for e in got]
    assert all(e["published_at"] for e in shown)

    # Redelivery sends the same events again, with the same ids, in order.
    again = cli(env, "events", "redeliver", str(mid), "--json")
    assert again.returncode == 0, again.stderr
    # No beat runs in this test: publish by name, as beat would.
    caller.send_task("outbox.publish_events", queue="outbox.maintenance")
    wait_until(lambda: len(receiver()) >= 8, timeout=30, message="the redelivery")
    assert [e["id"] for e in receiver()[4:]] == [e["id"] for e in got]


def test_mail_without_a_status_task_still_has_its_events_for_people(
    env, db, box, plain_smtp_server, start_worker
):
    plain_smtp_server.script.rcpt["gone@example.com"] = ["550 5.1.1 No such user"]
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    client = env.client(db)
    mid = client.enqueue(
        account="acme", to=["gone@example.com", "ok@example.com"], subject="x", text="y"
    ).id
    later = (utcnow() + timedelta(days=1)).isoformat()
    waiting = client.enqueue(
        account="acme", to=["c@example.com"], subject="x", text="y", send_at=later
    ).id
    wait_for_status(db, mid, "sent", timeout=20)
    shown = json.loads(cli(env, "events", "--message", str(mid), "--json").stdout)
    assert [e["type"] for e in shown] == ["accepted", "recipient_failed", "sent"]
    assert shown[1]["recipient"] == "gone@example.com" and shown[1]["enhanced"] == "5.1.1"
    assert shown[2]["recipients"] == ["ok@example.com"]
    assert all(e["published_at"] is None for e in shown)  # nobody to publish to

    done = cli(env, "cancel", str(waiting), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(cli(env, "events", "--message", str(waiting), "--json").stdout)
    assert [(e["type"], e["seq"]) for e in shown] == [("accepted", 1), ("cancelled", 2)]
    table = cli(env, "events", "--account", "acme")
    assert table.returncode == 0 and "recipient_failed" in table.stdout


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("metadata", ["a"], "must be a JSON object"),
        ("metadata", {"x": {"nested": 1}}, "values are strings"),
        ("metadata", {"x": "y" * 5000}, "at most 4,096"),
        ("status_task", "not a task!", "not a Celery task name"),
        ("status_queue", "outbox.events", "only used with status_task"),
    ],
)
def test_bad_event_fields_are_refused_at_the_door(env, db, box, field, value, words):
    from worker.intake import InvalidRequest

    make_account(db, box, "acme", port=2525, tls_mode="none")
    client = env.client(db)
    client.wakeups = None
    with pytest.raises(InvalidRequest) as info:
        client.enqueue(
            account="acme", to=["a@example.com"], subject="x", text="y", **{field: value}
        )
    assert [e.field for e in info.value.errors] == [field]
    assert words in info.value.errors[0].reason
