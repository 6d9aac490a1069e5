"""Count what really reached a receiver, per Message-ID, and check it against the database.

The database says what Outbox *thinks* happened; the scripted SMTP servers and the
provider stubs say what was actually delivered (acknowledged with a 2xx). A message is
lost when the database calls it sent (or it is still pending at the end) and no receiver
has it; it is a duplicate when a receiver has it more than once.

Every duplicate must be explained by a documented window: an ``interrupted`` attempt
(the worker died or lost its lease between the server's 250 and recording it), or a
backup attempt that timed out (the provider accepted a request whose answer never came).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from standins.provider import ProviderStub
from standins.smtp import ScriptedSMTPServer
from worker.store.db import Database
from worker.store.models import Attempt, Message


def _norm(message_id: str | None) -> str:
    return (message_id or "").strip()


def smtp_deliveries(servers: Iterable[ScriptedSMTPServer]) -> Counter[str]:
    """Message-ID -> copies acknowledged (2xx after DATA) by the SMTP servers."""
    counts: Counter[str] = Counter()
    for server in servers:
        counts.update(_norm(m) for m in server.message_ids())
    return counts


def backup_deliveries(stubs: Iterable[ProviderStub]) -> Counter[str]:
    """Message-ID -> requests the provider stubs accepted (answered 2xx)."""
    counts: Counter[str] = Counter()
    for stub in stubs:
        counts.update(_norm(r.message_id()) for r in stub.deliveries())
    return counts


@dataclass
class MessageFacts:
    id: int
    header: str
    status: str
    sent_via: str | None
    lease_until: Any
    attempts: list[tuple[str, str, int | None, str | None]]  #: (channel, outcome, code, text)

    @property
    def interrupted(self) -> int:
        return sum(1 for a in self.attempts if a[1] == "interrupted")

    @property
    def backup_timeouts(self) -> int:
        """Backup attempts that ended without an HTTP answer (timeout, dropped connection)."""
        return sum(1 for a in self.attempts if a[0] == "backup" and a[2] is None)

    def smtp_attempts(self) -> int:
        return sum(1 for a in self.attempts if a[0] == "smtp")

    def backup_attempts(self) -> int:
        return sum(1 for a in self.attempts if a[0] == "backup")


def load_facts(db: Database, ids: Iterable[int] | None = None) -> dict[int, MessageFacts]:
    """Status and attempt history of every message (or of `ids`), in two queries."""
    wanted = set(ids) if ids is not None else None
    facts: dict[int, MessageFacts] = {}
    with db.session() as session:
        query = select(
            Message.id,
            Message.message_id_header,
            Message.status,
            Message.sent_via,
            Message.lease_until,
        )
        for mid, header, status, via, lease in session.execute(query):
            if wanted is None or mid in wanted:
                facts[mid] = MessageFacts(mid, _norm(header), status, via, lease, [])
        rows = session.execute(
            select(
                Attempt.message_id,
                Attempt.channel,
                Attempt.outcome,
                Attempt.reply_code,
                Attempt.server_text,
            ).order_by(Attempt.message_id, Attempt.number)
        )
        for mid, channel, outcome, code, text in rows:
            if mid in facts:
                facts[mid].attempts.append((channel, outcome, code, text))
    return facts


@dataclass
class Verdict:
    """Lost, duplicated and unexplained messages, from the receivers' and the DB's view."""

    messages: int
    statuses: Counter[str]
    #: Accepted messages that ended `sent` (or are still pending) but no receiver has.
    lost: list[int] = field(default_factory=list)
    #: Messages the database calls failed/cancelled that a receiver nevertheless has.
    delivered_but_not_sent: list[int] = field(default_factory=list)
    #: message id -> copies received, for every message received more than once.
    duplicated: dict[int, int] = field(default_factory=dict)
    #: Duplicates no documented window explains.
    unexplained: dict[int, int] = field(default_factory=dict)
    #: Copies received of Message-IDs the database does not know.
    strangers: int = 0

    @property
    def duplicates(self) -> int:
        """Extra copies: a message received 3 times counts 2."""
        return sum(n - 1 for n in self.duplicated.values())

    def summary(self) -> str:
        return (
            f"messages={self.messages} statuses={dict(self.statuses)} lost={len(self.lost)} "
            f"duplicates={self.duplicates} (messages={len(self.duplicated)}, "
            f"unexplained={len(self.unexplained)}) delivered_but_not_sent="
            f"{len(self.delivered_but_not_sent)} strangers={self.strangers}"
        )


def judge(
    db: Database,
    *,
    servers: Iterable[ScriptedSMTPServer] = (),
    stubs: Iterable[ProviderStub] = (),
    ids: Iterable[int] | None = None,
) -> Verdict:
    """Compare the receivers' copies with the database's story of each message."""
    facts = load_facts(db, ids)
    received = smtp_deliveries(servers) + backup_deliveries(stubs)
    by_header = {f.header: f for f in facts.values()}
    verdict = Verdict(messages=len(facts), statuses=Counter(f.status for f in facts.values()))
    for header, copies in received.items():
        if header not in by_header:
            verdict.strangers += copies
    for fact in facts.values():
        copies = received.get(fact.header, 0)
        if fact.status in ("sent", "pending") and copies == 0:
            verdict.lost.append(fact.id)
        if fact.status in ("failed", "cancelled") and copies:
            verdict.delivered_but_not_sent.append(fact.id)
        if copies > 1:
            verdict.duplicated[fact.id] = copies
            if copies - 1 > fact.interrupted + fact.backup_timeouts:
                verdict.unexplained[fact.id] = copies
    return verdict
