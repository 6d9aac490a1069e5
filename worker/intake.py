"""The door: validate a request to send mail, then store it once.

Every door (the Python client, the `outbox.enqueue` task, the CLI) goes through
`validate_request`, so all refuse the same bad input with the same sentence naming the
field. Nothing is stored unless the whole request is valid.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formataddr
from typing import Any, TypeGuard

from email_validator import EmailNotValidError, validate_email

from worker.message import Attachment

#: The fields of the `outbox.enqueue` contract (schema version 1).
REQUEST_FIELDS = frozenset(
    {
        "account",
        "to",
        "cc",
        "bcc",
        "reply_to",
        "from_addr",
        "subject",
        "text",
        "html",
        "headers",
        "attachments",
        "idempotency_key",
        "priority",
        "send_at",
        "metadata",
        "status_task",
        "status_queue",
    }
)
#: The largest `metadata` object, as compact JSON (it travels in every event).
MAX_METADATA_BYTES = 4096
#: A Celery task or queue name: what `status_task` / `status_queue` may be.
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,199}")
#: `priority` values, in the order an account's mail is sent (worker.store.models.Priority).
PRIORITIES = ("high", "normal", "bulk")
#: The most requests one `enqueue_many` call may carry.
MAX_BATCH_REQUESTS = 1000
#: Headers Outbox writes itself; a caller may not set or override them.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "sender",
        "return-path",
        "received",
    }
)
#: RFC 5322 §2.1.1: a line must not exceed 998 characters.
MAX_HEADER_CHARS = 998
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_HEADERS = 50
MAX_ATTACHMENTS = 50
# Whole-string matches (fullmatch): `$` alone would let a trailing newline through.
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ':' (RFC 5322 ftext)
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
#: NUL and every character Python's `str.splitlines` (and so the `email` package) treats
#: as a line break: in a header, each would start a new header line.
_FORBIDDEN_IN_HEADER = re.compile("[\x00\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
#: Errors reported per list field; past this, one line says how many more there were.
MAX_ERRORS_PER_LIST = 10


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class InvalidRequest(ValueError):
    """The request was refused; nothing was stored. `errors` names each bad field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    def as_dict(self) -> dict[str, Any]:
        return {
            "error": "invalid_request",
            "message": str(self),
            "fields": [{"field": e.field, "reason": e.reason} for e in self.errors],
        }


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 25 * 1024 * 1024
    max_recipients: int = 100
    #: How far ahead `send_at` may lie (OUTBOX_SEND_AT_HORIZON).
    send_at_horizon_s: float = 30 * 86400.0


@dataclass(frozen=True)
class EmailRequest:
    """A request that passed validation; addresses normalised."""

    account: str
    to: tuple[str, ...]
    subject: str
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: str | None = None
    from_addr: str | None = None
    text: str | None = None
    html: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = field(default=(), repr=False)
    idempotency_key: str | None = None
    size_bytes: int = 0
    #: The rank of `priority` (0 high, 1 normal, 2 bulk).
    priority: int = 1
    #: Not sent before this (aware UTC); None: at once.
    send_at: datetime | None = None
    #: The caller's own keys (an invoice id), returned in every event about this mail.
    metadata: dict[str, Any] | None = None
    #: A task of the caller's that receives this mail's events, by name (and its queue).
    status_task: str | None = None
    status_queue: str | None = None


class _Collector:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, name: str, reason: str) -> None:
        self.errors.append(FieldError(name, reason))


def _is_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str)


def _check_text_value(errors: _Collector, name: str, value: str, *, header: bool) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        errors.add(name, "is not valid UTF-8 text (it holds unpaired surrogates)")
        return False
    if header and _FORBIDDEN_IN_HEADER.search(value):
        errors.add(name, "must not contain line breaks (CR, LF or other separators) or NUL")
        return False
    if not header and "\x00" in value:
        errors.add(name, "must not contain NUL characters")
        return False
    if header and len(value) > MAX_HEADER_CHARS:
        errors.add(name, f"is longer than {MAX_HEADER_CHARS} characters")
        return False
    return True


def normalize_address(value: Any, name: str, errors: _Collector) -> str | None:
    """One address, optionally with a display name, or None with an error recorded."""
    if not _is_str(value):
        errors.add(name, f"must be a string address, not {type(value).__name__}")
        return None
    if not _check_text_value(errors, name, value, header=True):
        return None
    candidate = value.strip()
    if not candidate:
        errors.add(name, "is empty")
        return None
    try:
        display_name, address = parse_address(candidate)
    except EmailNotValidError as exc:
        errors.add(name, f"{candidate!r} is not a valid email address ({exc})")
        return None
    if display_name:
        return formataddr((display_name, address))
    return address


#: Special-use names (RFC 6761, 6762, 7686, 8375) that email-validator refuses because
#: they are not globally routable, although a private relay is exactly where they are
#: delivered: `user@corp.local`, `bob@shop.test`, `a@localhost`, `x@home.arpa`. Only the
#: account's own relay can say whether such an address exists. Any other special-use
#: name (`.invalid`, reserved never to resolve, and whatever email-validator adds) is
#: still refused.
RELAYED_SPECIAL_USE = frozenset({"arpa", "local", "localhost", "onion", "test"})

#: A domain's last label at the end of an address, `Name <a@b.local>` included.
_LAST_LABEL = re.compile(r"(?<=[@.])([A-Za-z]+)(>?)$")


def parse_address(candidate: str) -> tuple[str | None, str]:
    """`(display name, normalized address)` of any syntactically valid address, or
    EmailNotValidError saying what is wrong.

    Dotless domains (`a@localhost`, `bob@mailhost`) are valid SMTP (RFC 5321) and are
    accepted; a domain ending in a number (`a@1.2.3.4`) is not a name and is refused.
    email-validator has no per-call switch for its special-use list (changing the
    module-wide list would change it for every library in the process), so a relayed
    special-use last label is validated as a stand-in label of the same length (the
    length limits stay exact) and put back into the result.
    """
    special = None
    match = _LAST_LABEL.search(candidate)
    if match and match.group(1).lower() in RELAYED_SPECIAL_USE:
        special = match.group(1).lower()
        stand_in = "x" * len(special)
        candidate = candidate[: match.start(1)] + stand_in + match.group(2)
    result = validate_email(
        candidate,
        check_deliverability=False,
        globally_deliverable=False,
        allow_display_name=True,
        allow_smtputf8=True,
    )
    address = result.normalized
    if special is not None:
        address = address[: -len(special)] + special
    last_label = address.rsplit("@", 1)[1].rsplit(".", 1)[-1]
    if last_label.isdigit():
        raise EmailNotValidError(
            "The part after the @-sign ends in a number, so it is not a domain name."
        )
    return result.display_name or None, address


def _address_list(
    payload: Mapping[str, Any], key: str, errors: _Collector, *, limit: int
) -> tuple[str, ...]:
    value = payload.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        errors.add(key, f"must be a list of addresses, not {type(value).__name__}")
        return ()
    if len(value) > limit:
        # Refused before validating thousands of addresses one by one.
        errors.add(key, f"has {len(value):,} addresses; at most {limit} in to/cc/bcc together")
        return ()
    out = []
    local = _Collector()
    for index, item in enumerate(value):
        address = normalize_address(item, f"{key}[{index}]", local)
        if address is not None:
            out.append(address)
    errors.errors.extend(local.errors[:MAX_ERRORS_PER_LIST])
    if len(local.errors) > MAX_ERRORS_PER_LIST:
        errors.add(key, f"and {len(local.errors) - MAX_ERRORS_PER_LIST} more invalid addresses")
    return tuple(out)


def _optional_str(
    payload: Mapping[str, Any], key: str, errors: _Collector, *, header: bool
) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not _is_str(value):
        errors.add(key, f"must be a string, not {type(value).__name__}")
        return None
    if not _check_text_value(errors, key, value, header=header):
        return None
    return value


def _headers(payload: Mapping[str, Any], errors: _Collector) -> tuple[tuple[str, str], ...]:
    value = payload.get("headers")
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = []
        for index, item in enumerate(value):
            if isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                errors.add(f"headers[{index}]", "must be a [name, value] pair")
    else:
        errors.add("headers", f"must be an object of name: value, not {type(value).__name__}")
        return ()
    if len(pairs) > MAX_HEADERS:
        errors.add("headers", f"has {len(pairs)} entries; at most {MAX_HEADERS} are accepted")
        return ()
    out = []
    for name, header_value in pairs:
        label = f"headers[{name!r}]"
        if not _is_str(name) or not _FIELD_NAME.fullmatch(name) or len(name) > 76:
            errors.add(label, "is not a valid header name (printable ASCII without ':' or spaces)")
            continue
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("content-"):
            errors.add(label, "is set by Outbox itself; use the matching field instead")
            continue
        if not _is_str(header_value):
            errors.add(label, f"value must be a string, not {type(header_value).__name__}")
            continue
        if _check_text_value(errors, label, header_value, header=True):
            out.append((name, header_value))
    return tuple(out)


def _attachments(payload: Mapping[str, Any], errors: _Collector) -> tuple[Attachment, ...]:
    value = payload.get("attachments")
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        errors.add("attachments", f"must be a list, not {type(value).__name__}")
        return ()
    if len(value) > MAX_ATTACHMENTS:
        errors.add("attachments", f"has {len(value)} files; at most {MAX_ATTACHMENTS}")
        return ()
    out = []
    for index, item in enumerate(value):
        label = f"attachments[{index}]"
        if isinstance(item, Attachment):
            item = {"filename": item.filename, "content_type": item.content_type, "data": item.data}
        if not isinstance(item, Mapping):
            errors.add(label, "must be an object with filename, content_type and content")
            continue
        unknown = set(item) - {"filename", "content_type", "content", "data"}
        if unknown:
            errors.add(label, f"has unknown fields: {', '.join(sorted(unknown))}")
            continue
        filename = item.get("filename")
        content_type = item.get("content_type") or "application/octet-stream"
        if not _is_str(filename) or not filename.strip():
            errors.add(f"{label}.filename", "is required")
            continue
        if not _check_text_value(errors, f"{label}.filename", filename, header=True):
            continue
        if "/" in filename or "\\" in filename or len(filename) > 255:
            errors.add(f"{label}.filename", "must be a plain file name (no path, at most 255)")
            continue
        if not _is_str(content_type) or not _CONTENT_TYPE.fullmatch(content_type):
            errors.add(f"{label}.content_type", f"{content_type!r} is not a MIME type")
            continue
        data = item.get("data")
        if data is None:
            content = item.get("content")
            if not _is_str(content):
                errors.add(f"{label}.content", "is required: the file's bytes, base64-encoded")
                continue
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                errors.add(f"{label}.content", "is not valid base64")
                continue
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            errors.add(f"{label}.data", f"must be bytes, not {type(data).__name__}")
            continue
        out.append(Attachment(filename=filename, content_type=content_type, data=bytes(data)))
    return tuple(out)


def _priority(payload: Mapping[str, Any], errors: _Collector) -> int:
    value = payload.get("priority")
    if value is None:
        return PRIORITIES.index("normal")
    if not _is_str(value) or value not in PRIORITIES:
        shown = repr(value)[:40]
        errors.add("priority", f"{shown} is not one of {', '.join(PRIORITIES)}")
        return PRIORITIES.index("normal")
    return PRIORITIES.index(value)


def _send_at(
    payload: Mapping[str, Any], errors: _Collector, *, now: datetime, horizon_s: float
) -> datetime | None:
    value = payload.get("send_at")
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    elif _is_str(value):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            errors.add(
                "send_at",
                f"{value[:40]!r} is not an ISO 8601 time (e.g. 2026-12-24T09:00:00+01:00)",
            )
            return None
    else:
        errors.add("send_at", f"must be an ISO 8601 time string, not {type(value).__name__}")
        return None
    if when.tzinfo is None or when.utcoffset() is None:
        errors.add("send_at", "needs a time zone (an offset such as +01:00, or Z for UTC)")
        return None
    when = when.astimezone(UTC)
    if when > now + timedelta(seconds=horizon_s):
        days = horizon_s / 86400
        errors.add(
            "send_at",
            f"lies more than {days:g} days ahead (OUTBOX_SEND_AT_HORIZON); at most "
            f"{(now + timedelta(seconds=horizon_s)).isoformat(timespec='seconds')}",
        )
        return None
    return when if when > now else None


def validate_request(
    payload: Mapping[str, Any], *, limits: Limits, now: datetime | None = None
) -> EmailRequest:
    """Check every field; raise `InvalidRequest` naming all bad fields, or return the request.

    `now` (aware UTC; default: the clock) is what `send_at` is checked against.
    """
    errors = _Collector()
    if not isinstance(payload, Mapping):
        raise InvalidRequest([FieldError("request", "must be an object of named fields")])
    unknown = set(payload) - REQUEST_FIELDS
    for name in sorted(unknown, key=str):
        # A field name is caller input: shown as repr unless it is a plain identifier,
        # so it can never forge a line in a log.
        label = name if isinstance(name, str) and name.isidentifier() else repr(name)[:80]
        errors.add(label, "is not a field of outbox.enqueue (schema v1)")

    account = payload.get("account")
    if not _is_str(account) or not account.strip():
        errors.add("account", "is required: the name of a configured account")
        account = ""
    elif len(account) > 100 or not _check_text_value(errors, "account", account, header=True):
        if len(account) > 100:
            errors.add("account", "is not a valid account name (at most 100 characters)")
        account = ""

    to = _address_list(payload, "to", errors, limit=limits.max_recipients)
    cc = _address_list(payload, "cc", errors, limit=limits.max_recipients)
    bcc = _address_list(payload, "bcc", errors, limit=limits.max_recipients)
    if not payload.get("to") and not any(e.field.startswith("to") for e in errors.errors):
        errors.add("to", "needs at least one recipient")
    total = len(set(to) | set(cc) | set(bcc))
    if total > limits.max_recipients:
        errors.add("to", f"{total} recipients in to/cc/bcc; at most {limits.max_recipients}")

    reply_to = None
    if payload.get("reply_to") is not None:
        reply_to = normalize_address(payload.get("reply_to"), "reply_to", errors)
    from_addr = None
    if payload.get("from_addr") is not None:
        from_addr = normalize_address(payload.get("from_addr"), "from_addr", errors)

    subject = payload.get("subject")
    if subject is None:
        errors.add("subject", "is required")
        subject = ""
    elif not _is_str(subject):
        errors.add("subject", f"must be a string, not {type(subject).__name__}")
        subject = ""
    else:
        _check_text_value(errors, "subject", subject, header=True)

    text = _optional_str(payload, "text", errors, header=False)
    html = _optional_str(payload, "html", errors, header=False)
    if payload.get("text") is None and payload.get("html") is None:
        errors.add("text", "a text or html body is required")

    headers = _headers(payload, errors)
    attachments = _attachments(payload, errors)
    priority = _priority(payload, errors)
    send_at = _send_at(
        payload, errors, now=now or datetime.now(UTC), horizon_s=limits.send_at_horizon_s
    )

    metadata = _metadata(payload, errors)
    status_task = _task_name(payload, "status_task", errors)
    status_queue = _task_name(payload, "status_queue", errors)
    if status_queue is not None and status_task is None:
        errors.add("status_queue", "is only used with status_task")

    key = payload.get("idempotency_key")
    if key is not None and (
        not _is_str(key) or not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable()
    ):
        errors.add(
            "idempotency_key",
            f"must be a printable string of 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
        )

    parts = {
        "text": len((text or "").encode("utf-8", "replace")),
        "html": len((html or "").encode("utf-8", "replace")),
        "attachments": sum(len(a.data) * 4 // 3 for a in attachments),
        "subject": len(subject.encode("utf-8", "replace")),
        "headers": sum(len(n) + len(v) for n, v in headers),
    }
    size = sum(parts.values())
    if size > limits.max_message_bytes:
        errors.add(
            max(parts, key=lambda k: parts[k]),  # the field that made it too large
            f"the message would be about {size:,} bytes; the limit is "
            f"{limits.max_message_bytes:,} (OUTBOX_MAX_MESSAGE_BYTES)",
        )

    if errors.errors:
        raise InvalidRequest(errors.errors)
    return EmailRequest(
        account=account.strip(),
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        from_addr=from_addr,
        subject=subject,
        text=text,
        html=html,
        headers=headers,
        attachments=attachments,
        idempotency_key=key,
        size_bytes=size,
        priority=priority,
        send_at=send_at,
        metadata=metadata,
        status_task=status_task,
        status_queue=status_queue,
    )


def _metadata(payload: Mapping[str, Any], errors: _Collector) -> dict[str, Any] | None:
    """A small JSON object of plain values: strings, numbers, booleans, null."""
    value = payload.get("metadata")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        errors.add("metadata", f"must be a JSON object, not {type(value).__name__}")
        return None
    for key, item in value.items():
        if not _is_str(key) or not 1 <= len(key) <= 64 or not key.isprintable():
            errors.add("metadata", f"key {str(key)[:40]!r} must be a printable string of 1 to 64")
            return None
        if item is not None and not isinstance(item, str | int | float | bool):
            errors.add(
                "metadata",
                f"{key!r} holds a {type(item).__name__}: values are strings, numbers, "
                "booleans or null",
            )
            return None
        if isinstance(item, float) and not math.isfinite(item):
            errors.add("metadata", f"{key!r} is not a finite number")
            return None
    size = len(json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        errors.add("metadata", f"is {size:,} bytes as JSON; at most {MAX_METADATA_BYTES:,}")
        return None
    return dict(value)


def _task_name(payload: Mapping[str, Any], name: str, errors: _Collector) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not _is_str(value) or not TASK_NAME.fullmatch(value):
        shown = repr(value)[:60] if _is_str(value) else type(value).__name__
        errors.add(name, f"{shown} is not a Celery task name (letters, digits, . _ : -)")
        return None
    return value


def validate_batch(
    requests: Any, *, limits: Limits, now: datetime | None = None
) -> list[EmailRequest | InvalidRequest]:
    """Validate the requests of one `enqueue_many` call, each on its own: the result, in
    order, is each request or why it was refused. A call that is not a list of at most
    `MAX_BATCH_REQUESTS` is refused as a whole (`InvalidRequest`), before anything else."""
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
        raise InvalidRequest(
            [FieldError("requests", f"must be a list of requests, not {type(requests).__name__}")]
        )
    if not requests:
        raise InvalidRequest([FieldError("requests", "is empty: give at least one request")])
    if len(requests) > MAX_BATCH_REQUESTS:
        raise InvalidRequest(
            [
                FieldError(
                    "requests",
                    f"has {len(requests):,} requests; at most {MAX_BATCH_REQUESTS:,} per call "
                    "(nothing was stored)",
                )
            ]
        )
    now = now or datetime.now(UTC)
    out: list[EmailRequest | InvalidRequest] = []
    for request in requests:
        try:
            out.append(validate_request(request, limits=limits, now=now))
        except InvalidRequest as exc:
            out.append(exc)
    return out


def new_message_id(from_addr: str, *, now: datetime) -> str:
    """A Message-ID unique to this email, made once at intake and kept for every attempt.

    Time-ordered so ids sort roughly by intake; random enough to never collide.
    """
    from email.utils import parseaddr

    _, at, domain = parseaddr(from_addr)[1].rpartition("@")
    # No "@" leaves the whole string in the last part: that is not a domain.
    domain = (domain if at else "") or "outbox.invalid"
    stamp = int(now.timestamp() * 1000)
    return f"<{stamp:x}.{secrets.token_hex(8)}.outbox@{domain}>"


def deadline_for(created_at: datetime, window_s: float) -> datetime:
    return created_at + timedelta(seconds=window_s)
