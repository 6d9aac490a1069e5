"""A stand-in for the backup providers' HTTP APIs: a real HTTP server on loopback.

This module owns `ProviderStub`, which speaks like SendGrid, Postmark or Mailgun: it
checks each request the way the provider does (path, method, authentication, content
type, required fields), answers with the provider's own status codes and bodies,
records every request, and can be scripted to fail, slow down or drop the connection.
It imports no pytest, so `make demo` can run it on its own:

    python -m standins.provider --provider sendgrid --port 0
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.utils import getaddresses, parseaddr
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

ProviderName = Literal["sendgrid", "postmark", "mailgun"]
PROVIDERS: tuple[ProviderName, ...] = ("sendgrid", "postmark", "mailgun")

#: One entry of `ProviderStub.script`: a status, (status, body[, headers]),
#: ("timeout", seconds) or "drop".
ScriptEntry = Any

_ADDRESS = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+$")

#: Headers SendGrid refuses in the `headers` object of a Mail Send request.
SENDGRID_RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
POSTMARK_MAX_RECIPIENTS = 50


# --- what was received -----------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    """One request's email, read the same way whichever provider it was sent to.

    Addresses are (display name, address) pairs; `headers` are the custom mail headers
    the provider was asked to set (Message-ID among them), names as sent.
    """

    from_addr: tuple[str, str] | None
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    bcc: list[tuple[str, str]]
    reply_to: tuple[str, str] | None
    subject: str | None
    text: str | None
    html: str | None
    headers: dict[str, str]
    #: (filename, content type, decoded bytes), in the order sent.
    attachments: list[tuple[str, str, bytes]]

    @property
    def recipients(self) -> list[str]:
        """Every recipient address: To, then Cc, then Bcc."""
        return [addr for _, addr in (*self.to, *self.cc, *self.bcc)]

    def header(self, name: str) -> str | None:
        """A custom mail header's value, by case-insensitive name."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    @property
    def message_id(self) -> str | None:
        return self.header("Message-ID")


@dataclass
class RecordedRequest:
    """One HTTP request as the stub received it, and the status it answered."""

    provider: ProviderName
    method: str
    path: str
    #: Request headers, names lower-cased.
    headers: dict[str, str]
    body: bytes = field(repr=False)
    #: The parsed JSON body; None when the body is not JSON.
    json: Any
    form: dict[str, list[str]] | None
    #: Multipart file parts: (field name, filename, content type, bytes).
    files: list[tuple[str, str, str, bytes]]
    client_port: int
    #: None while the stub has not answered (or never did: "drop", or stopped mid-wait).
    answered_status: int | None = None
    #: The message id the stub handed out when it accepted the request.
    provider_message_id: str | None = None

    @property
    def accepted(self) -> bool:
        return self.answered_status is not None and 200 <= self.answered_status < 300

    def mail(self) -> ReceivedMail:
        """The email in this request, whichever provider's shape it has."""
        if self.provider == "sendgrid":
            return _sendgrid_mail(self.json if isinstance(self.json, dict) else {})
        if self.provider == "postmark":
            return _postmark_mail(self.json if isinstance(self.json, dict) else {})
        return _mailgun_mail(self.form or {}, self.files)

    def recipients(self) -> list[str]:
        return self.mail().recipients

    def message_id(self) -> str | None:
        return self.mail().message_id


def _pairs(values: Iterable[str]) -> list[tuple[str, str]]:
    return [(name, addr) for name, addr in getaddresses(list(values)) if addr]


def _pair(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    name, addr = parseaddr(value)
    return (name, addr) if addr else None


def _b64(value: Any) -> bytes:
    return base64.b64decode(str(value), validate=True)


def _sendgrid_mail(body: dict[str, Any]) -> ReceivedMail:
    personalizations = body.get("personalizations") or [{}]
    first = personalizations[0] if isinstance(personalizations[0], dict) else {}

    def parties(key: str) -> list[tuple[str, str]]:
        return [(p.get("name", ""), p.get("email", "")) for p in first.get(key) or []]

    def party(value: Any) -> tuple[str, str] | None:
        return (value.get("name", ""), value.get("email", "")) if isinstance(value, dict) else None

    content = {c.get("type"): c.get("value") for c in body.get("content") or []}
    return ReceivedMail(
        from_addr=party(body.get("from")),
        to=parties("to"),
        cc=parties("cc"),
        bcc=parties("bcc"),
        reply_to=party(body.get("reply_to")),
        subject=body.get("subject"),
        text=content.get("text/plain"),
        html=content.get("text/html"),
        headers=dict(body.get("headers") or {}),
        attachments=[
            (a.get("filename", ""), a.get("type", ""), _b64(a.get("content", "")))
            for a in body.get("attachments") or []
        ],
    )


def _postmark_mail(body: dict[str, Any]) -> ReceivedMail:
    return ReceivedMail(
        from_addr=_pair(body.get("From")),
        to=_pairs([body.get("To") or ""]),
        cc=_pairs([body.get("Cc") or ""]),
        bcc=_pairs([body.get("Bcc") or ""]),
        reply_to=_pair(body.get("ReplyTo")),
        subject=body.get("Subject"),
        text=body.get("TextBody"),
        html=body.get("HtmlBody"),
        headers={h.get("Name", ""): h.get("Value", "") for h in body.get("Headers") or []},
        attachments=[
            (a.get("Name", ""), a.get("ContentType", ""), _b64(a.get("Content", "")))
            for a in body.get("Attachments") or []
        ],
    )


def _mailgun_mail(
    form: dict[str, list[str]], files: list[tuple[str, str, str, bytes]]
) -> ReceivedMail:
    def first(name: str) -> str | None:
        values = form.get(name)
        return values[0] if values else None

    headers = {
        key[2:]: values[0]
        for key, values in form.items()
        if key.startswith("h:") and key[2:].lower() != "reply-to"
    }
    return ReceivedMail(
        from_addr=_pair(first("from")),
        to=_pairs(form.get("to", [])),
        cc=_pairs(form.get("cc", [])),
        bcc=_pairs(form.get("bcc", [])),
        reply_to=_pair(first("h:Reply-To")),
        subject=first("subject"),
        text=first("text"),
        html=first("html"),
        headers=headers,
        attachments=[
            (filename, content_type, data)
            for name, filename, content_type, data in files
            if name in ("attachment", "inline")
        ],
    )


# --- request parsing -------------------------------------------------------------------


def _content_type(headers: dict[str, str]) -> tuple[str, Message]:
    """(media type, a Message holding the header) so its parameters can be read."""
    holder = Message()
    holder["Content-Type"] = headers.get("content-type", "")
    return holder.get_content_type() if "content-type" in headers else "", holder


def parse_multipart(
    body: bytes, boundary: str
) -> tuple[dict[str, list[str]], list[tuple[str, str, str, bytes]]]:
    """(form fields, file parts) of a multipart/form-data body; ValueError if malformed.

    A small parser rather than `email.parser`: it must return attachment bytes exactly,
    and `cgi` is gone from the standard library.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    if not body.startswith(delimiter):
        raise ValueError("body does not start with the boundary")
    form: dict[str, list[str]] = {}
    files: list[tuple[str, str, str, bytes]] = []
    closed = False
    for section in (b"\r\n" + body).split(b"\r\n" + delimiter)[1:]:
        if section.startswith(b"--"):
            closed = True
            break
        head, separator, content = section.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("part without a blank line after its headers")
        part_headers: dict[str, str] = {}
        for line in head.split(b"\r\n"):
            if b":" in line:
                name, _, value = line.decode("utf-8").partition(":")
                part_headers[name.strip().lower()] = value.strip()
        holder = Message()
        holder["Content-Disposition"] = part_headers.get("content-disposition", "")
        field_name = holder.get_param("name", header="content-disposition")
        filename = holder.get_param("filename", header="content-disposition")
        if not isinstance(field_name, str):
            raise ValueError("part without a field name")
        if isinstance(filename, str):
            content_type = part_headers.get("content-type", "application/octet-stream")
            files.append((field_name, filename, content_type, content))
        else:
            form.setdefault(field_name, []).append(content.decode("utf-8"))
    if not closed:
        raise ValueError("multipart body has no closing boundary")
    return form, files


# --- answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None


def _json_answer(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(
        status,
        json.dumps(payload).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


def _text_answer(status: int, text: str, content_type: str = "text/plain") -> _Answer:
    return _Answer(status, text.encode(), {"Content-Type": f"{content_type}; charset=utf-8"})


def _gateway_page(status: int) -> _Answer:
    # Outages are usually answered by the provider's load balancer, in HTML.
    reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(
        status, "Server Error"
    )
    page = f"<html><head><title>{status} {reason}</title></head><body>{reason}</body></html>"
    return _text_answer(status, page, "text/html")


def _sendgrid_error(status: int, message: str, field_name: str | None = None) -> _Answer:
    headers = {"Retry-After": "1"} if status == 429 else None
    return _json_answer(
        status, {"errors": [{"message": message, "field": field_name, "help": None}]}, headers
    )


def _postmark_error(status: int, code: int, message: str) -> _Answer:
    headers = {"Retry-After": "1"} if status == 429 else None
    return _json_answer(status, {"ErrorCode": code, "Message": message}, headers)


def _mailgun_error(status: int, message: str) -> _Answer:
    headers = {"Retry-After": "1"} if status == 429 else None
    return _json_answer(status, {"message": message}, headers)


SENDGRID_BAD_KEY = "The provided authorization grant is invalid, expired, or revoked"
SENDGRID_UNVERIFIED_SENDER = (
    "The from address does not match a verified Sender Identity. Mail cannot be sent until "
    "this error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/"
    "sender-identity/ to see the Sender Identity requirements"
)
POSTMARK_BAD_TOKEN = (
    "The Server Token you provided in the X-Postmark-Server-Token request header was "
    "invalid. Please verify that you are using a valid token."
)
POSTMARK_NO_TOKEN = (
    "No Account or Server API tokens were supplied in the HTTP headers. Please add a header "
    "for either X-Postmark-Server-Token or X-Postmark-Account-Token."
)
POSTMARK_INACTIVE = (
    "You tried to send to recipient(s) that have been marked as inactive. Found inactive "
    "addresses: {}. Inactive recipients are ones that have generated a hard bounce, a spam "
    "complaint, or a manual suppression."
)


def canned_answer(provider: ProviderName, status: int, *, mailgun_domain: str = "") -> _Answer:
    """The body the provider gives with ``status`` when nothing more specific is scripted."""
    if status >= 502:
        return _gateway_page(status)
    if provider == "sendgrid":
        message = {
            400: "Bad Request",
            401: SENDGRID_BAD_KEY,
            403: SENDGRID_UNVERIFIED_SENDER,
            404: "Not Found",
            413: "The JSON payload you have included in your request is too large.",
            429: "too many requests",
            500: "internal server error",
        }.get(status, f"HTTP {status}")
        return _sendgrid_error(status, message, "from" if status == 403 else None)
    if provider == "postmark":
        code, message = {
            401: (10, POSTMARK_BAD_TOKEN),
            422: (300, "Invalid email request"),
            429: (429, "Rate limit exceeded."),
        }.get(status, (0, ""))
        if code:
            return _postmark_error(status, code, message)
        return _text_answer(status, f"{status} error")
    if status == 401:
        return _text_answer(401, "Forbidden")
    message = {
        400: "Bad Request",
        403: (
            f"Domain {mailgun_domain} is not allowed to send: Free accounts are for test "
            "purposes only. Please upgrade or add the address to authorized recipients in "
            "Account Settings."
        ),
        404: f"Domain not found: {mailgun_domain}",
        413: "request entity too large",
        429: "Too many requests",
        500: "Internal Server Error",
    }.get(status, f"HTTP {status}")
    return _mailgun_error(status, message)


# --- request checks, per provider ------------------------------------------------------


def _is_address(value: Any) -> bool:
    return isinstance(value, str) and bool(_ADDRESS.match(value))


def _is_base64(value: Any) -> bool:
    try:
        _b64(value)
    except (binascii.Error, ValueError):
        return False
    return isinstance(value, str)


_SG = {
    "personalizations": (
        "The personalizations field is required and must have at least one personalization."
    ),
    "to": (
        "The to array is required for all personalization objects, and must have at least "
        "one email object with a valid email address."
    ),
    "unique": (
        "Each email address in the personalization block should be unique between to, cc, "
        "and bcc. We found the first duplicate instance of [{}] in the {} field."
    ),
    "from": (
        "The from object must be provided for every email send. It is an object that "
        "requires the email parameter, but may also contain a name parameter."
    ),
    "subject": (
        "The subject is required. You can get around this requirement if you use a template "
        "with a subject defined or if every personalization has a subject defined."
    ),
    "content": (
        "Unless a valid template_id is provided, the content parameter is required. There "
        "must be at least one defined content block."
    ),
    "value": "The content value must be a string at least one character in length.",
    "order": "If present, text/plain content must be first, followed by any other content.",
}


def _check_sendgrid(body: Any) -> tuple[str, str | None] | None:
    """The first problem SendGrid would report, as (message, field); None if valid."""
    if not isinstance(body, dict):
        return "Bad Request", None
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        return _SG["personalizations"], "personalizations"
    for index, item in enumerate(personalizations):
        where = f"personalizations.{index}"
        if not isinstance(item, dict) or not item.get("to"):
            return _SG["to"], f"{where}.to"
        seen: set[str] = set()
        for kind in ("to", "cc", "bcc"):
            parties = item.get(kind, [])
            if not isinstance(parties, list):
                return f"The {kind} field must be an array.", f"{where}.{kind}"
            for party in parties:
                if not isinstance(party, dict) or not _is_address(party.get("email")):
                    return "Does not contain a valid address.", f"{where}.{kind}.email"
                lowered = party["email"].lower()
                if lowered in seen:
                    return _SG["unique"].format(lowered, f"{where}.{kind}"), f"{where}.{kind}"
                seen.add(lowered)
    sender = body.get("from")
    if not isinstance(sender, dict) or not _is_address(sender.get("email")):
        return _SG["from"], "from.email"
    reply_to = body.get("reply_to")
    if reply_to is not None and not (
        isinstance(reply_to, dict) and _is_address(reply_to.get("email"))
    ):
        return "The reply_to email does not contain a valid address.", "reply_to.email"
    has_subject = isinstance(body.get("subject"), str) and bool(body["subject"])
    if not has_subject and not all(
        isinstance(p, dict) and p.get("subject") for p in personalizations
    ):
        return _SG["subject"], "subject"
    content = body.get("content")
    if not isinstance(content, list) or not content:
        return _SG["content"], "content"
    types = []
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return "The content type must be provided.", f"content.{index}.type"
        if not isinstance(block.get("value"), str) or not block["value"]:
            return _SG["value"], f"content.{index}.value"
        types.append(block["type"])
    if "text/plain" in types and types[0] != "text/plain":
        return _SG["order"], "content"
    for index, attachment in enumerate(body.get("attachments") or []):
        where = f"attachments.{index}"
        if not isinstance(attachment, dict) or not attachment.get("filename"):
            return "The attachment filename parameter is required.", f"{where}.filename"
        if not _is_base64(attachment.get("content")):
            return "The attachment content must be base64 encoded.", f"{where}.content"
        if attachment.get("disposition", "attachment") not in ("attachment", "inline"):
            return "The disposition must be attachment or inline.", f"{where}.disposition"
    headers = body.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        return "Invalid type. Expected: object of strings.", "headers"
    for name in headers:
        if name.lower() in SENDGRID_RESERVED_HEADERS:
            return f"The header {name} is reserved and cannot be set.", "headers"
    return None


def _check_postmark(body: Any) -> tuple[int, str] | None:
    """The first problem Postmark would report, as (ErrorCode, Message); None if valid."""
    if not isinstance(body, dict):
        return 402, "Received invalid JSON input."
    if not _is_address(parseaddr(str(body.get("From") or ""))[1]):
        return 300, f"Invalid 'From' address: '{body.get('From') or ''}'."
    recipients = 0
    for key in ("To", "Cc", "Bcc"):
        value = body.get(key)
        if value in (None, "") and key != "To":
            continue
        if not isinstance(value, str) or not value.strip():
            return 300, "Zero recipients specified"
        for name_addr in getaddresses([value]):
            if not _is_address(name_addr[1]):
                return 300, f"Error parsing '{key}': Illegal email address '{value}'."
            recipients += 1
    if recipients > POSTMARK_MAX_RECIPIENTS:
        return 300, "Maximum of 50 recipients allowed per email message"
    if body.get("ReplyTo") and not all(
        _is_address(addr) for _, addr in getaddresses([str(body["ReplyTo"])])
    ):
        return 300, f"Error parsing 'ReplyTo': Illegal email address '{body['ReplyTo']}'."
    if not isinstance(body.get("Subject"), str) or not body["Subject"]:
        return 300, "The 'Subject' field is required."
    if not body.get("TextBody") and not body.get("HtmlBody"):
        return 300, "Provide either email TextBody or HtmlBody or both."
    headers = body.get("Headers", [])
    if not isinstance(headers, list) or not all(
        isinstance(h, dict) and isinstance(h.get("Name"), str) and isinstance(h.get("Value"), str)
        for h in headers
    ):
        return 403, "Incompatible JSON input: Headers must be a list of {Name, Value}."
    for attachment in body.get("Attachments") or []:
        if not isinstance(attachment, dict) or not attachment.get("Name"):
            return 300, "Attachment is missing its Name."
        if not attachment.get("ContentType"):
            return 300, f"Attachment '{attachment['Name']}' is missing its ContentType."
        if not _is_base64(attachment.get("Content")):
            return 300, f"Attachment '{attachment['Name']}' content is not valid base64."
    stream = body.get("MessageStream", "outbound")
    if stream != "outbound":
        return 1235, f"The message stream for the provided 'ID' ({stream}) was not found."
    return None


def _check_mailgun(form: dict[str, list[str]]) -> str | None:
    """The first problem Mailgun would report, as its message; None if valid."""
    for name in ("from", "to", "subject"):
        if not form.get(name) or not form[name][0]:
            return f"'{name}' parameter is missing"
    if not _is_address(parseaddr(form["from"][0])[1]):
        return "'from' parameter is not a valid address. please check documentation"
    for kind in ("to", "cc", "bcc"):
        for name_addr in getaddresses(form.get(kind, [])):
            if not _is_address(name_addr[1]):
                return f"'{kind}' parameter is not a valid address. please check documentation"
    if not any(form.get(name) and form[name][0] for name in ("text", "html", "template")):
        return "Need at least one of 'text', 'html' or 'template' parameters specified"
    return None


# --- the server ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the providers' APIs
    server_version = "ProviderStub/1"
    #: Idle keep-alive connections are dropped after this long (a thread each).
    timeout = 30
    server: _Server

    def do_POST(self) -> None:
        self.server.stub._handle(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], stub: ProviderStub) -> None:
        self.stub = stub
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout) leaves a broken pipe behind: expected here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class ProviderStub:
    """A provider's HTTP API on 127.0.0.1, checking and recording every request.

    ``script`` holds answers for the next requests, consumed one per request, in order:

    - a 2xx status: answer normally (check the request, accept it if valid);
    - any other status: answer it, with the provider's usual body for it;
    - ``(status, body)`` or ``(status, body, headers)``: exactly that answer
      (a dict/list body is sent as JSON, a str as text);
    - ``("timeout", seconds)``: wait, then answer normally (a client that gave up
      before that has lost the answer, but the provider did accept the mail);
    - ``"drop"``: close the connection without answering.

    Once the script is used up, every request is answered normally.
    """

    def __init__(
        self,
        provider: ProviderName,
        *,
        api_key: str | None = None,
        mailgun_domain: str = "mg.outbox.test",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
        self.provider: ProviderName = provider
        self.api_key = api_key or f"stub-{provider}-key-{secrets.token_hex(8)}"
        self.mailgun_domain = mailgun_domain
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._script: deque[ScriptEntry] = deque()
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ProviderStub({self.provider!r}, base_url={self.base_url!r})"

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> ProviderStub:
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"provider-stub-{self.provider}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()  # ends any scripted wait at once
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ProviderStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        if self._server is None:
            return f"http://{self._host}:{self._port}"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- scripting and records --------------------------------------------------------

    @property
    def script(self) -> list[ScriptEntry]:
        with self._lock:
            return list(self._script)

    @script.setter
    def script(self, entries: Iterable[ScriptEntry]) -> None:
        with self._lock:
            self._script = deque(entries)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def deliveries(self) -> list[RecordedRequest]:
        """The requests the stub accepted: the mail the provider would actually send."""
        return [request for request in self.requests if request.accepted]

    def wait_for_requests(self, count: int, timeout_s: float = 5.0) -> list[RecordedRequest]:
        """The requests once at least ``count`` have arrived and been answered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            requests = self.requests
            if len(requests) >= count and all(r.answered_status for r in requests[:count]):
                return requests
            time.sleep(0.01)
        return self.requests

    # -- handling ---------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in handler.headers.items()}
        record = self._record(handler, headers, body)
        with self._lock:
            self._requests.append(record)
            entry = self._script.popleft() if self._script else None

        if entry == "drop":
            handler.close_connection = True
            return
        if isinstance(entry, tuple) and entry and entry[0] == "timeout":
            if self._stopping.wait(float(entry[1])):
                handler.close_connection = True
                return
            entry = None

        if isinstance(entry, int) and not 200 <= entry < 300:
            answer = canned_answer(self.provider, entry, mailgun_domain=self.mailgun_domain)
        elif isinstance(entry, tuple):
            status, payload, *extra = entry
            extra_headers = extra[0] if extra else {}
            if isinstance(payload, (dict, list)):
                answer = _json_answer(status, payload, extra_headers)
            elif isinstance(payload, bytes):
                answer = _Answer(status, payload, dict(extra_headers))
            else:
                answer = _text_answer(status, str(payload))
                answer.headers.update(extra_headers)
        else:
            answer = self._answer(record)

        with self._lock:
            record.answered_status = answer.status
            record.provider_message_id = answer.message_id
        log.info("%s %s %s -> %s", self.provider, record.method, record.path, answer.status)
        self._write(handler, answer)

    def _record(self, handler: _Handler, headers: dict[str, str], body: bytes) -> RecordedRequest:
        media_type, holder = _content_type(headers)
        parsed_json: Any | None = None
        form: dict[str, list[str]] | None = None
        files: list[tuple[str, str, str, bytes]] = []
        if media_type == "application/json":
            try:
                parsed_json = json.loads(body)
            except ValueError:
                parsed_json = None
        elif media_type == "multipart/form-data":
            boundary = holder.get_param("boundary")
            if isinstance(boundary, str):
                try:
                    form, files = parse_multipart(body, boundary)
                except (ValueError, UnicodeDecodeError):
                    form, files = None, []
        elif media_type == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return RecordedRequest(
            provider=self.provider,
            method=handler.command,
            path=handler.path,
            headers=headers,
            body=body,
            json=parsed_json,
            form=form,
            files=files,
            client_port=handler.client_address[1],
        )

    def _answer(self, request: RecordedRequest) -> _Answer:
        if self.provider == "sendgrid":
            return self._answer_sendgrid(request)
        if self.provider == "postmark":
            return self._answer_postmark(request)
        return self._answer_mailgun(request)

    def _answer_sendgrid(self, request: RecordedRequest) -> _Answer:
        if request.path != "/v3/mail/send":
            return _sendgrid_error(404, "Not Found")
        if request.method != "POST":
            return _sendgrid_error(405, "Method Not Allowed")
        authorization = request.headers.get("authorization", "")
        if not authorization:
            return _sendgrid_error(401, "Permission denied, wrong credentials")
        if authorization != f"Bearer {self.api_key}":
            return _sendgrid_error(401, SENDGRID_BAD_KEY)
        if _content_type(request.headers)[0] != "application/json":
            return _sendgrid_error(400, "Content-Type should be application/json.")
        if request.json is None:
            return _sendgrid_error(400, "Bad Request")
        problem = _check_sendgrid(request.json)
        if problem is not None:
            return _sendgrid_error(400, *problem)
        message_id = secrets.token_urlsafe(16)
        return _Answer(202, b"", {"X-Message-Id": message_id}, message_id)

    def _answer_postmark(self, request: RecordedRequest) -> _Answer:
        if request.path != "/email":
            return _text_answer(404, "Not Found")
        if request.method != "POST":
            return _text_answer(405, "Method Not Allowed")
        token = request.headers.get("x-postmark-server-token")
        if not token:
            return _postmark_error(401, 10, POSTMARK_NO_TOKEN)
        if token != self.api_key:
            return _postmark_error(401, 10, POSTMARK_BAD_TOKEN)
        if "application/json" not in request.headers.get("accept", ""):
            return _postmark_error(422, 409, "JSON required: send 'Accept: application/json'.")
        if _content_type(request.headers)[0] != "application/json":
            return _postmark_error(
                422, 409, "JSON required: send 'Content-Type: application/json'."
            )
        if request.json is None:
            return _postmark_error(422, 402, "Received invalid JSON input.")
        problem = _check_postmark(request.json)
        if problem is not None:
            return _postmark_error(422, *problem)
        message_id = str(uuid.uuid4())
        answer = _json_answer(
            200,
            {
                "To": request.json["To"],
                "SubmittedAt": datetime.now(UTC).isoformat(),
                "MessageID": message_id,
                "ErrorCode": 0,
                "Message": "OK",
            },
        )
        return _Answer(answer.status, answer.body, answer.headers, message_id)

    def _answer_mailgun(self, request: RecordedRequest) -> _Answer:
        match = re.fullmatch(r"/v3/([^/]+)/messages", request.path)
        if request.method != "POST" or match is None:
            return _mailgun_error(404, "Not Found")
        expected = "Basic " + base64.b64encode(f"api:{self.api_key}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return _text_answer(401, "Forbidden")
        if match.group(1) != self.mailgun_domain:
            return _mailgun_error(404, f"Domain not found: {match.group(1)}")
        if request.form is None:
            return _mailgun_error(
                400, "Expected a multipart/form-data or application/x-www-form-urlencoded body."
            )
        problem = _check_mailgun(request.form)
        if problem is not None:
            return _mailgun_error(400, problem)
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        message_id = f"<{stamp}.{secrets.token_hex(8)}@{self.mailgun_domain}>"
        answer = _json_answer(200, {"id": message_id, "message": "Queued. Thank you."})
        return _Answer(answer.status, answer.body, answer.headers, message_id)

    @staticmethod
    def _write(handler: _Handler, answer: _Answer) -> None:
        try:
            handler.send_response(answer.status)
            for name, value in answer.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(answer.body)))
            handler.end_headers()
            handler.wfile.write(answer.body)
            handler.wfile.flush()
        except ConnectionError:
            # The client gave up waiting (a scripted timeout): the answer is lost.
            handler.close_connection = True


def main(argv: list[str] | None = None) -> int:
    """Run one stub until interrupted; print its base URL on the first line of stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--provider", choices=PROVIDERS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="the key it accepts (default: random)")
    parser.add_argument("--mailgun-domain", default="mg.outbox.test")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    stub = ProviderStub(
        args.provider,
        api_key=args.api_key,
        mailgun_domain=args.mailgun_domain,
        host=args.host,
        port=args.port,
    )
    with stub:
        print(stub.base_url, flush=True)
        print(
            f"{args.provider} stub listening; it accepts API key {stub.api_key!r}"
            + (f" and domain {stub.mailgun_domain!r}" if args.provider == "mailgun" else "")
            + ". Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        # `make demo` stops it with SIGTERM (background jobs ignore SIGINT): leave the
        # with-block either way so the server closes cleanly.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
