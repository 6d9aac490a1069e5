"""Signed webhooks: post each destination's due status events, batched, signed
(worker.webhook_signing), at least once and in order per message, with backoff.

A destination is held by one dispatcher at a time (a lease in the database); the events
are marked only after the receiver's 2xx, so a dispatcher killed mid-POST loses nothing:
the next one posts the same batch with the same `webhook-id`. A failing destination is
retried with exponential backoff until OUTBOX_EVENTS_RETRY_WINDOW has passed since it
started failing; then, or at once on `410 Gone`, it is disabled with an operator alert,
and its events wait in the table until the webhook is set again.

Incident notices to an account's `notify_webhook` travel the same way, one row each
(worker.store.notices): posted signed through the same `Poster`, retried with the same
backoff for the same window, given up on `410 Gone` or at the window's end with the same
alert; a notice is marked only after the 2xx, so a lost broker message loses nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from worker.clock import Clock, utcnow
from worker.crypto import SecretKeyError
from worker.notify import TOLD, Notice, build_notice
from worker.store import notices as notice_store
from worker.store import webhooks as store
from worker.store.db import Database
from worker.webhook_signing import sign

log = logging.getLogger("outbox.webhooks")

#: The POST body's schema version (README "Signed webhooks").
BODY_VERSION = 1
#: First retry after this long; each next one waits four times longer, up to the cap.
RETRY_BASE_S = 5.0
#: Longest wait between two tries of a failing destination.
RETRY_MAX_S = 2 * 3600.0
USER_AGENT = "outbox-webhooks/1"

#: resolve(host, port) -> the addresses the host resolves to.
Resolve = Callable[[str, int], list[str]]


def retry_delay_s(
    *, failures: int, base_s: float = RETRY_BASE_S, max_s: float = RETRY_MAX_S
) -> float:
    """Wait after the ``failures``-th failure in a row (1 for the first): 5 s, 20 s,
    80 s, ... up to 2 h — the shape of Standard Webhooks' example schedule."""
    if failures < 1:
        raise ValueError("failures must be >= 1")
    return min(max_s, base_s * 4 ** min(failures - 1, 32))


@dataclass(frozen=True)
class AfterFailure:
    """What follows a failed POST: when to try again, or why never again."""

    #: Failed POSTs in a row, this one included.
    failures: int
    #: The first failure of the run: the retry window's start.
    failing_since: datetime
    next_try_at: datetime | None
    #: Set when there is no next try: 410 Gone, or the retry window is over.
    give_up: str | None


def after_failure(
    *,
    gone: bool,
    failures: int,
    failing_since: datetime | None,
    now: datetime,
    window_s: float,
    what: str,
) -> AfterFailure:
    """The one rule for a failing webhook, of events or of notices: ``failures`` in a row
    before this one, ``failing_since`` (None: this is the first); ``what`` the receiver
    gets, for the 410 reason. Backoff as `retry_delay_s`, until ``window_s`` since the
    first failure has passed; on 410 Gone at once."""
    since = failing_since or now
    failures += 1
    if gone:
        reason = f"410 Gone: the receiver asked for no more {what}"
    elif (now - since).total_seconds() >= window_s:
        reason = f"failing for the whole retry window ({window_s / 3600:g} h)"
    else:
        next_try = now + timedelta(seconds=retry_delay_s(failures=failures))
        return AfterFailure(failures, since, next_try, None)
    return AfterFailure(failures, since, None, reason)


def resolve(host: str, port: int) -> list[str]:
    return sorted(
        {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    )


def forbidden_address(address: str) -> str | None:
    """Why a webhook may not be posted to ``address`` (private, loopback...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "not global"
    return None


class Refused(Exception):
    """The destination may not be posted to (SSRF guard); nothing was sent."""


@dataclass(frozen=True)
class PostResult:
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


class Poster:
    """One signed POST: the SSRF guard at every delivery, no redirects followed."""

    def __init__(
        self,
        *,
        http: httpx.Client,
        secrets: Sequence[str],
        allow_private: bool,
        resolver: Resolve = resolve,
        clock: Clock = utcnow,
    ) -> None:
        self.http = http
        self.secrets = tuple(secrets)
        self.allow_private = allow_private
        self.resolver = resolver
        self.clock = clock

    def guard(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" and not self.allow_private:
            raise Refused(f"{url}: plain http is refused (OUTBOX_EVENTS_ALLOW_PRIVATE=1 allows it)")
        if self.allow_private:
            return
        host = parts.hostname or ""
        try:
            addresses = self.resolver(host, parts.port or 443)
        except OSError as exc:
            raise Refused(f"{url}: {host} does not resolve ({exc})") from None
        for address in addresses:
            why = forbidden_address(address)
            if why:
                raise Refused(
                    f"{url}: {host} resolves to {address} ({why}); webhooks go only to "
                    "public addresses unless OUTBOX_EVENTS_ALLOW_PRIVATE=1"
                )

    def post(
        self, url: str, body: bytes, *, webhook_id: str, secrets: Sequence[str] | None = None
    ) -> PostResult:
        try:
            self.guard(url)
        except Refused as exc:
            return PostResult(None, f"refused: {exc}")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **sign(
                self.secrets if secrets is None else secrets,
                webhook_id=webhook_id,
                timestamp=int(self.clock().timestamp()),
                body=body,
            ),
        }
        try:
            response = self.http.post(url, content=body, headers=headers, follow_redirects=False)
        except httpx.HTTPError as exc:
            return PostResult(None, f"{type(exc).__name__}: {exc}"[:500])
        if 300 <= response.status_code < 400:
            return PostResult(
                response.status_code,
                f"answered {response.status_code} (redirects are not followed)",
            )
        if not 200 <= response.status_code < 300:
            return PostResult(
                response.status_code, f"answered {response.status_code}: {response.text[:200]}"
            )
        return PostResult(response.status_code, None)


def webhook_id(first_event_id: str, last_event_id: str, count: int) -> str:
    """Stable for a batch posted again (same first and last event): receivers dedupe."""
    digest = hashlib.sha256(f"{first_event_id}.{last_event_id}.{count}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def notice_webhook_id(incident_id: int, kind: str) -> str:
    """One id per notice, the same at every retry (and as before notices had rows)."""
    return f"msg_incident_{incident_id}_{kind}"


def body_of(events: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"type": "outbox.events", "version": BODY_VERSION, "events": events},
        separators=(",", ":"),
        default=str,
    ).encode()


class Dispatcher:
    """Posts every due destination's events, batch after batch."""

    def __init__(
        self,
        db: Database,
        poster: Poster,
        *,
        decrypt: Callable[[str], str],
        global_url: str | None,
        batch: int = 100,
        window_s: float = 24 * 3600.0,
        lease_s: float = 35.0,
        clock: Clock = utcnow,
        backup_configured: bool = False,
    ) -> None:
        #: How long a dispatcher holds a destination without renewing it (renewed before
        #: each POST; longer than a POST's timeout), so a dead one's is free soon after.
        self.lease_s = lease_s
        self.db = db
        self.poster = poster
        self.decrypt = decrypt
        self.global_url = global_url
        self.batch = batch
        self.window_s = window_s
        self.clock = clock
        #: Whether mail past the window goes to a backup provider: what a notice promises.
        self.backup_configured = backup_configured
        #: The global destination follows OUTBOX_EVENTS_WEBHOOK, read at start: set once.
        self._global_ensured = False

    def run(
        self, *, max_destinations: int = 100, max_batches: int = 20, max_notices: int = 100
    ) -> int:
        """Deliver what is due: the incident notices first (few, and each one matters to
        a person), then the events. Returns how many notices and events were delivered."""
        total = self._post_notices(max_notices=max_notices)
        if not self._global_ensured:  # the setting is this process's: once is enough
            with self.db.session() as session:
                store.ensure_global(session, self.global_url)
            self._global_ensured = True
        served: set[int] = set()
        for _ in range(max_destinations):
            with self.db.session() as session:
                dest = store.claim_next(
                    session, now=self.clock(), lease_s=self.lease_s, skip=served
                )
            if dest is None:
                break
            served.add(dest.id)
            total += self._drain(dest, max_batches=max_batches)
        return total

    def _drain(self, dest: store.Claimed, *, max_batches: int) -> int:
        secrets = (
            [self.decrypt(dest.secret_encrypted)]
            if dest.secret_encrypted
            else list(self.poster.secrets)
        )
        total = 0
        for _ in range(max_batches):
            with self.db.session() as session:
                due = store.due_events(session, dest, limit=self.batch)
                if due:
                    until = self.clock() + timedelta(seconds=self.lease_s)
                    store.renew(session, dest.id, until=until)
            if not due:
                break
            events = [d.event for d in due]
            hook_id = webhook_id(events[0]["id"], events[-1]["id"], len(events))
            result = self.poster.post(
                dest.url, body_of(events), webhook_id=hook_id, secrets=secrets
            )
            if not result.ok:
                self._failed(dest, result)
                return total
            with self.db.session() as session:
                store.delivered(session, dest.id, [d.row_id for d in due], now=self.clock())
            total += len(due)
            dest = store.Claimed(**{**dest.__dict__, "failures": 0, "failing_since": None})
        with self.db.session() as session:
            store.release(session, dest.id)
        return total

    def _failed(self, dest: store.Claimed, result: PostResult) -> None:
        now = self.clock()
        then, error = self._next_step(
            result,
            failures=dest.failures,
            failing_since=dest.failing_since,
            now=now,
            what="events",
            subject=f"webhook {dest.url} of {dest.key}",
            ends="disabled",
            extra={"destination": dest.key},
        )
        with self.db.session() as session:
            store.failed(
                session,
                dest.id,
                error=error,
                failing_since=then.failing_since,
                failures=then.failures,
                next_try_at=then.next_try_at,
                disabled_reason=then.give_up,
                now=now,
            )

    def _next_step(
        self,
        result: PostResult,
        *,
        failures: int,
        failing_since: datetime | None,
        now: datetime,
        what: str,
        subject: str,
        ends: str,
        extra: dict[str, Any],
    ) -> tuple[AfterFailure, str]:
        """After a failed POST (``subject``: "webhook <url> of <whom>"), when to try again
        (`after_failure`), logged; at the end (``ends``: "disabled", "given up"), the
        operator alert. Returns it with the error to record."""
        error = result.error or f"answered {result.status}"
        then = after_failure(
            gone=result.gone,
            failures=failures,
            failing_since=failing_since,
            now=now,
            window_s=self.window_s,
            what=what,
        )
        if then.give_up:
            log.error(
                "%s %s: %s; last error: %s",
                subject,
                ends,
                then.give_up,
                error,
                extra={"event": "webhook_disabled", "reason": then.give_up, **extra},
            )
        else:
            log.warning(
                "%s failed (%s); try %d again at %s",
                subject,
                error,
                then.failures + 1,
                then.next_try_at.isoformat() if then.next_try_at else None,
                extra={"event": "webhook_failed", **extra},
            )
        return then, error

    def _post_notices(self, *, max_notices: int) -> int:
        """Post the due incident notices, each once; returns how many were posted."""
        posted = 0
        seen: set[int] = set()
        for _ in range(max_notices):
            with self.db.session() as session:
                claimed = notice_store.claim_due_notice(
                    session, now=self.clock(), lease_s=self.lease_s, skip=seen
                )
                if claimed is None:
                    return posted
                notice = build_notice(
                    session,
                    claimed.incident_id,
                    claimed.kind,
                    backup_configured=self.backup_configured,
                )
            seen.add(claimed.id)
            if notice is None or not notice.webhook:
                # No webhook to post to (removed since, or never set: the notice went
                # by email or to the log, `outbox.notify`): settled, not a failure.
                with self.db.session() as session:
                    notice_store.give_up(
                        session,
                        claimed.id,
                        reason=notice_store.NO_NOTIFY_WEBHOOK,
                        now=self.clock(),
                    )
                continue
            posted += self._post_notice(claimed, notice)
        return posted

    def _post_notice(self, claimed: notice_store.ClaimedNotice, notice: Notice) -> int:
        """One notice, signed like the account's events; 1 if the receiver took it."""
        assert notice.webhook
        try:
            secrets = [self.decrypt(notice.secret_encrypted)] if notice.secret_encrypted else None
        except SecretKeyError as exc:
            # A lost or rotated key: retried (the key may come back), then given up with
            # the alert, rather than failing every dispatcher run from here on.
            result = PostResult(None, f"the account's events secret: {exc}")
        else:
            result = self.poster.post(
                notice.webhook,
                json.dumps(notice.payload, separators=(",", ":")).encode(),
                webhook_id=notice_webhook_id(claimed.incident_id, claimed.kind),
                secrets=secrets,
            )
        if not result.ok:
            self._notice_failed(claimed, notice, result)
            return 0
        with self.db.session() as session:
            notice_store.posted(session, claimed.id, now=self.clock())
        log.info(
            "account %s was told %s (by webhook)",
            notice.account,
            TOLD[claimed.kind],
            extra={
                "event": "notice",
                "kind": claimed.kind,
                "account": notice.account,
                "incident_id": claimed.incident_id,
            },
        )
        return 1

    def _notice_failed(
        self, claimed: notice_store.ClaimedNotice, notice: Notice, result: PostResult
    ) -> None:
        now = self.clock()
        then, error = self._next_step(
            result,
            failures=claimed.failures,
            failing_since=claimed.failing_since,
            now=now,
            what="notices",
            subject=(
                f"notify webhook {notice.webhook} of account {notice.account} (the "
                f"{claimed.kind} notice of incident {claimed.incident_id})"
            ),
            ends="given up",
            extra={
                "destination": f"notify:{notice.account}",
                "account": notice.account,
                "incident_id": claimed.incident_id,
                "kind": claimed.kind,
            },
        )
        with self.db.session() as session:
            notice_store.failed(
                session,
                claimed.id,
                error=error,
                failing_since=then.failing_since,
                failures=then.failures,
                next_try_at=then.next_try_at,
                given_up_reason=then.give_up,
                now=now,
            )


__all__ = [
    "BODY_VERSION",
    "AfterFailure",
    "Dispatcher",
    "PostResult",
    "Poster",
    "Refused",
    "after_failure",
    "body_of",
    "forbidden_address",
    "notice_webhook_id",
    "resolve",
    "retry_delay_s",
    "webhook_id",
]
