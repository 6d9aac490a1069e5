"""RabbitMQ faults mid-load: the broker restarted, and every connection of the vhost
closed under the workers. The database is the truth; nothing may be lost or sent twice."""

from __future__ import annotations

import time

from standins.accounts import make_account
from standins.services import wait_until
from standins.smtp import ScriptedSMTPServer
from tests.support.bulk import enqueue_many, wait_until_finished
from tests.support.rabbit import rabbitmqctl
from tests.support.tally import judge

GREYLISTED = "451 4.7.1 Greylisted, try again later"


def _record(reliability, scenario: str, verdict, *, faults: str, started: float) -> None:
    reliability.record(
        scenario,
        messages=verdict.messages,
        faults=faults,
        lost=len(verdict.lost),
        duplicates=verdict.duplicates,
        refusals=verdict.statuses.get("failed", 0),
        duration_s=round(time.monotonic() - started, 1),
    )


def _load(fenv, db, box, start_worker, server: ScriptedSMTPServer) -> list[int]:
    fenv.values.update({"OUTBOX_RETRY_BASE": "1", "OUTBOX_RETRY_MAX": "2"})
    server.script.hang_after_data_s = 0.02
    for i in range(0, 300, 3):  # every third recipient is greylisted once: countdowns
        server.script.rcpt[f"r{i}@example.com"] = [GREYLISTED]
    make_account(db, box, "acme", port=server.port, tls_mode="none", max_connections=3)
    make_account(db, box, "globex", port=server.port, tls_mode="none", max_connections=3)
    start_worker(concurrency=2, beat=True)
    client = fenv.client(db)
    ids = enqueue_many(client, "acme", 150, prefix="r")
    ids += enqueue_many(client, "globex", 150, prefix="r", start=150)
    wait_until(lambda: len(server.messages) >= 60, timeout=60, message="60 deliveries")
    return ids


def test_rabbitmq_restarted_mid_load_loses_nothing(
    fenv, rabbit_env, db, box, start_worker, reliability
):
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        ids = _load(fenv, db, box, start_worker, server)
        at_restart = len(server.messages)
        rabbitmqctl("stop_app")
        try:
            time.sleep(3.0)  # the outage itself: the broker is away this long
        finally:
            rabbitmqctl("start_app")
        took = wait_until_finished(db, expected=len(ids), timeout=180)
        verdict = judge(db, servers=[server], ids=ids)
    print(
        f"\nRabbitMQ stop_app for 3 s after {at_restart} deliveries, start_app: all out "
        f"{took:.1f}s later: {verdict.summary()}"
    )
    _record(
        reliability,
        "RabbitMQ restarted mid-load (stop_app 3 s, start_app)",
        verdict,
        faults=f"broker stopped after {at_restart} of {len(ids)} deliveries, greylisting "
        "countdowns in flight",
        started=started,
    )
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert verdict.duplicates == 0, verdict.duplicated


def test_every_rabbitmq_connection_closed_mid_load_loses_nothing(
    fenv, rabbit_env, db, box, start_worker, reliability
):
    vhost = rabbit_env.values["OUTBOX_BROKER_URL"].rsplit("/", 1)[1]
    started = time.monotonic()
    with ScriptedSMTPServer(tls="none") as server:
        ids = _load(fenv, db, box, start_worker, server)
        closes = 0
        for threshold in (100, 180):
            wait_until(
                lambda t=threshold: len(server.messages) >= t,
                timeout=60,
                message=f"{threshold} deliveries",
            )
            rabbitmqctl("close_all_connections", "--vhost", vhost, "fault test")
            closes += 1
        took = wait_until_finished(db, expected=len(ids), timeout=180)
        verdict = judge(db, servers=[server], ids=ids)
    print(
        f"\nevery RabbitMQ connection of the vhost closed x{closes}: all out {took:.1f}s "
        f"after the last close: {verdict.summary()}"
    )
    _record(
        reliability,
        "RabbitMQ closes every connection mid-load",
        verdict,
        faults=f"{closes} x close_all_connections on the vhost (workers and beat)",
        started=started,
    )
    assert verdict.statuses == {"sent": len(ids)}
    assert not verdict.lost and not verdict.strangers
    assert verdict.duplicates == 0, verdict.duplicated
