"""What every backup provider adapter shares: the result of one send and the HTTP plumbing.

This module owns the vocabulary the caller sees (`BackupOutcome`, `BackupResult`,
`BackupProvider`), the classification and plain-words explanation of the answers that
mean the same at every provider (bad key, rate limit, provider trouble, timeouts), the
address and body helpers the adapters build their requests from, and `HttpBackupProvider`:
one reused `httpx.Client` per adapter, and an API key that never reaches a repr, a log
line, a result or an exception message.

Exactly-once is the caller's business (no provider offers an idempotency key): an adapter
sends once per call and says what happened, including when it cannot know.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import parseaddr, unquote
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx

from worker.message import OutgoingEmail

log = logging.getLogger(__name__)

USER_AGENT = "Outbox/0.1 (backup sender)"
#: Longest provider answer kept in `BackupResult.detail`.
DETAIL_MAX_CHARS = 300

#: Headers each adapter sets from the message's own fields; an extra header of the same
#: name would clash with them (or be refused by the provider), so it is left out.
OWN_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "message-id",
        # The provider stamps the submission time, as the account's server would.
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)


class BackupOutcome(StrEnum):
    """What the caller does next with the message."""

    SENT = "sent"  #: the provider accepted it: done
    RETRY = "retry"  #: transient (429, 5xx, timeout, network): try again later
    FAILED = "failed"  #: refused for good: sending it again the same way will not help


@dataclass(frozen=True)
class BackupResult:
    """One provider's answer to one send, classified and explained."""

    outcome: BackupOutcome
    provider: str  #: "sendgrid" | "postmark" | "mailgun"
    http_status: int | None  #: None when no HTTP answer came (timeout, connection error)
    provider_message_id: str | None
    #: The provider's answer, short (error message, ErrorCode + Message). Never the key.
    detail: str
    #: Plain words for people: what happened and what to do.
    explanation: str
    #: The cause is Outbox's own setup (API key, sender verification, API URL, account
    #: state at the provider): nothing goes through the backup until an operator fixes it.
    config_problem: bool = False
    #: No clear answer came, yet the provider may have accepted the message (the answer
    #: was lost to a read timeout or a dropped connection): sending it again may deliver
    #: it twice, since no provider lets Outbox deduplicate a send.
    maybe_delivered: bool = False

    @property
    def alert_operator(self) -> bool:
        """True when the caller should raise an operator alert, not just fail the message."""
        return self.outcome is BackupOutcome.FAILED and self.config_problem


@runtime_checkable
class BackupProvider(Protocol):
    """A backup provider's HTTP API, as the caller uses it."""

    name: str

    def send(self, email: OutgoingEmail, *, from_addr: str, reply_to: str | None) -> BackupResult:
        """Submit ``email`` once, from ``from_addr``; never raises for the provider's answer."""
        ...

    def close(self) -> None:
        """Release the HTTP connections."""
        ...


# --- addresses and content -------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[()<>@,;:\\".\[\]]')


_NAME_ADDR = re.compile(r"^\s*(?P<name>.*?)\s*<\s*(?P<addr>[^<>\s]+@[^<>\s]+)\s*>\s*$", re.S)


def split_address(address: str) -> tuple[str, str]:
    """``"Acme <a@acme.test>"`` -> ``("Acme", "a@acme.test")``; RFC 2047 names decoded.

    The JSON providers take the display name and the address apart; an encoded-word name
    (``=?utf-8?...?=``) is decoded so the provider does not encode it a second time.
    """
    match = _NAME_ADDR.match(address)
    if match:
        # Read "name <addr>" directly: parseaddr turns an unquoted comma in the name
        # ("Acme, Inc. <a@acme.test>") into the address "Acme".
        name, addr = unquote(match["name"]), match["addr"]
    else:
        name, addr = parseaddr(address)
    if "@" not in addr:
        # Addresses were validated at intake; keep what was given rather than mangle it.
        return "", address.strip()
    if "=?" in name:
        # An undecodable name is still a name: keep it as written.
        with contextlib.suppress(ValueError, LookupError):
            name = str(make_header(decode_header(name)))
    return name.strip(), addr


def format_address(name: str, addr: str) -> str:
    """``("Acme, Inc.", "a@acme.test")`` -> ``'"Acme, Inc." <a@acme.test>'``.

    Unlike `email.utils.formataddr` this leaves non-ASCII names as they are: the result
    goes into JSON or form fields, where the provider does the header encoding.
    """
    if not name:
        return addr
    if _NEEDS_QUOTES.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def with_quoted_name(address: str) -> str:
    """The address re-written with its display name quoted where punctuation needs it."""
    return format_address(*split_address(address))


def body_parts(email: OutgoingEmail) -> tuple[str | None, str | None]:
    """(text, html) to submit; empty parts are left out.

    All three providers refuse a message with no body at all, while `compose` sends an
    empty body over SMTP; a single space is the closest the providers accept.
    """
    text = email.text or None
    html = email.html or None
    if text is None and html is None:
        text = " "
    return text, html


def extra_headers(email: OutgoingEmail, *, also_skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The message's extra headers that a provider may carry, in the caller's order."""
    skip = OWN_HEADERS | {name.lower() for name in also_skip}
    return [(name, value) for name, value in email.headers if name.lower() not in skip]


# --- the HTTP adapter ------------------------------------------------------------------


class _Secret:
    """Holds the API key so that no repr, vars() dump or log line can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def normalize_base_url(base_url: str) -> str:
    """``https://host[/prefix]`` without a trailing slash; anything else is a ValueError."""
    raw = base_url.strip().rstrip("/")
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(
            f"OUTBOX_BACKUP_API_URL={base_url!r} is not an http(s) URL such as "
            "https://api.eu.mailgun.net."
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(
            "OUTBOX_BACKUP_API_URL must be a plain base URL (no credentials, query or "
            "fragment); the API key goes in OUTBOX_BACKUP_API_KEY."
        )
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        log.warning(
            "OUTBOX_BACKUP_API_URL uses plain http to %s: the API key travels unencrypted.",
            parts.hostname,
        )
    return raw


class HttpBackupProvider:
    """Base of the adapters: builds one request per send, posts it, classifies the answer.

    Subclasses set `name`, `display_name` and `default_base_url`, and implement
    `_post_message` (build and post the request) and `_interpret` (classify an answer).
    """

    # Set per class; annotated as plain attributes so the adapters satisfy the
    # `BackupProvider` protocol's ``name: str``.
    name: str
    display_name: str
    default_base_url: str
    #: Settings an operator checks when the provider cannot find the API address.
    url_settings: str = "OUTBOX_BACKUP_API_URL"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = 15.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise ValueError(f"{self.display_name} needs an API key: set OUTBOX_BACKUP_API_KEY.")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be greater than zero, not {timeout_s!r}.")
        self._api_key = _Secret(api_key.strip())
        self.base_url = normalize_base_url(base_url or self.default_base_url)
        self.timeout_s = timeout_s
        # One client per adapter, reused for every send: its connection pool keeps the
        # TLS session to the provider alive between messages.
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else httpx.Client(
                timeout=timeout_s, headers={"User-Agent": USER_AGENT}, follow_redirects=False
            )
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, timeout_s={self.timeout_s:g})"

    def __enter__(self) -> HttpBackupProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if this adapter made it; a client passed in stays open."""
        if self._owns_client:
            self._client.close()

    # -- sending ----------------------------------------------------------------------

    def send(self, email: OutgoingEmail, *, from_addr: str, reply_to: str | None) -> BackupResult:
        """Submit ``email`` once and classify the answer; transport errors become results."""
        try:
            response = self._post_message(email, from_addr=from_addr, reply_to=reply_to)
        except httpx.HTTPError as exc:
            result = self._transport_failure(exc)
        else:
            result = self._interpret(response)
        result = self._scrubbed(result)
        level = logging.INFO if result.outcome is BackupOutcome.SENT else logging.WARNING
        log.log(
            level,
            "backup %s: message %s %s (HTTP %s, provider id %s): %s",
            self.name,
            email.message_id,
            result.outcome.value,
            result.http_status,
            result.provider_message_id,
            result.detail,
        )
        return result

    def _post_message(
        self, email: OutgoingEmail, *, from_addr: str, reply_to: str | None
    ) -> httpx.Response:
        raise NotImplementedError

    def _interpret(self, response: httpx.Response) -> BackupResult:
        raise NotImplementedError

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        # The timeout is passed per request so that a client handed in by the caller
        # honours this adapter's timeout too.
        return self._client.post(self.base_url + path, timeout=self.timeout_s, **kwargs)

    # -- building results -------------------------------------------------------------

    def _result(
        self,
        outcome: BackupOutcome,
        status: int | None,
        detail: str,
        explanation: str,
        *,
        message_id: str | None = None,
        config_problem: bool = False,
        maybe_delivered: bool = False,
    ) -> BackupResult:
        return BackupResult(
            outcome=outcome,
            provider=self.name,
            http_status=status,
            provider_message_id=message_id,
            detail=detail,
            explanation=explanation,
            config_problem=config_problem,
            maybe_delivered=maybe_delivered,
        )

    def _sent(self, status: int, message_id: str | None, detail: str) -> BackupResult:
        return self._result(
            BackupOutcome.SENT,
            status,
            detail,
            f"{self.display_name}, the backup provider, accepted the message for delivery.",
            message_id=message_id,
        )

    def _failed(
        self, status: int | None, detail: str, explanation: str, *, config: bool = False
    ) -> BackupResult:
        return self._result(
            BackupOutcome.FAILED, status, detail, explanation, config_problem=config
        )

    def _retry(
        self, status: int | None, detail: str, explanation: str, *, maybe_delivered: bool = False
    ) -> BackupResult:
        return self._result(
            BackupOutcome.RETRY, status, detail, explanation, maybe_delivered=maybe_delivered
        )

    def _bad_key(self, status: int, detail: str) -> BackupResult:
        return self._failed(
            status,
            detail,
            f"{self.display_name}, the backup provider, rejected Outbox's API key: check "
            "OUTBOX_BACKUP_API_KEY (the key may be wrong, revoked, or for another account "
            "or region). No mail goes through the backup until it is fixed.",
            config=True,
        )

    def _unexpected_success(self, response: httpx.Response, detail: str) -> BackupResult:
        # A 2xx that does not look like the provider's own success answer: most likely
        # OUTBOX_BACKUP_API_URL points at something else. It may also be the provider
        # having changed its answer, so a retry could send twice: fail and alert instead.
        return self._result(
            BackupOutcome.FAILED,
            response.status_code,
            detail,
            f"The answer from {self.base_url} did not look like {self.display_name}'s "
            f"(HTTP {response.status_code} without a message id): check "
            f"{self.url_settings}. The message may or may not have been accepted.",
            config_problem=True,
            maybe_delivered=True,
        )

    def _by_status(self, response: httpx.Response, detail: str) -> BackupResult:
        """The meaning of an HTTP status that is the same at every provider."""
        status = response.status_code
        who = f"{self.display_name}, the backup provider,"
        if status == 401:
            return self._bad_key(status, detail)
        if status == 403:
            return self._failed(
                status,
                detail,
                f"{who} refused to let Outbox's API key send this mail: check the key's "
                "permissions at the provider and OUTBOX_BACKUP_API_KEY.",
                config=True,
            )
        if status in (404, 405):
            return self._failed(
                status,
                detail,
                f"{who} has no mail-sending API at {self.base_url}: check {self.url_settings}.",
                config=True,
            )
        if status == 413:
            return self._failed(
                status,
                detail,
                f"The message is larger than {self.display_name} accepts (attachments "
                "included): it cannot be sent through the backup as it is; send smaller "
                "attachments or a link to them.",
            )
        if status == 429:
            after = response.headers.get("Retry-After")
            return self._retry(
                status,
                detail + (f" (Retry-After: {after})" if after else ""),
                f"{who} is rate-limiting Outbox: the message waits and is sent again "
                "later. If this keeps happening, raise the sending limit of the plan.",
            )
        if status == 408:
            return self._retry(
                status,
                detail,
                f"{who} gave up waiting for Outbox's request: it is sent again later.",
            )
        if status >= 500:
            return self._retry(
                status,
                detail,
                f"{who} had trouble on its side (HTTP {status}): the message is sent again "
                "later; nothing to change in Outbox.",
                # A gateway timeout leaves the provider's backend possibly done with it.
                maybe_delivered=status == 504,
            )
        if 300 <= status < 400:
            return self._failed(
                status,
                detail,
                f"{self.base_url} redirected Outbox elsewhere instead of answering: check "
                f"{self.url_settings} (https, and the provider's API host).",
                config=True,
            )
        if 400 <= status < 500:
            return self._failed(
                status,
                detail,
                f"{who} refused the message: {detail}. It will not be accepted as it is; "
                "correct the message and send it again.",
            )
        return self._failed(
            status,
            detail,
            f"{who} gave an answer Outbox does not understand (HTTP {status}): check "
            f"{self.url_settings}.",
            config=True,
        )

    def _transport_failure(self, exc: httpx.HTTPError) -> BackupResult:
        """No HTTP answer: classify by how far the request got."""
        what = type(exc).__name__
        detail = f"{what}: {exc}" if str(exc) else what
        host = urlsplit(self.base_url).hostname
        if isinstance(exc, httpx.UnsupportedProtocol):
            return self._failed(
                None,
                detail,
                f"Outbox cannot speak to {self.base_url}: check {self.url_settings}.",
                config=True,
            )
        if isinstance(exc, httpx.LocalProtocolError):
            return self._failed(
                None,
                detail,
                f"Outbox could not put this message into a request to {self.display_name}: "
                f"{detail}. Sending it again will not help.",
            )
        if isinstance(exc, httpx.ReadTimeout):
            return self._retry(
                None,
                detail,
                f"{self.display_name}, the backup provider, did not answer within "
                f"{self.timeout_s:g} s: the message is sent again later. The provider may "
                "already have accepted it, so it could arrive twice.",
                maybe_delivered=True,
            )
        if isinstance(exc, httpx.TimeoutException):
            # Connect, write or pool timeout: the request never reached the provider whole.
            return self._retry(
                None,
                detail,
                f"Outbox could not reach {self.display_name} at {host} within "
                f"{self.timeout_s:g} s: the message is sent again later.",
            )
        if isinstance(exc, (httpx.ConnectError, httpx.ProxyError, httpx.WriteError)):
            return self._retry(
                None,
                detail,
                f"Outbox could not connect to {self.display_name} at {host} (network "
                f"trouble, or a wrong {self.url_settings}): the message is sent again later.",
            )
        # ReadError, RemoteProtocolError and the rest: the request went out but the
        # connection broke before a full answer came back.
        return self._retry(
            None,
            detail,
            f"The connection to {self.display_name} broke before it answered: the message "
            "is sent again later. The provider may already have accepted it, so it could "
            "arrive twice.",
            maybe_delivered=True,
        )

    def _scrubbed(self, result: BackupResult) -> BackupResult:
        """The result with the key cut out and the detail kept short, whatever came back."""
        key = self._api_key.reveal()

        def clean(text: str, limit: int | None = None) -> str:
            text = text.replace(key, "[redacted]")
            if limit is not None and len(text) > limit:
                text = text[: limit - 1] + "…"
            return text

        message_id = result.provider_message_id
        return BackupResult(
            outcome=result.outcome,
            provider=result.provider,
            http_status=result.http_status,
            provider_message_id=clean(message_id) if message_id is not None else None,
            detail=clean(" ".join(result.detail.split()), DETAIL_MAX_CHARS),
            explanation=clean(result.explanation),
            config_problem=result.config_problem,
            maybe_delivered=result.maybe_delivered,
        )


# --- reading answers -------------------------------------------------------------------


def json_body(response: httpx.Response) -> Any:
    """The answer's JSON, or None when it is not JSON (gateways answer with HTML)."""
    if not response.content:
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def text_body(response: httpx.Response) -> str:
    """The answer's body as short text, for a detail when it is not the expected JSON."""
    text = response.content[: DETAIL_MAX_CHARS * 2].decode("utf-8", "replace")
    text = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    return text or (response.reason_phrase or f"HTTP {response.status_code}")


def dict_body(response: httpx.Response) -> Mapping[str, Any]:
    """The answer's JSON object, or an empty mapping."""
    body = json_body(response)
    return body if isinstance(body, dict) else {}
