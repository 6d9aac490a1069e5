"""Engines and sessions: one engine per process, safe across Celery's fork.

SQLite (the embedded default) runs in WAL mode with a busy timeout so the worker's
processes and the CLI can write side by side; PostgreSQL connections are pinged before
use (in the worker: when they sat idle), so a restarted server costs one reconnect.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, exc
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.store.models import Base

if TYPE_CHECKING:
    from worker.store.sending import AttemptWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Waits between tries of a transaction whose connection died (a database restart);
#: the last one repeats until the caller's time is up.
RECONNECT_DELAYS_S = (0.2, 0.5, 1.0, 2.0)
#: In the worker, a pooled PostgreSQL connection idle longer than this is pinged before use.
WORKER_PING_WHEN_IDLE_S = 1.0


def make_engine(url: str, *, ping_when_idle_s: float | None = None, **kwargs: Any) -> Engine:
    """An engine for `url`. PostgreSQL connections are pinged before every use, or, with
    `ping_when_idle_s`, only after sitting idle that long (the worker's choice: see
    `_ping_when_idle`)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Parameters are message bodies and addresses: keep them out of error texts.
        kwargs.setdefault("hide_parameters", True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling defers BEGIN; take control so that
            # compare-and-set UPDATEs and the writes after them are one transaction.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: two writers never both read and
            # then fail to upgrade (SQLITE_BUSY without waiting).
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("hide_parameters", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 5)
    if ping_when_idle_s is None:
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    if ping_when_idle_s is not None:
        _ping_when_idle(engine, ping_when_idle_s)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection before use only if it sat idle for `idle_s`.

    `pool_pre_ping` pings on every checkout: two of a delivery's round trips. A connection
    used a moment ago is almost always alive; if the server restarted meanwhile, the first
    statement fails, SQLAlchemy invalidates the pool, and the caller's retry (the task's
    autoretry, `Database.run`) gets a fresh connection. Only the worker, whose every
    database call is retried, makes this trade; the CLI and clients keep pre-ping.
    """

    @event.listens_for(engine, "checkin")
    def _note_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get("checked_in_at")
        if last is None or time.monotonic() - last < idle_s:
            return
        try:
            if not engine.dialect.do_ping(dbapi_conn):
                raise exc.DisconnectionError("ping failed")
        except engine.dialect.loaded_dbapi.Error as err:
            # The pool discards this connection and checks out (or opens) another.
            raise exc.DisconnectionError(str(err)) from err


def changed_rows(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched (`Session.execute` is typed as plain `Result`)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


class Database:
    """An engine plus its session factory; `session()` is one transaction."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @functools.cached_property
    def attempts(self) -> AttemptWriter:
        """How this database records an attempt: chosen once, by dialect (store.sending)."""
        from worker.store.sending import attempt_writer_for

        return attempt_writer_for(self.dialect)

    @contextmanager
    def session(self, *, single_statement: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error.

        `single_statement`: the caller's writes are one statement each, atomic by
        themselves. On PostgreSQL they then run without BEGIN and COMMIT (two round trips
        fewer); on SQLite, which needs the transaction for its multi-statement paths,
        nothing changes.
        """
        if single_statement and self.dialect == "postgresql":
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                with Session(bind=conn) as session, session.begin():
                    yield session
            return
        with self._sessions() as session, session.begin():
            yield session

    def run(
        self,
        work: Callable[[Session], T],
        *,
        give_up_after_s: float = 30.0,
        single_statement: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> T:
        """Run `work` in one transaction, again on a fresh connection if the database
        went away (restart, failover), for up to `give_up_after_s`.

        For writes whose loss would cost more than a retry: the record of an attempt
        that already went out (callers pass the time left on their lease). `work` must be
        safe to run twice.
        """
        deadline = monotonic() + give_up_after_s
        tries = 0
        while True:
            try:
                with self.session(single_statement=single_statement) as session:
                    return work(session)
            except (OperationalError, DBAPIError) as exc:
                retryable = isinstance(exc, OperationalError) or exc.connection_invalidated
                left = deadline - monotonic()
                if not retryable or left <= 0:
                    raise
                # The last try is made at the deadline itself, not skipped because the
                # next step of the backoff would overshoot it.
                delay = min(RECONNECT_DELAYS_S[min(tries, len(RECONNECT_DELAYS_S) - 1)], left)
                tries += 1
                log.warning(
                    "database unavailable (%s); retrying in %.1fs", type(exc).__name__, delay
                )
                sleep(delay)

    def after_fork(self) -> None:
        """Drop the parent's pooled connections without closing them under the parent."""
        self.engine.dispose(close=False)

    def create_all(self) -> None:
        """Tables without migrations: for throwaway test databases only."""
        Base.metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
