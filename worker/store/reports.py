"""Read models for people: one message's story, lists and per-account health."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from worker.replies import Reply, classify
from worker.store.models import Account, Attempt, Channel, Incident, MessageStatus, Priority
from worker.store.models import Message as MessageRow


def explain_stored(code: int | None, enhanced: str | None, text: str | None) -> dict[str, Any]:
    from worker.replies import parse_reply

    if code is None:
        reply = parse_reply(text or "")
    else:
        reply = Reply(code=code, enhanced=enhanced, text=text or "")
    return classify(reply).as_dict()


def message_story(session: Session, message_id: int, *, now: datetime) -> dict[str, Any] | None:
    row = session.get(MessageRow, message_id)
    if row is None:
        return None
    account = session.get(Account, row.account_id)
    assert account is not None
    attempts = list(
        session.scalars(
            select(Attempt).where(Attempt.message_id == row.id).order_by(Attempt.number)
        )
    )
    story: dict[str, Any] = {
        "id": row.id,
        "account": account.name,
        "status": row.status,
        "sent_via": row.sent_via,
        "message_id": row.message_id_header,
        "idempotency_key": row.idempotency_key,
        "from": row.from_addr,
        "to": row.to_addrs,
        "cc": row.cc_addrs,
        "bcc": row.bcc_addrs,
        "subject": row.subject,
        "created_at": row.created_at,
        "priority": Priority(row.priority).label,
        "send_at": row.send_at,
        "metadata": row.caller_metadata,
        "status_task": row.status_task,
        "deadline": row.deadline,
        "next_attempt_at": row.next_attempt_at
        if row.status == MessageStatus.PENDING.value
        else None,
        "finished_at": row.finished_at,
        "attempt_count": row.attempt_count,
        "being_sent": bool(row.lease_until and row.lease_until >= now),
        "recipients": row.delivered_to or {},
        "last_error": row.last_error,
        "why": None,
        "attempts": [
            {
                "number": a.number,
                "channel": a.channel,
                "started_at": a.started_at,
                "finished_at": a.finished_at,
                "outcome": a.outcome,
                "verdict": a.verdict,
                "stage": a.stage,
                "code": a.reply_code,
                "enhanced": a.enhanced_code,
                "server_text": a.server_text,
                "recipients": a.recipients,
                "provider_message_id": a.provider_message_id,
            }
            for a in attempts
        ],
    }
    last = next((a for a in reversed(attempts) if a.outcome != "sent"), None)
    if row.status in (MessageStatus.PENDING.value, MessageStatus.FAILED.value) and last is not None:
        if last.channel == Channel.SMTP.value and last.outcome != "interrupted":
            story["why"] = explain_stored(last.reply_code, last.enhanced_code, last.server_text)
        else:
            story["why"] = {
                "verdict": None,
                "meaning": last.server_text,
                "advice": None,
                "code": last.reply_code,
                "enhanced": None,
                "fallback": None,
            }
    refused = {
        addr: explain_stored(v.get("code"), v.get("enhanced"), v.get("text"))
        for addr, v in (row.delivered_to or {}).items()
        if v.get("outcome") == "refused"
    }
    story["refused"] = refused
    incident = session.scalar(
        select(Incident).where(Incident.account_id == account.id, Incident.closed_at.is_(None))
    )
    story["account_incident"] = (
        None
        if incident is None
        else {
            "opened_at": incident.opened_at,
            "reason": incident.reason,
            "last_reply": incident.last_reply,
        }
    )
    return story


def list_messages(
    session: Session,
    *,
    status: str | None = None,
    account: str | None = None,
    since: datetime | None = None,
    verdict: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    query = (
        select(
            MessageRow.id,
            Account.name,
            MessageRow.status,
            MessageRow.sent_via,
            MessageRow.to_addrs,
            MessageRow.subject,
            MessageRow.created_at,
            MessageRow.next_attempt_at,
            MessageRow.attempt_count,
            MessageRow.last_verdict,
            MessageRow.last_error,
            MessageRow.priority,
            MessageRow.send_at,
        )
        .join(Account, Account.id == MessageRow.account_id)
        .order_by(MessageRow.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(MessageRow.status == status)
    if account:
        query = query.where(Account.name == account)
    if since:
        query = query.where(MessageRow.created_at >= since)
    if verdict:
        query = query.where(MessageRow.last_verdict == verdict)
    return [
        {
            "id": r[0],
            "account": r[1],
            "status": r[2],
            "sent_via": r[3],
            "to": r[4],
            "subject": r[5],
            "created_at": r[6],
            "next_attempt_at": r[7] if r[2] == MessageStatus.PENDING.value else None,
            "attempts": r[8],
            "verdict": r[9],
            "last_error": r[10],
            "priority": Priority(r[11]).label,
            "send_at": r[12],
        }
        for r in session.execute(query)
    ]


def stats(
    session: Session, *, account: str | None = None, since: datetime | None = None, now: datetime
) -> list[dict[str, Any]]:
    """Per account: counts by status, by last verdict, oldest pending, fallback rate."""
    pending = MessageStatus.PENDING.value
    query = (
        select(
            Account.name,
            func.count(MessageRow.id),
            *[func.sum(case((MessageRow.status == s.value, 1), else_=0)) for s in MessageStatus],
            func.sum(case((MessageRow.sent_via == Channel.BACKUP.value, 1), else_=0)),
            func.min(case((MessageRow.status == pending, MessageRow.created_at), else_=None)),
        )
        .join(MessageRow, MessageRow.account_id == Account.id)
        .group_by(Account.name)
        .order_by(Account.name)
    )
    verdicts = (
        select(Account.name, MessageRow.last_verdict, func.count())
        .join(MessageRow, MessageRow.account_id == Account.id)
        .where(MessageRow.last_verdict.is_not(None))
        .group_by(Account.name, MessageRow.last_verdict)
    )
    if account:
        query = query.where(Account.name == account)
        verdicts = verdicts.where(Account.name == account)
    if since:
        query = query.where(MessageRow.created_at >= since)
        verdicts = verdicts.where(MessageRow.created_at >= since)
    by_verdict: dict[str, dict[str, int]] = {}
    for name, verdict, count in session.execute(verdicts):
        by_verdict.setdefault(name, {})[verdict] = int(count)
    out = []
    statuses = [s.value for s in MessageStatus]
    for row in session.execute(query):
        name, total = row[0], int(row[1])
        counts = {s: int(row[2 + i] or 0) for i, s in enumerate(statuses)}
        via_backup = int(row[2 + len(statuses)] or 0)
        oldest = row[3 + len(statuses)]
        if isinstance(oldest, str):  # SQLite returns MIN() of a datetime column as text
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            from datetime import UTC

            oldest = oldest.replace(tzinfo=UTC)
        sent = counts[MessageStatus.SENT.value]
        out.append(
            {
                "account": name,
                "total": total,
                **counts,
                "sent_via_backup": via_backup,
                "fallback_rate": round(via_backup / sent, 4) if sent else 0.0,
                "oldest_pending_s": round((now - oldest).total_seconds()) if oldest else None,
                "by_verdict": by_verdict.get(name, {}),
            }
        )
    return out


def statuses(session: Session, message_ids: list[int], *, now: datetime) -> list[dict[str, Any]]:
    """What became of each message, for a service polling by task name (`outbox.status`):
    one entry per id asked, in order; an id Outbox does not hold says so."""
    out: list[dict[str, Any]] = []
    for mid in message_ids:
        story = message_story(session, mid, now=now)
        if story is None:
            out.append({"id": mid, "status": "unknown", "reason": "no message with this id"})
            continue
        why = story["why"] or {}
        out.append(
            {
                "id": mid,
                "status": story["status"],
                "sent_via": story["sent_via"],
                "reason": story["last_error"] if story["status"] != "sent" else None,
                "meaning": why.get("meaning"),
                "advice": why.get("advice"),
                "next_attempt_at": story["next_attempt_at"].isoformat()
                if story["next_attempt_at"]
                else None,
                "attempts": story["attempt_count"],
                "metadata": story["metadata"] or {},
            }
        )
    return out
