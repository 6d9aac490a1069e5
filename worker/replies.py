"""SMTP replies as values, and what they mean for the account's user.

This module owns the knowledge base: every reply code of the seed table, RFC 3463
enhanced status codes, and connection-level failures, each turned into a verdict with
plain-words meaning and advice. Pure code: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from worker import reply_codes
from worker.reply_codes import (
    BASIC,
    CONNECTION,
    CONNECTION_SIGNS,
    ENHANCED_DETAILS,
    ENHANCED_SUBJECTS,
    ERRNO_FAILURES,
    HINTS,
    IMPOSSIBLE_AT,
    RETRY_NOTE,
    SENDER_SIDE,
    UNKNOWN_CONNECTION,
    UNKNOWN_OK,
    UNKNOWN_PERMANENT,
    UNKNOWN_TRANSIENT,
    SMTPCode,
)

__all__ = [
    "ConnectionFailure",
    "Explanation",
    "NotAReply",
    "Reply",
    "SMTPCode",
    "Stage",
    "Verdict",
    "classify",
    "connection_failure",
    "connection_reply",
    "explain_text",
    "parse_reply",
    "reply_from",
]


class Stage(StrEnum):
    """Where in the SMTP conversation a reply was received."""

    CONNECT = "connect"  #: TCP connect, greeting, EHLO, STARTTLS / TLS handshake
    AUTH = "auth"  #: AUTH
    MAIL = "mail"  #: MAIL FROM
    RCPT = "rcpt"  #: RCPT TO
    DATA = "data"  #: DATA and the message body


class Verdict(StrEnum):
    """What a reply means for the message, and who can fix it."""

    OK = "ok"  #: accepted (2xx/3xx)
    RETRY = "retry"  #: transient: try again later
    ACCOUNT = "account"  #: the sending account's setup or reputation
    RECIPIENT = "recipient"  #: a permanent problem with the recipient
    MESSAGE = "message"  #: a permanent problem with the message itself


class ConnectionFailure(StrEnum):
    """Failures below SMTP: no reply code was ever received."""

    REFUSED = "refused"  #: ECONNREFUSED (the seed's 111)
    UNREACHABLE = "unreachable"  #: ENETUNREACH / EHOSTUNREACH (the seed's 101)
    DNS = "dns"  #: the relay's host name does not resolve
    TIMEOUT = "timeout"  #: connect or a command timed out
    TLS = "tls"  #: TLS handshake failed (protocol, STARTTLS unsupported)
    CERTIFICATE = "certificate"  #: the server's certificate is not trusted / wrong name
    DROPPED = "dropped"  #: the server closed the connection unexpectedly
    #: The server lacks what the settings need: no AUTH offered, no PLAIN/LOGIN, no
    #: SMTPUTF8 for a non-ASCII address. Retrying will not change it.
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Reply:
    """One reply (or connection failure) as received from the account's server.

    ``code`` is None for a connection failure, and ``failure`` says which.
    """

    code: int | None
    enhanced: str | None = None
    text: str = ""
    stage: Stage | None = None
    failure: ConnectionFailure | None = None

    def __str__(self) -> str:
        if self.code is None:
            kind = self.failure.value if self.failure else "error"
            return f"connection {kind}: {self.text}".strip()
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True)
class Explanation:
    """A reply with its verdict, explained to the account's user."""

    reply: Reply
    verdict: Verdict
    #: Whether the backup provider could deliver where this server did not.
    fallback: bool
    meaning: str
    advice: str

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.reply.code,
            "enhanced": self.reply.enhanced,
            "verdict": self.verdict.value,
            "fallback": self.fallback,
            "meaning": self.meaning,
            "advice": self.advice,
        }


_ENHANCED_PREFIX = r"([245])\.(\d{1,3})\.(\d{1,3})"


def _split_enhanced(text: str) -> tuple[str | None, str]:
    match = re.match(_ENHANCED_PREFIX + r"(?:\s+|$)", text)
    if not match:
        return None, text
    return ".".join(match.groups()), text[match.end() :]


def reply_from(code: int, text: str | bytes, stage: Stage | None = None) -> Reply:
    """A Reply from smtplib's ``(code, message)``: the enhanced code is read off the text.

    smtplib has already joined a multiline reply's lines with newlines and stripped
    their codes; each line may repeat the enhanced code, which is kept once.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    enhanced: str | None = None
    lines: list[str] = []
    for line in text.splitlines() or [""]:
        line_enhanced, rest = _split_enhanced(line.strip())
        if enhanced is None and line_enhanced is not None:
            enhanced = line_enhanced
        if rest:
            lines.append(rest)
    return Reply(code=code, enhanced=enhanced, text=" ".join(lines).strip(), stage=stage)


class NotAReply(ValueError):
    """Text that is neither an SMTP reply nor a connection failure (``outbox explain
    "hello"``): explaining it would only be a guess."""


_SIGNS = tuple(
    (ConnectionFailure(failure), frozenset(numbers), re.compile("|".join(patterns), re.IGNORECASE))
    for failure, numbers, patterns in CONNECTION_SIGNS
)
_ERRNO_IN_TEXT = re.compile(r"\[Errno (-?\d+)\]")
#: How `str(Reply)` writes a connection failure: "connection dns: smtp.x does not resolve".
_RECORDED_FAILURE = re.compile(
    r"^connection (" + "|".join(f.value for f in ConnectionFailure) + r"):\s*(.*)$", re.DOTALL
)


def connection_failure(text: str, errno: int | None = None) -> ConnectionFailure | None:
    """Which connection failure a text (and errno) describes, by `CONNECTION_SIGNS`.

    The engine asks this of an exception from socket/ssl, `outbox explain` of a pasted
    line: one table, so both answer alike. None when no row knows the text.
    """
    if errno is None:
        found = _ERRNO_IN_TEXT.search(text)
        errno = int(found.group(1)) if found else None
    for failure, numbers, pattern in _SIGNS:
        if (errno is not None and errno in numbers) or pattern.search(text):
            return failure
    return None


def parse_reply(raw: str, stage: Stage | None = None) -> Reply:
    """A Reply from raw server text, single or multiline (``550-5.1.1 ...\\r\\n550 5.1.1 ...``).

    Text without a leading three-digit code yields a connection-failure Reply at the
    CONNECT stage when it reads like one (``[Errno 111] Connection refused``, ``timed
    out``, the engine's own ``connection dns: ...``; see `connection_failure`), else
    ``code=None`` with the text kept. A leading operating-system errno instead of a
    reply code (``111 Connection refused``, as in the seed table) is a connection
    failure too.
    """
    code: int | None = None
    texts: list[str] = []
    for line in raw.strip().splitlines():
        line = line.strip()
        match = re.match(r"^(\d{3})(?:[ -]|$)(.*)$", line)
        if match:
            if code is None:
                code = int(match.group(1))
            texts.append(match.group(2))
        elif line:
            texts.append(line)
    if code is None:
        text = raw.strip()
        recorded = _RECORDED_FAILURE.match(text)
        if recorded:
            return connection_reply(ConnectionFailure(recorded.group(1)), recorded.group(2))
        failure = connection_failure(text)
        if failure is not None:
            return connection_reply(failure, text)
        return Reply(code=None, text=text, stage=stage)
    if code in ERRNO_FAILURES:
        # SMTP has no 1xx replies: this is an errno that stood in for a reply code.
        failure = ConnectionFailure(ERRNO_FAILURES[code])
        return connection_reply(failure, " ".join(t.strip() for t in texts if t.strip()))
    return reply_from(code, "\n".join(texts), stage)


# --- Classification --------------------------------------------------------------------
# The knowledge itself is data in worker.reply_codes; what follows only decides which
# entry speaks for a reply. Order of precedence, most specific first:
#   1. a known enhanced detail (5.1.1) that names one cause,
#   2. a basic code (535) that names one cause,
#   3. a hint in the server's own text ("relay access denied"),
#   4. a vague enhanced detail (5.7.1), then the enhanced subject (5.7.x),
#   5. a vague basic code (550), then a default by class and stage.
# The enhanced class, when present, decides transient versus permanent; a transient
# reply is always retried, whatever the entry says about the cause.


def _hint_patterns() -> tuple[tuple[re.Pattern[str], reply_codes.Info], ...]:
    return tuple((re.compile(pattern, re.IGNORECASE), info) for pattern, info in HINTS)


_HINTS = _hint_patterns()


def connection_reply(failure: ConnectionFailure, text: str = "") -> Reply:
    """A Reply for a failure below SMTP (no code was received), at the CONNECT stage."""
    return Reply(code=None, text=text, stage=Stage.CONNECT, failure=failure)


def _at_stage(info: reply_codes.Info, stage: Stage | None) -> reply_codes.Info:
    if stage is None:
        return info
    return info.stages.get(stage.value, info)


def _hint(text: str) -> reply_codes.Info | None:
    for pattern, info in _HINTS:
        if pattern.search(text):
            return info
    return None


def _enhanced_parts(enhanced: str | None) -> tuple[int, int, int] | None:
    if not enhanced:
        return None
    try:
        klass, subject, detail = (int(part) for part in enhanced.split("."))
    except ValueError:
        return None
    return klass, subject, detail


def _explain(reply: Reply, verdict: Verdict, info: reply_codes.Info) -> Explanation:
    advice = info.advice
    if verdict is Verdict.RETRY and info.verdict != Verdict.RETRY.value:
        # The entry describes a lasting cause, but the server said "temporary".
        advice = f"{RETRY_NOTE} {advice}"
    return Explanation(
        reply=reply,
        verdict=verdict,
        fallback=verdict in (Verdict.RETRY, Verdict.ACCOUNT),
        meaning=info.meaning,
        advice=advice,
    )


def _connection_failure(reply: Reply) -> ConnectionFailure | None:
    if reply.failure is not None:
        return reply.failure
    if reply.code is not None and reply.code in ERRNO_FAILURES:
        return ConnectionFailure(ERRNO_FAILURES[reply.code])
    return None


def classify(reply: Reply, stage: Stage | None = None) -> Explanation:
    """Explain a reply: its verdict, whether the backup could help, meaning and advice.

    ``stage`` overrides ``reply.stage`` when given. The meaning never repeats the
    server's own words: those stay available in ``reply.text`` for display beside it.
    """
    stage = stage if stage is not None else reply.stage

    failure = _connection_failure(reply)
    if failure is not None or reply.code is None:
        info = CONNECTION.get(failure.value, UNKNOWN_CONNECTION) if failure else UNKNOWN_CONNECTION
        return _explain(reply, Verdict(info.verdict), info)

    code = reply.code
    if 200 <= code < 400:
        return _explain(reply, Verdict.OK, BASIC.get(code, UNKNOWN_OK))

    basic_class = code // 100
    enhanced = _enhanced_parts(reply.enhanced)
    klass = enhanced[0] if enhanced and enhanced[0] in (4, 5) else basic_class
    transient = klass == 4

    detail = subject = None
    if enhanced:
        detail = ENHANCED_DETAILS.get(enhanced[1:])
        subject = ENHANCED_SUBJECTS.get(enhanced[1])
    # A basic code whose class contradicts the enhanced code is not trusted.
    basic = BASIC.get(code) if basic_class == klass else None
    detail = _at_stage(detail, stage) if detail else None
    basic = _at_stage(basic, stage) if basic else None
    default = UNKNOWN_TRANSIENT if transient else _at_stage(UNKNOWN_PERMANENT, stage)

    candidates = (
        detail if detail and not detail.vague else None,
        basic if basic and not basic.vague else None,
        _hint(reply.text),
        detail,
        _at_stage(subject, stage) if subject else None,
        basic,
        default,
    )
    info = next(candidate for candidate in candidates if candidate is not None)

    if stage is not None and info.verdict in IMPOSSIBLE_AT.get(stage.value, ()):
        info = SENDER_SIDE[stage.value]

    verdict = Verdict.RETRY if transient else Verdict(info.verdict)
    return _explain(reply, verdict, info)


def explain_text(raw: str, stage: Stage | None = None) -> Explanation:
    """Parse raw server text and explain it: ``classify(parse_reply(raw, stage))``.

    Raises NotAReply for text that has no SMTP reply code (2xx to 5xx) and is no
    connection failure `CONNECTION_SIGNS` knows: the engine never meets such a thing,
    so any verdict would be made up.
    """
    reply = parse_reply(raw, stage)
    if reply.code is None and reply.failure is None:
        raise NotAReply(
            f"{raw.strip()!r} is not an SMTP reply: a reply starts with a three-digit code "
            "(550 5.1.1 ...), and no known connection error (refused, timed out, name not "
            "known, certificate verify failed...) reads like it."
        )
    if reply.code is not None and not 200 <= reply.code < 600:
        raise NotAReply(
            f"{raw.strip()!r} is not an SMTP reply: SMTP reply codes run from 200 to 599."
        )
    return classify(reply)
