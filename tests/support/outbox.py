"""Small helpers tests use to arrange accounts and read back what Outbox recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from sqlalchemy import func, select

from standins.accounts import make_account
from standins.services import REPO, wait_until
from worker.clock import utcnow
from worker.crypto import SecretBox
from worker.store.accounts import AccountChanges, save_account
from worker.store.db import Database
from worker.store.models import Attempt, Message

#: A 24-hour window compressed to seconds, for tests that drive mail to its deadline.
COMPRESSED = {
    "OUTBOX_RETRY_WINDOW": "4",
    "OUTBOX_RETRY_BASE": "0.2",
    "OUTBOX_RETRY_MAX": "0.5",
    "OUTBOX_SWEEP_INTERVAL": "1",
    "OUTBOX_WAKE_GRACE": "1",
    "OUTBOX_SMTP_TIMEOUT": "1",
    "OUTBOX_LEASE": "6",
}


def wrong_password_account(
    db: Database, box: SecretBox, server: Any, ca_pem: str, name: str = "acme", **changes: Any
) -> int:
    """An account on the `smtp_server` fixture (STARTTLS, AUTH) with the wrong password:
    the server answers 535 and an incident opens on the account."""
    return make_account(
        db,
        box,
        name,
        port=server.port,
        smtp_username="acct",
        password="wrong",
        tls_mode="starttls",
        ca_pem=ca_pem,
        **changes,
    )


def update_account(db: Database, box: SecretBox, name: str, **changes: Any) -> Any:
    with db.session() as session:
        return save_account(
            session,
            name,
            AccountChanges(**changes),
            box=box,
            default_max_connections=2,
            now=utcnow(),
        )


def message(db: Database, message_id: int) -> Message:
    with db.session() as session:
        row = session.get(Message, message_id)
        assert row is not None
        session.expunge(row)
        return row


def status(db: Database, message_id: int) -> str:
    with db.session() as session:
        return session.scalar(select(Message.status).where(Message.id == message_id)) or "missing"


def attempts(db: Database, message_id: int) -> list[Attempt]:
    with db.session() as session:
        rows = list(
            session.scalars(
                select(Attempt).where(Attempt.message_id == message_id).order_by(Attempt.number)
            )
        )
        for row in rows:
            session.expunge(row)
        return rows


def count_messages(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Message)) or 0


def wait_for_status(
    db: Database, message_id: int, wanted: str | tuple[str, ...], *, timeout: float = 20.0
) -> str:
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    wait_until(
        lambda: status(db, message_id) in wanted,
        timeout=timeout,
        message=f"message {message_id} to be {wanted} (is {status(db, message_id)})",
    )
    return status(db, message_id)


def wait_for_attempts(db: Database, message_id: int, n: int, *, timeout: float = 20.0) -> None:
    wait_until(
        lambda: len(attempts(db, message_id)) >= n,
        timeout=timeout,
        message=f"{n} attempts of message {message_id}",
    )


def cli(env: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`outbox ARGS...` as a real process, with the test's environment (`Env`)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env={**os.environ, **env.values},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
