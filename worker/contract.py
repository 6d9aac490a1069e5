"""Names other services rely on: task names and queues. Changing one breaks callers."""

#: Enqueue a message by name: `send_task("outbox.enqueue", kwargs={...})`.
ENQUEUE_TASK = "outbox.enqueue"
#: Enqueue up to 1,000 messages in one call: `send_task("outbox.enqueue_many",
#: kwargs={"requests": [...]})`; one result per request.
ENQUEUE_MANY_TASK = "outbox.enqueue_many"
#: Drain one account's due mail; the only thing a delivery message carries is its id.
DRAIN_TASK = "outbox.drain"
#: A wake-up for one message id, as published before the drains; it drains the
#: message's account (kept so wake-ups already in a broker still work after an upgrade).
SEND_TASK = "outbox.send"
BACKUP_TASK = "outbox.deliver_via_backup"
SWEEP_TASK = "outbox.sweep"
#: What became of one message or many, by name: `send_task("outbox.status", args=([17],))`.
STATUS_TASK = "outbox.status"
#: Publishes due status events to the callers' `status_task`s (beat, and after drains).
PUBLISH_EVENTS_TASK = "outbox.publish_events"
NOTIFY_TASK = "outbox.notify"
#: Posts due status events to the webhooks (beat, and after a drain recorded some).
DELIVER_WEBHOOKS_TASK = "outbox.deliver_webhooks"
WAKE_ACCOUNT_TASK = "outbox.wake_account"
RETRY_TASK = "outbox.retry"
CANCEL_TASK = "outbox.cancel"

#: Celery's default queue: where `send_task("outbox.enqueue", ...)` lands when the caller
#: names no queue. Outbox workers consume it, so other services need no routing set-up;
#: give Outbox its own Redis database or RabbitMQ vhost so no other app shares it.
INTAKE_QUEUE = "celery"
#: Drains of accounts with mail due now (fresh mail, operator "send now", a drain that
#: yields and goes to the back of the queue).
SEND_QUEUE = "outbox.send"
#: Drains on a countdown (an account's next retry or scheduled send).
RETRY_QUEUE = "outbox.retry"
#: The final fallback through the backup provider's HTTP API.
BACKUP_QUEUE = "outbox.backup"
#: Sweeps, notices, operator tasks.
MAINTENANCE_QUEUE = "outbox.maintenance"
QUEUES = (INTAKE_QUEUE, SEND_QUEUE, RETRY_QUEUE, BACKUP_QUEUE, MAINTENANCE_QUEUE)
#: Where a request's `status_task` receives its events when it names no `status_queue`:
#: the caller's workers consume it (`-Q outbox.events`); Outbox's never do.
EVENTS_QUEUE = "outbox.events"


def broker_transport_options(broker_url: str) -> dict[str, object]:
    """How Outbox talks to its broker, the same for the worker and every publisher.

    Redis: a visibility timeout far above our longest countdown (OUTBOX_COUNTDOWN_MAX),
    so Redis never redelivers a waiting wake-up. RabbitMQ: publisher confirms, so a
    publish the broker did not take fails loudly (and the sweeper makes up for it)
    instead of vanishing.
    """
    if broker_url.startswith(("redis", "rediss")):
        return {"visibility_timeout": 3600}
    if broker_url.startswith(("amqp", "amqps", "pyamqp")):
        return {"confirm_publish": True}
    return {}


#: Version of the `outbox.enqueue` request schema documented in the README.
ENQUEUE_SCHEMA_VERSION = 1
