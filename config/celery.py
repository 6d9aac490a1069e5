"""The Celery app: queues, routes, at-least-once settings and the beat schedule.

`celery -A config worker` finds `app` here. Task code lives in `tasks/`; this module
only says how messages travel.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging
from kombu import Exchange, Queue

from config.settings import get_settings
from worker.contract import (
    BACKUP_QUEUE,
    BACKUP_TASK,
    CANCEL_TASK,
    DELIVER_WEBHOOKS_TASK,
    DRAIN_TASK,
    ENQUEUE_MANY_TASK,
    ENQUEUE_TASK,
    INTAKE_QUEUE,
    MAINTENANCE_QUEUE,
    NOTIFY_TASK,
    PUBLISH_EVENTS_TASK,
    QUEUES,
    RETRY_QUEUE,
    RETRY_TASK,
    SEND_QUEUE,
    SEND_TASK,
    STATUS_TASK,
    SWEEP_TASK,
    WAKE_ACCOUNT_TASK,
    broker_transport_options,
)

__all__ = ["BACKUP_QUEUE", "MAINTENANCE_QUEUE", "QUEUES", "RETRY_QUEUE", "SEND_QUEUE", "app"]


settings = get_settings()

app = Celery(
    "outbox",
    include=["tasks.delivery", "tasks.intake", "tasks.maintenance", "tasks.operator"],
)
app.conf.update(
    broker_url=settings.broker_url,
    result_backend=settings.result_backend,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    # Each queue has its own direct exchange and routing key. (A bare Queue(name) would
    # bind every queue to the default queue's exchange and key: one publish, four copies.)
    task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
    task_default_exchange=SEND_QUEUE,
    task_default_routing_key=SEND_QUEUE,
    task_default_queue=SEND_QUEUE,
    task_routes={
        DRAIN_TASK: {"queue": SEND_QUEUE},
        SEND_TASK: {"queue": SEND_QUEUE},
        ENQUEUE_TASK: {"queue": INTAKE_QUEUE},
        ENQUEUE_MANY_TASK: {"queue": INTAKE_QUEUE},
        BACKUP_TASK: {"queue": BACKUP_QUEUE},
        SWEEP_TASK: {"queue": MAINTENANCE_QUEUE},
        STATUS_TASK: {"queue": MAINTENANCE_QUEUE},
        PUBLISH_EVENTS_TASK: {"queue": MAINTENANCE_QUEUE},
        DELIVER_WEBHOOKS_TASK: {"queue": MAINTENANCE_QUEUE},
        NOTIFY_TASK: {"queue": MAINTENANCE_QUEUE},
        WAKE_ACCOUNT_TASK: {"queue": MAINTENANCE_QUEUE},
        RETRY_TASK: {"queue": MAINTENANCE_QUEUE},
        CANCEL_TASK: {"queue": MAINTENANCE_QUEUE},
    },
    # At-least-once: ack after the task ran, and give the message back if the child
    # process died under it. The database claim makes the second run a no-op.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A drain is short (one account's batch, bounded by OUTBOX_DRAIN_SECONDS) and the
    # broker holds about one wake-up per account with due mail: a small prefetch keeps
    # the pipe full without hoarding another account's wake-up behind a long batch.
    worker_prefetch_multiplier=4,
    worker_concurrency=settings.concurrency,
    # Countdowns are kept short (OUTBOX_COUNTDOWN_MAX); this caps what a worker holds
    # in memory even if many are due at once.
    worker_eta_task_limit=1000,
    task_ignore_result=True,
    result_expires=7 * 24 * 3600,
    # Flower needs events to show tasks and export metrics.
    worker_send_task_events=True,
    # Not for the wake-ups and retries the worker publishes itself: one more broker publish
    # each, on the hottest path (bench/README.md); Flower
    # shows those tasks from `task-received` on. Flower's own sends keep theirs
    # (config/flower.py).
    task_send_sent_event=False,
    # Warm shutdown: finish what runs, give back what waits.
    worker_enable_soft_shutdown_on_idle=True,
    worker_soft_shutdown_timeout=10.0,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        SWEEP_TASK: {
            "task": SWEEP_TASK,
            "schedule": settings.sweep_interval_s,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.sweep_interval_s},
        },
        # The backstop for events whose publish after a drain failed, and for those
        # written outside a drain (the Python door's `accepted`, cancel, the sweeper).
        PUBLISH_EVENTS_TASK: {
            "task": PUBLISH_EVENTS_TASK,
            "schedule": settings.sweep_interval_s,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.sweep_interval_s},
        },
        DELIVER_WEBHOOKS_TASK: {
            "task": DELIVER_WEBHOOKS_TASK,
            "schedule": settings.events_interval_s,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.events_interval_s},
        },
    },
)
app.conf.broker_transport_options = broker_transport_options(settings.broker_url)
if settings.result_backend.startswith(("redis", "rediss")):
    app.conf.result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}


@setup_logging.connect
def _logging(loglevel: str | int | None = None, **_: object) -> None:
    """Our formatter (JSON with OUTBOX_LOG_JSON=1) instead of Celery's."""
    from config.logging import configure_logging

    configure_logging(json_lines=settings.log_json, level=loglevel or "INFO")
