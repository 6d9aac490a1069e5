"""Accounts: each tenant's own SMTP server, with its password encrypted at rest."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from worker.crypto import SecretBox
from worker.intake import _Collector, normalize_address
from worker.smtp import TlsMode
from worker.store.db import changed_rows
from worker.store.errors import InvalidAccountSettings
from worker.store.incidents import open_incident_id
from worker.store.models import Account, Incident, MessageStatus, SmtpSlot, table
from worker.store.models import Message as MessageRow

#: Settings whose change means "the SMTP setup was corrected": pending mail goes out now.
SMTP_FIELDS = (
    "smtp_host",
    "smtp_port",
    "smtp_username",
    "password",
    "tls_mode",
    "ca_pem",
    "allow_plaintext",
)
MAX_CONNECTIONS_LIMIT = 50

_ACCOUNTS = table(Account)
#: What a send needs of its account, with the open incident's id (or NULL), built once:
#: it runs for every message.
_FOR_SENDING = select(
    *_ACCOUNTS.c, open_incident_id(_ACCOUNTS.c.id).label("open_incident_id")
).where(_ACCOUNTS.c.id == bindparam("p_id"))


def for_sending(session: Session, account_id: int) -> Row[Any]:
    """The account's columns (same names as `Account`) plus `open_incident_id`."""
    return session.connection().execute(_FOR_SENDING, {"p_id": account_id}).one()


@dataclass(frozen=True)
class AccountChanges:
    """What `outbox account set` asks for; None means "leave as it is"."""

    smtp_host: str | None = None
    smtp_port: int | None = None
    smtp_username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_mode: str | None = None
    allow_plaintext: bool | None = None
    ca_pem: str | None = field(default=None, repr=False)
    from_addr: str | None = None
    notify_email: str | None = None
    notify_webhook: str | None = None
    max_connections: int | None = None
    backup_verified: bool | None = None


@dataclass(frozen=True)
class AccountSaved:
    account_id: int
    created: bool
    smtp_changed: bool
    pending: int  #: pending messages of the account, woken at once when smtp_changed


def is_loopback(host: str) -> bool:
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _validate(changes: AccountChanges, existing: Account | None) -> None:
    errors = _Collector()
    if existing is None:
        if not changes.smtp_host:
            errors.add("host", "is required for a new account")
        if changes.smtp_port is None:
            errors.add("port", "is required for a new account")
    if changes.smtp_host is not None and (
        not changes.smtp_host.strip() or any(c in changes.smtp_host for c in " \r\n\x00/")
    ):
        errors.add("host", f"{changes.smtp_host!r} is not a host name or address")
    if changes.smtp_port is not None and not 1 <= changes.smtp_port <= 65535:
        errors.add("port", f"{changes.smtp_port} is not a TCP port (1-65535)")
    if changes.tls_mode is not None and changes.tls_mode not in {m.value for m in TlsMode}:
        errors.add("tls", f"{changes.tls_mode!r} must be one of starttls, tls, none")
    host = changes.smtp_host or (existing.smtp_host if existing else "")
    tls = changes.tls_mode or (existing.tls_mode if existing else TlsMode.STARTTLS.value)
    allow = changes.allow_plaintext
    if allow is None:
        allow = existing.allow_plaintext if existing else False
    if tls == TlsMode.NONE.value and not allow and not is_loopback(host):
        errors.add(
            "tls",
            f"'none' would send the password and mail unencrypted to {host}; it is allowed "
            "only for a loopback relay or with --allow-plaintext",
        )
    if changes.from_addr is not None and changes.from_addr != "":
        normalize_address(changes.from_addr, "from", errors)
    if changes.notify_email:
        normalize_address(changes.notify_email, "notify_email", errors)
    if changes.notify_webhook and not changes.notify_webhook.startswith(("http://", "https://")):
        errors.add("notify_webhook", "must be an http:// or https:// URL")
    if changes.max_connections is not None and not (
        1 <= changes.max_connections <= MAX_CONNECTIONS_LIMIT
    ):
        errors.add("max_connections", f"must be between 1 and {MAX_CONNECTIONS_LIMIT}")
    if changes.ca_pem is not None and changes.ca_pem and "BEGIN CERTIFICATE" not in changes.ca_pem:
        errors.add("ca", "is not a PEM certificate")
    if changes.smtp_username and any(c in changes.smtp_username for c in "\r\n\x00"):
        errors.add("username", "must not contain line breaks or NUL")
    if errors.errors:
        raise InvalidAccountSettings([(e.field, e.reason) for e in errors.errors])


def save_account(
    session: Session,
    name: str,
    changes: AccountChanges,
    *,
    box: SecretBox,
    default_max_connections: int,
    now: datetime,
) -> AccountSaved:
    """Create the account, or change only the given settings of an existing one.

    When SMTP settings change, every pending message of the account becomes due now
    (the next wake-up sends it) and its connection-cap slots are resized.
    """
    if not name or len(name) > 100 or any(c in name for c in "\r\n\x00"):
        raise InvalidAccountSettings([("name", "must be 1 to 100 printable characters")])
    account = session.scalar(select(Account).where(Account.name == name).with_for_update())
    _validate(changes, account)
    created = account is None
    if account is None:
        account = Account(
            name=name,
            smtp_host=changes.smtp_host,
            smtp_port=changes.smtp_port,
            tls_mode=TlsMode.STARTTLS.value,
            allow_plaintext=False,
            max_connections=default_max_connections,
            backup_verified=False,
            settings_version=1,
            created_at=now,
            updated_at=now,
        )
        session.add(account)
    smtp_changed = False
    simple = {
        "smtp_host": changes.smtp_host,
        "smtp_port": changes.smtp_port,
        "smtp_username": changes.smtp_username,
        "tls_mode": changes.tls_mode,
        "allow_plaintext": changes.allow_plaintext,
        "ca_pem": changes.ca_pem,
    }
    for attr, value in simple.items():
        if value is not None:
            value = value or None if isinstance(value, str) else value
            if getattr(account, attr) != value:
                setattr(account, attr, value)
                smtp_changed = True
    if changes.password is not None:
        account.smtp_password_encrypted = (
            box.encrypt(changes.password) if changes.password else None
        )
        smtp_changed = True
    for attr in ("from_addr", "notify_email", "notify_webhook"):
        value = getattr(changes, attr)
        if value is not None:
            setattr(account, attr, value or None)
    if changes.max_connections is not None:
        account.max_connections = changes.max_connections
    if changes.backup_verified is not None:
        account.backup_verified = changes.backup_verified
    account.updated_at = now
    if smtp_changed and not created:
        account.settings_version += 1
        account.throttle_until = None
        account.throttle_level = 0
    session.flush()
    _resize_slots(session, account)

    pending = 0
    if smtp_changed and not created:
        from worker.store.incidents import reopen_probe

        reopen_probe(session, account.id)
        pending = wake_account(session, account.id, now=now)
    return AccountSaved(account.id, created, smtp_changed and not created, pending)


def wake_account(session: Session, account_id: int, *, now: datetime) -> int:
    """Make every pending message of the account due now; returns how many."""
    result = session.execute(
        update(MessageRow)
        .where(
            MessageRow.account_id == account_id, MessageRow.status == MessageStatus.PENDING.value
        )
        .where((MessageRow.lease_until.is_(None)) | (MessageRow.lease_until < now))
        .values(next_attempt_at=now, due_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return changed_rows(result)


def pause(session: Session, account_id: int, *, until: datetime | None, level: int) -> None:
    """No new SMTP session for the account before `until` (None: resume now); `level`
    counts the slow-downs in a row (the next pause doubles with it)."""
    session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(throttle_until=until, throttle_level=level)
        .execution_options(synchronize_session=False)
    )


def _resize_slots(session: Session, account: Account) -> None:
    existing = (
        session.scalar(
            select(func.count()).select_from(SmtpSlot).where(SmtpSlot.account_id == account.id)
        )
        or 0
    )
    for slot in range(existing, account.max_connections):
        session.add(SmtpSlot(account_id=account.id, slot=slot))
    if existing > account.max_connections:
        session.execute(
            delete(SmtpSlot).where(
                SmtpSlot.account_id == account.id, SmtpSlot.slot >= account.max_connections
            )
        )
    session.flush()


def all_accounts(session: Session, *, for_update: bool = False) -> list[Account]:
    """Every account by name (locked for a change of all of them, e.g. a key rotation)."""
    query = select(Account).order_by(Account.name)
    return list(session.scalars(query.with_for_update() if for_update else query))


def accounts_with_open_incidents(session: Session) -> set[int]:
    return set(session.scalars(select(Incident.account_id).where(Incident.closed_at.is_(None))))


def account_by_id(session: Session, account_id: int) -> Account | None:
    return session.get(Account, account_id)


def get_account(session: Session, name: str) -> Account | None:
    return session.scalar(select(Account).where(Account.name == name))


def account_summary(session: Session, account: Account, *, now: datetime) -> dict[str, Any]:
    """What `outbox account show` prints: settings (never the password) and health."""
    counts: dict[str, int] = {
        status: count
        for status, count in session.execute(
            select(MessageRow.status, func.count())
            .where(MessageRow.account_id == account.id)
            .group_by(MessageRow.status)
        )
    }
    incident = session.scalar(
        select(Incident).where(Incident.account_id == account.id, Incident.closed_at.is_(None))
    )
    return {
        "name": account.name,
        "host": account.smtp_host,
        "port": account.smtp_port,
        "username": account.smtp_username,
        "password": "set" if account.smtp_password_encrypted else "not set",
        "tls": account.tls_mode,
        "allow_plaintext": account.allow_plaintext,
        "private_ca": bool(account.ca_pem),
        "from": account.from_addr,
        "notify_email": account.notify_email,
        "notify_webhook": account.notify_webhook,
        "max_connections": account.max_connections,
        "backup_verified": account.backup_verified,
        "messages": {s.value: int(counts.get(s.value, 0)) for s in MessageStatus},
        "incident": None
        if incident is None
        else {
            "opened_at": incident.opened_at.isoformat(),
            "verdict": incident.verdict,
            "reason": incident.reason,
            "last_reply": incident.last_reply,
            "notified": incident.notified_at is not None,
        },
        "updated_at": account.updated_at.isoformat(),
    }
