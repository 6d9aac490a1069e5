"""One runtime per worker process: engine, database, SMTP pool, all built once.

Built lazily on first use, and thrown away after fork so no connection is shared
between processes.
"""

from __future__ import annotations

import logging
import threading

import httpx

from config.settings import Settings, get_settings
from worker.backup import BackupProvider, make_provider
from worker.client import Outbox
from worker.crypto import SecretBox
from worker.delivery import DeliveryEngine, EngineConfig
from worker.fallback import BackupConfig, BackupEngine
from worker.intake import Limits
from worker.notify import Notifier
from worker.operator import Operator
from worker.smtp import SmtpConnectionPool
from worker.store.db import WORKER_PING_WHEN_IDLE_S, Database
from worker.sweeper import SweepConfig, Sweeper

log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime: Runtime | None = None


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Every database call of a task is retried (autoretry, Database.run): ping only
        # connections that sat idle, not before each of a delivery's two statements.
        self.db = Database(settings.database_url, ping_when_idle_s=WORKER_PING_WHEN_IDLE_S)
        self.box = SecretBox(settings.secret_keys)
        self.pool = SmtpConnectionPool(
            idle_s=settings.smtp_idle_s, max_per_connection=settings.smtp_max_per_connection
        )
        self.engine = DeliveryEngine(self.db, self.box, self.pool, engine_config(settings))
        self._reaper = _start_reaper(self.pool, interval_s=min(1.0, settings.smtp_idle_s / 2))
        self._client: Outbox | None = None
        self._backup_engine: BackupEngine | None = None
        self._provider: BackupProvider | None = None
        self._notifier: Notifier | None = None

    def client(self) -> Outbox:
        """The intake, waking this worker's own `outbox.send` after each commit."""
        if self._client is None:
            from tasks.delivery import send

            self._client = Outbox(
                self.db,
                limits=Limits(
                    max_message_bytes=self.settings.max_message_bytes,
                    max_recipients=self.settings.max_recipients,
                ),
                window_s=self.settings.retry_window_s,
                wake_grace_s=self.settings.wake_grace_s,
                wake=lambda message_id: send.delay(message_id),
            )
        return self._client

    def backup_engine(self) -> BackupEngine:
        if self._backup_engine is None:
            self._backup_engine = BackupEngine(
                self.db,
                self.backup_provider(),
                BackupConfig(
                    backup_from=self.settings.backup_from,
                    retry_window_s=self.settings.backup_retry_window_s,
                    base_s=min(30.0, self.settings.retry_base_s),
                    max_s=min(600.0, self.settings.retry_max_s),
                    lease_s=self.settings.lease_s,
                    countdown_max_s=self.settings.countdown_max_s,
                    wake_grace_s=self.settings.wake_grace_s,
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
        return Sweeper(
            self.db,
            SweepConfig(
                wake_grace_s=self.settings.wake_grace_s,
                lease_s=self.settings.lease_s,
                backup_enabled=True,
            ),
        )

    def notifier(self) -> Notifier:
        if self._notifier is None:
            self._notifier = Notifier(
                self.db,
                http=httpx.Client(timeout=10.0),
                backup=self.backup_provider(),
                backup_from=self.settings.backup_from,
            )
        return self._notifier

    def operator(self) -> Operator:
        return Operator(
            self.db, window_s=self.settings.retry_window_s, wake_grace_s=self.settings.wake_grace_s
        )

    def due_of_account(self, account_id: int) -> list[int]:
        from worker.clock import utcnow
        from worker.store.messages import due_of_account

        with self.db.session() as session:
            return due_of_account(session, account_id, now=utcnow())

    def close(self) -> None:
        self._reaper.set()
        if self._provider is not None:
            self._provider.close()
        self.pool.close()
        try:
            from worker.store import slots

            with self.db.session() as session:
                slots.release_all(session, holder=self.engine.holder)
        except Exception:  # shutting down: the slots expire by themselves anyway
            log.debug("could not release connection slots at shutdown", exc_info=True)
        self.db.dispose()


def _start_reaper(pool: SmtpConnectionPool, *, interval_s: float) -> threading.Event:
    """Close idle SMTP connections even when no task comes to do it.

    An idle open connection still counts against the account's connection cap on the
    server; the slot row expires at the same time (see worker.store.slots).
    """
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            try:
                pool.close_idle()
            except Exception:  # never let the timer die; the next send closes them too
                log.debug("closing idle SMTP connections failed", exc_info=True)

    threading.Thread(target=run, name="smtp-reaper", daemon=True).start()
    return stop


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig.from_settings(settings)


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
