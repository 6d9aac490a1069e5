"""An account on a stand-in SMTP server, in one call: for tests, the demo and the bench."""

from __future__ import annotations

from typing import Any

from worker.clock import utcnow
from worker.crypto import SecretBox
from worker.store.accounts import AccountChanges, save_account
from worker.store.db import Database


def make_account(
    db: Database, box: SecretBox, name: str, *, host: str = "127.0.0.1", port: int, **changes: Any
) -> int:
    changes.setdefault("from_addr", f"{name.title()} <noreply@{name}.example.com>")
    with db.session() as session:
        saved = save_account(
            session,
            name,
            AccountChanges(smtp_host=host, smtp_port=port, **changes),
            box=box,
            default_max_connections=2,
            now=utcnow(),
        )
    return saved.account_id


__all__ = ["make_account"]
