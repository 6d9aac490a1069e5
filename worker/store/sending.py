"""The SMTP path's two writes, each one round trip on PostgreSQL.

A delivery used to cost ten round trips: BEGIN, claim, account, slot, COMMIT, then
BEGIN, slot, message, attempt, COMMIT; waiting on them was the largest share of a worker
process's time (bench/README.md). On PostgreSQL each write is now one statement, run
without BEGIN/COMMIT (`Database.session(single_statement=True)`; one statement is atomic
by itself): the claim takes the message, reads its account and open incident and takes a
connection slot, in one data-modifying CTE; the record writes the message, the attempt
and the slot in another.

SQLite (the embedded default) has no data-modifying CTEs: there the same steps run one
after another in one transaction, with the same result. Both paths return the same
objects, so the engine never knows which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import (
    Boolean,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.store import accounts as account_store
from worker.store import slots
from worker.store.incidents import open_incident_id
from worker.store.messages import (
    ATTEMPT_FIELDS,
    CLAIM,
    EARLY_TOLERANCE_S,
    RECORD_VALUES,
    AttemptRecord,
    Claimed,
    MessageUpdate,
    NotClaimed,
    attempt_params,
    claim,
    claimed_from_row,
    record,
    record_params,
    why_not,
)
from worker.store.models import Account, Attempt, Message, MessageStatus, SmtpSlot, table

_ACCOUNTS = table(Account)
_SLOTS = table(SmtpSlot)
_MESSAGES = table(Message)
_ATTEMPTS = table(Attempt)


@dataclass(frozen=True)
class SendingAccount:
    """What a send needs of its account, as the claim read it."""

    id: int
    name: str
    smtp_host: str
    smtp_port: int
    smtp_username: str | None
    smtp_password_encrypted: str | None
    tls_mode: str
    ca_pem: str | None
    settings_version: int
    throttle_until: datetime | None
    throttle_level: int
    open_incident_id: int | None

    #: The `accounts` columns these fields are read from.
    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "name",
        "smtp_host",
        "smtp_port",
        "smtp_username",
        "smtp_password_encrypted",
        "tls_mode",
        "ca_pem",
        "settings_version",
        "throttle_until",
        "throttle_level",
    )

    @classmethod
    def from_row(cls, row: Any, prefix: str = "") -> SendingAccount:
        m = row._mapping
        return cls(
            **{name: m[prefix + name] for name in cls.COLUMNS},
            open_incident_id=m["open_incident_id"],
        )

    def throttled(self, now: datetime) -> bool:
        return self.throttle_until is not None and self.throttle_until > now


@dataclass(frozen=True)
class SendClaim:
    """A claimed message, its account, and the connection slot taken with it."""

    message: Claimed
    account: SendingAccount
    #: None when the account was throttled or had an open incident (the engine decides
    #: what then), the retry window was over, or every slot was busy.
    slot: int | None


def _may_take_slot(claimed: Claimed, account: SendingAccount, now: datetime) -> bool:
    """The claim takes a slot only for a message that may talk to the server at once."""
    throttled = account.throttled(now)
    return now < claimed.deadline and account.open_incident_id is None and not throttled


def _claim_in_one() -> Any:
    claimed = CLAIM.cte("claimed")
    claimed_account = select(claimed.c.account_id).scalar_subquery()
    account = (
        select(
            *_ACCOUNTS.c,
            open_incident_id(_ACCOUNTS.c.id).label("open_incident_id"),
        )
        .where(_ACCOUNTS.c.id == claimed_account)
        .cte("account")
    )
    now: Any = bindparam("p_now")
    slot = (
        slots.acquire_statement(claimed_account)
        .where(
            # _may_take_slot, in SQL.
            exists(select(1).select_from(claimed).where(claimed.c.deadline > now)),
            exists(
                select(1)
                .select_from(account)
                .where(
                    account.c.open_incident_id.is_(None),
                    or_(account.c.throttle_until.is_(None), account.c.throttle_until <= now),
                )
            ),
        )
        .cte("slot")
    )
    return select(
        *(c.label(f"m_{c.name}") for c in claimed.c),
        *(account.c[name].label(f"a_{name}") for name in SendingAccount.COLUMNS),
        account.c.open_incident_id,
        select(slot.c.slot).scalar_subquery().label("slot"),
    ).select_from(claimed.join(account, true()))


_CLAIM_IN_ONE = _claim_in_one()


class _Prefixed:
    """The `prefix`-named columns of a joined row, by attribute, without the prefix."""

    def __init__(self, row: Any, prefix: str) -> None:
        self._mapping = row._mapping
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[self._prefix + name]
        except KeyError:
            raise AttributeError(name) from None


def claim_for_send(
    session: Session,
    message_id: int,
    *,
    now: datetime,
    lease_s: float,
    token: str,
    holder: str,
) -> SendClaim | NotClaimed:
    """Take the message, read its account and open incident, take a connection slot."""
    lease_until = now + timedelta(seconds=lease_s)
    if session.get_bind().dialect.name == "postgresql":
        row = (
            session.connection()
            .execute(
                _CLAIM_IN_ONE,
                {
                    "p_id": message_id,
                    "p_now": now,
                    "p_due_by": now + timedelta(seconds=EARLY_TOLERANCE_S),
                    "p_lease_until": lease_until,
                    "p_token": token,
                    "p_holder": holder,
                    "p_slot_expires_at": lease_until,
                },
            )
            .one_or_none()
        )
        if row is None:
            return why_not(session, message_id, now=now)
        message = claimed_from_row(
            session, _Prefixed(row, "m_"), token=token, lease_until=lease_until
        )
        return SendClaim(message, SendingAccount.from_row(row, "a_"), row.slot)
    got = claim(session, message_id, now=now, lease_s=lease_s, token=token)
    if isinstance(got, NotClaimed):
        return got
    account = SendingAccount.from_row(account_store.for_sending(session, got.account_id))
    slot = None
    if _may_take_slot(got, account, now):
        slot = slots.acquire_slot(session, got.account_id, holder=holder, now=now, hold_s=lease_s)
    return SendClaim(got, account, slot)


def _record_in_one() -> Any:
    updated = (
        update(_MESSAGES)
        .where(_MESSAGES.c.id == bindparam("p_id"), _MESSAGES.c.lease_token == bindparam("p_token"))
        .values(RECORD_VALUES)
        .returning(_MESSAGES.c.id)
        .cte("updated")
    )
    # A plain INSERT: SQLAlchemy caches it, not its ON CONFLICT form. The one conflict
    # (the sweeper wrote this attempt as interrupted) fails the whole statement, and
    # `record_send` then writes it the transactional way.
    attempt = (
        insert(_ATTEMPTS)
        .values(
            {
                name: bindparam(f"a_{name}", type_=_ATTEMPTS.c[name].type)
                for name in ("message_id", "number", *ATTEMPT_FIELDS)
            }
        )
        .returning(_ATTEMPTS.c.id)
        .cte("attempt")
    )
    keep: Any = bindparam("p_keep_slot", type_=Boolean())
    slot = (
        update(_SLOTS)
        .where(
            _SLOTS.c.account_id == bindparam("p_account_id"),
            _SLOTS.c.holder == bindparam("p_holder"),
        )
        .values(
            holder=case((keep, _SLOTS.c.holder), else_=None),
            expires_at=case((keep, bindparam("p_slot_expires_at")), else_=None),
        )
        .returning(_SLOTS.c.slot)
        .cte("slot")
    )
    return select(
        select(func.count()).select_from(updated).scalar_subquery().label("owned"),
        select(func.count()).select_from(attempt).scalar_subquery().label("attempts"),
        select(func.count()).select_from(slot).scalar_subquery().label("slots"),
    )


_RECORD_IN_ONE = _record_in_one()


def record_send(
    session: Session,
    claimed: Claimed,
    attempt: AttemptRecord,
    update_: MessageUpdate,
    *,
    now: datetime,
    holder: str,
    keep_slot_s: float | None,
) -> bool:
    """`record_with_slot` in one statement, for a `single_statement` session.

    Returns whether the lease was still ours.
    """
    if session.get_bind().dialect.name == "postgresql":
        params = record_params(claimed, update_, now=now)
        params.update(
            {f"a_{k}": v for k, v in attempt_params(claimed, attempt).items()},
            p_account_id=claimed.account_id,
            p_holder=holder,
            p_keep_slot=keep_slot_s is not None,
            p_slot_expires_at=now + timedelta(seconds=keep_slot_s or 0.0),
        )
        try:
            owned = bool(session.connection().execute(_RECORD_IN_ONE, params).one().owned)
        except IntegrityError:
            # The sweeper wrote this attempt as interrupted meanwhile (the statement
            # changed nothing): the long way below lets the real result win.
            pass
        else:
            if owned or update_.status != MessageStatus.SENT.value:
                return owned
            # The lease was lost but the mail went out: `record` still writes it as sent.
    return record_with_slot(
        session, claimed, attempt, update_, now=now, holder=holder, keep_slot_s=keep_slot_s
    )


def record_with_slot(
    session: Session,
    claimed: Claimed,
    attempt: AttemptRecord,
    update_: MessageUpdate,
    *,
    now: datetime,
    holder: str,
    keep_slot_s: float | None,
) -> bool:
    """`messages.record`, and the connection slot kept for `keep_slot_s` (the connection
    stays open for reuse, and an idle connection still counts against the account's cap)
    or given back (None)."""
    owned = record(session, claimed, attempt, update_, now=now)
    if keep_slot_s is not None:
        slots.hold_slot(session, claimed.account_id, holder=holder, now=now, hold_s=keep_slot_s)
    else:
        slots.release_slot(session, claimed.account_id, holder=holder)
    return owned
