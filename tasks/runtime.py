"""One runtime per worker process: engine, database, SMTP pool, all built once.

Built lazily on first use, and thrown away after fork so no connection is shared
between processes. It only wires: every number comes from the settings.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import httpx
from celery.signals import worker_process_init, worker_process_shutdown

from config.settings import Settings, get_settings
from worker.backup import BackupProvider, make_provider
from worker.backup.engine import BackupConfig, BackupEngine
from worker.client import IntakeClient, limits_from
from worker.contract import EVENTS_QUEUE
from worker.crypto import SecretBox
from worker.delivery import DeliveryEngine, EngineConfig
from worker.lease import LeaseKeeper
from worker.notify import Notifier
from worker.operator import Operator
from worker.smtp import SmtpConnectionPool
from worker.status_events import EventPublisher
from worker.store.db import WORKER_PING_WHEN_IDLE_S, Database
from worker.sweeper import SweepConfig, Sweeper
from worker.wakeups import Wakeups
from worker.webhook_transport import guarded_client
from worker.webhooks import Dispatcher, Poster, forbidden_address, resolve

log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime: Runtime | None = None


class Runtime:
    """Everything a worker process needs to run tasks, built once from the settings:
    tasks stay thin (ids in, decisions out) because the wiring lives here, and a forked
    child builds its own (no connection crosses fork)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Every database call of a task is retried (autoretry, Database.run): ping only
        # connections that sat idle, not before each of a delivery's statements.
        self.db = Database(settings.database_url, ping_when_idle_s=WORKER_PING_WHEN_IDLE_S)
        self.box = SecretBox(settings.secret_keys, warning=settings.secret_key_warning)
        # A drain's connection lives for the drain: nothing idles between drains.
        self.pool = SmtpConnectionPool(
            idle_s=settings.drain_seconds + settings.smtp_timeout_s,
            max_per_connection=settings.smtp_max_per_connection,
        )
        config = EngineConfig.from_settings(settings)
        self.keeper = LeaseKeeper(self.db, lease_s=config.lease_s)
        self.engine = DeliveryEngine(self.db, self.box, self.pool, config, keeper=self.keeper)
        self._client: IntakeClient | None = None
        self._wakeups: Wakeups | None = None
        self._backup_engine: BackupEngine | None = None
        self._provider: BackupProvider | None = None
        self._notifier: Notifier | None = None
        self._events: EventPublisher | None = None
        self._dispatcher: Dispatcher | None = None
        self._poster: Poster | None = None

    def wakeups(self) -> Wakeups:
        """Coalesced drain wake-ups, published by this worker's own drain task."""
        if self._wakeups is None:
            from tasks.delivery import publish_drain

            self._wakeups = Wakeups(
                self.db,
                publish_drain,
                grace_s=self.settings.wake_grace_s,
                countdown_max_s=self.settings.countdown_max_s,
            )
        return self._wakeups

    def client(self) -> IntakeClient:
        """The intake, waking this worker's own drains after each commit."""
        if self._client is None:
            self._client = IntakeClient(
                self.db,
                limits=limits_from(self.settings),
                window_s=self.settings.retry_window_s,
                wakeups=self.wakeups(),
            )
        return self._client

    def backup_engine(self) -> BackupEngine:
        if self._backup_engine is None:
            s = self.settings
            self._backup_engine = BackupEngine(
                self.db,
                self.backup_provider(),
                BackupConfig(
                    backup_from=s.backup_from,
                    retry_window_s=s.backup_retry_window_s,
                    base_s=s.backup_retry_base_s,
                    max_s=s.backup_retry_max_s,
                    lease_s=s.lease_s,
                    countdown_max_s=s.countdown_max_s,
                    wake_grace_s=s.wake_grace_s,
                ),
                holder=self.engine.holder,
            )
        return self._backup_engine

    def backup_provider(self) -> BackupProvider | None:
        s = self.settings
        if s.backup_provider is None or s.backup_api_key is None:
            return None
        if self._provider is None:
            self._provider = make_provider(
                s.backup_provider,
                api_key=s.backup_api_key,
                base_url=s.backup_api_url,
                mailgun_domain=s.backup_mailgun_domain,
                timeout_s=s.backup_timeout_s,
            )
        return self._provider

    def sweeper(self) -> Sweeper:
        return Sweeper(self.db, SweepConfig(wake_grace_s=self.settings.wake_grace_s))

    def notifier(self) -> Notifier:
        if self._notifier is None:
            self._notifier = Notifier(
                self.db,
                backup=self.backup_provider(),
                backup_from=self.settings.backup_from,
                backup_configured=self.settings.backup_provider is not None,
            )
        return self._notifier

    def operator(self) -> Operator:
        return Operator(self.db, window_s=self.settings.retry_window_s)

    def statuses(self, message_ids: list[int]) -> list[dict[str, Any]]:
        from worker.clock import utcnow
        from worker.store.reports import statuses

        with self.db.session() as session:
            return statuses(session, message_ids, now=utcnow())

    def events(self) -> EventPublisher:
        """Status events to the callers' tasks, published through this worker's app."""
        if self._events is None:
            from config.celery import app

            def send(task: str, queue: str, event: dict[str, Any]) -> None:
                app.send_task(task, kwargs=event, queue=queue, ignore_result=True)

            self._events = EventPublisher(self.db, send, default_queue=EVENTS_QUEUE)
        return self._events

    def dispatcher(self) -> Dispatcher:
        """Status events and incident notices to the webhooks: signed, retried
        (worker.webhooks)."""
        if self._dispatcher is None:
            s = self.settings
            self._dispatcher = Dispatcher(
                self.db,
                self.poster(),
                decrypt=self.box.decrypt,
                global_url=s.events_webhook,
                batch=s.events_batch,
                window_s=s.events_retry_window_s,
                # Longer than one POST can take; renewed before each.
                lease_s=2 * s.events_timeout_s + 5,
                backup_configured=s.backup_provider is not None,
            )
        return self._dispatcher

    def poster(self) -> Poster:
        """The one signed, SSRF-guarded POST of events and incident notices."""
        if self._poster is None:
            timeout = self.settings.events_timeout_s
            self._poster = Poster(
                # Without the allowance, every connection goes to an address checked as
                # it is made (worker.webhook_transport: no DNS rebinding after the guard).
                http=httpx.Client(timeout=timeout)
                if self.settings.events_allow_private
                else guarded_client(timeout=timeout, resolver=resolve, check=forbidden_address),
                secrets=self.settings.events_secrets,
                allow_private=self.settings.events_allow_private,
            )
        return self._poster

    def close(self) -> None:
        self.keeper.close()
        if self._provider is not None:
            self._provider.close()
        self.pool.close()
        self.db.dispose()


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = Runtime(get_settings())
    return _runtime


def reset_after_fork() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.db.after_fork()
    _runtime = None


def shutdown() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
    _runtime = None


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """Pools must not cross fork(): each child gets its own connections.

    Children also ignore SIGTERM, as Celery already makes them ignore SIGINT: hosts that
    signal the whole process group (Heroku, `kill -- -PGID`, supervisord's stopasgroup)
    would otherwise kill a child mid-send and leave the parent waiting forever in its
    pool shutdown. The parent's warm shutdown stops the children itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reset_after_fork()


@worker_process_shutdown.connect
def _on_shutdown(**_: object) -> None:
    shutdown()
