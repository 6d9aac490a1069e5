"""A Celery app with one no-op task: the broker + pool ceiling for `bench.run`.

    celery -A bench.noop_app worker -P prefork -c 2 -E -Q <Outbox's queues>

Everything that shapes how messages travel is copied from Outbox's own app
(`config.celery`) by `bench.run`, which passes it here as JSON in ``BENCH_CELERY_CONF``
(prefetch, acks_late, reject on worker lost, ETA limit, events, transport options),
together with ``BENCH_BROKER_URL``. The queues are Outbox's queue names, declared the
same way. The task only counts itself in Redis (``INCR``); the one that reaches
``BENCH_EXPECTED`` stores the finishing time, so the drain is timed inside the run.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery
from kombu import Exchange, Queue

from worker.contract import QUEUES

COUNTER_KEY = "bench:noop:done"
FINISHED_KEY = "bench:noop:finished_at"

app = Celery("bench-noop", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/13"))
app.conf.update(
    task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
    task_default_queue="outbox.send",
    task_default_exchange="outbox.send",
    task_default_routing_key="outbox.send",
    worker_hijack_root_logger=False,
    **json.loads(os.environ.get("BENCH_CELERY_CONF", "{}")),
)

_redis: redis.Redis | None = None


def _client() -> redis.Redis:
    global _redis
    if _redis is None:  # one connection per child, made after fork
        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis


@app.task(name="bench.noop")
def noop(n: int) -> None:
    done = _client().incr(COUNTER_KEY)
    if done == int(os.environ.get("BENCH_EXPECTED", "0")):
        _client().set(FINISHED_KEY, repr(time.time()))
