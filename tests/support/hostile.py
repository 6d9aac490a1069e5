"""Hypothesis strategies for hostile `outbox.enqueue` requests, shared by every door.

`hostile_requests()` starts from a valid request (`good_requests()`) and breaks one to
three of its fields, each in a different way: CR/LF/NUL injected anywhere in a header
field or address, lone surrogates (text that is not valid UTF-8), lines over 998
characters, addresses that fail RFC syntax, thousands of recipients, bodies and
attachments over the size limit, wrong JSON types, missing required fields, unknown
fields and unknown accounts. Each example says which top-level fields it broke
(`Hostile.broken`), so a test can check that the refusal names one of them, and nothing
else.

`json_only=True` keeps to values a JSON task payload can carry (lone surrogates can: as
``\\ud800`` escapes); otherwise Python-only values (bytes, sets, objects, non-string
header names) are drawn too.

`FIXED_BUGS` lists inputs that once slipped through the intake; examples that hit one
carry `Hostile.known_bug`, so a regression is reported under the old bug's name. Each
also has its own regression test.
"""

from __future__ import annotations

import base64
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

#: Set on the test's Outbox, so the size cases stay small and fast.
MAX_MESSAGE_BYTES = 4096
#: The account the tests create; any other name is unknown.
ACCOUNT = "acme"

#: Inputs that once slipped through the intake (fixed; each has a regression test).
#: Examples that hit one are labelled with it, so a regression names the old bug.
FIXED_BUGS = {
    "header-name-trailing-lf": "a header name ending in one LF passes `_FIELD_NAME.match` "
    "('$' matches before a final newline)",
    "content-type-trailing-lf": "an attachment content_type ending in one LF passes "
    "`_CONTENT_TYPE.match` ('$' matches before a final newline)",
    "account-surrogate": "an account name holding a lone surrogate passes validation and "
    "crashes the database query with UnicodeEncodeError",
    "splitlines-separator": "subject/header value/filename holding a line separator other "
    "than CR/LF (\\v \\f \\x1c-\\x1e \\x85 \\u2028 \\u2029) passes intake; compose() then "
    "raises ValueError at delivery",
}

#: Line separators `str.splitlines()` (and so the `email` package) knows besides CR/LF.
OTHER_LINE_SEPARATORS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def root(field_name: str) -> str:
    """The top-level request field an error names: ``cc[3]`` -> ``cc``."""
    return re.split(r"[\[.]", field_name, maxsplit=1)[0]


@dataclass(frozen=True)
class Hostile:
    request: dict[str, Any] = field(repr=False)
    #: Top-level fields a refusal may name: those this example broke.
    broken: frozenset[str]
    #: What was done, for failure messages.
    what: tuple[str, ...]
    known_bug: str | None = None
    #: The ways it was broken (keys of the slot table), for `hypothesis.event`.
    slots: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shown = {k: _short(v) for k, v in self.request.items()}
        return f"Hostile(broken={sorted(self.broken)}, what={list(self.what)}, request={shown})"


def _short(value: Any) -> Any:
    """A long value cut down, so a failing example stays readable."""
    if isinstance(value, str | bytes) and len(value) > 80:
        return f"{value[:60]!r}... ({len(value)} chars)"
    if isinstance(value, list | tuple) and len(value) > 5:
        return f"[{len(value)} items: {_short(value[0])!r}, ...]"
    return value


# -- valid building blocks ----------------------------------------------------------------

_LOCAL = st.from_regex(r"[a-z][a-z0-9]{0,11}", fullmatch=True)
_DOMAIN = st.sampled_from(["example.com", "example.org", "mail.example.net"])
_DISPLAY = st.from_regex(r"[A-Z][a-z]{0,8}( [A-Z][a-z]{0,8})?", fullmatch=True)


@st.composite
def addresses(draw: st.DrawFn) -> str:
    address = f"{draw(_LOCAL)}@{draw(_DOMAIN)}"
    if draw(st.booleans()):
        return f"{draw(_DISPLAY)} <{address}>"
    return address


#: Printable text safe in a header: no control characters, no line separators.
_SAFE_CHARS = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"))
_SAFE_TEXT = st.text(_SAFE_CHARS, min_size=1, max_size=60)
_HEADER_NAMES = st.from_regex(r"X-[A-Za-z0-9][A-Za-z0-9-]{0,18}", fullmatch=True)
_FILENAMES = st.from_regex(r"[a-z0-9_-]{1,20}\.(txt|pdf|bin|csv)", fullmatch=True)
_CONTENT_TYPES = st.sampled_from(
    ["text/plain", "application/pdf", "application/octet-stream", "text/csv", "image/png"]
)
_KEYS = st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True)


@st.composite
def attachments(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(st.binary(max_size=100))
    return {
        "filename": draw(_FILENAMES),
        "content_type": draw(_CONTENT_TYPES),
        "content": base64.b64encode(data).decode(),
    }


@st.composite
def good_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request the intake accepts: small (far below `MAX_MESSAGE_BYTES`)."""
    request: dict[str, Any] = {"account": ACCOUNT, "subject": draw(_SAFE_TEXT)}
    to = draw(st.lists(addresses(), min_size=1, max_size=3))
    request["to"] = to[0] if len(to) == 1 and draw(st.booleans()) else to
    for name in ("cc", "bcc"):
        if draw(st.booleans()):
            request[name] = draw(st.lists(addresses(), max_size=2))
    for name in ("reply_to", "from_addr"):
        if draw(st.booleans()):
            request[name] = draw(addresses())
    body = draw(st.sampled_from(["text", "html", "both"]))
    if body in ("text", "both"):
        request["text"] = draw(st.text(max_size=200).filter(lambda t: "\x00" not in t))
        request["text"] = request["text"].encode("utf-8", "ignore").decode()  # no surrogates
    if body in ("html", "both"):
        request["html"] = "<p>" + draw(_SAFE_TEXT) + "</p>"
    if draw(st.booleans()):
        pairs = draw(
            st.lists(st.tuples(_HEADER_NAMES, _SAFE_TEXT), max_size=3, unique_by=lambda p: p[0])
        )
        request["headers"] = (
            dict(pairs) if draw(st.booleans()) else [[name, value] for name, value in pairs]
        )
    if draw(st.booleans()):
        request["attachments"] = draw(st.lists(attachments(), max_size=2))
    if draw(st.booleans()):
        request["idempotency_key"] = draw(_KEYS)
    return request


# -- ways to break a field ----------------------------------------------------------------

#: A mutation changes the request in place and says what it broke.
Mutate = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Mutation:
    apply: Mutate
    broken: frozenset[str]
    what: str
    known_bug: str | None = None


INJECTIONS = ["\r", "\n", "\r\n", "\x00", "\r\nBcc: victim@example.org", "\nX-Injected: 1"]
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)

BAD_ADDRESSES = [
    "not-an-address",
    "bob@@example.com",
    "bob@",
    "@example.com",
    # Not here: dotless and special-use domains (bob@mailhost, bob@localhost,
    # bob@corp.local): valid SMTP, and only the account's relay knows if they exist.
    "bob@example.invalid",
    "bob@1.2.3.4",
    "bob@exa mple.com",
    "bob..x@example.com",
    ".bob@example.com",
    "bob.@example.com",
    "bob@-example.com",
    "bob@ex_ample.com",
    "<bob@example.com",
    "Bob <bob@example.com",
    "bob@example.com>",
    "bob@example.com, eve@example.com",
    "bob@example.com; eve@example.com",
    '"bob@example.com',
    "bob@[300.1.1.1]",
    "bob@" + "a" * 64 + ".com",
    "bob@" + ("a" * 60 + ".") * 5 + "com",
    # Not here: a 65-character local part. RFC 5321 allows 64, but email_validator
    # enforces that only with strict=True, and the intake accepts it (many MTAs do too).
    " ",
    "",
]

#: Printable ASCII without '@': never an address.
_NO_AT = st.text(
    st.sampled_from([c for c in string.printable if c != "@"]), min_size=0, max_size=30
)


def _wrong_types(json_only: bool, *, none: bool = False) -> st.SearchStrategy[Any]:
    """Values of the wrong JSON type for a string field (None only where it is required)."""
    options = [
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.lists(st.integers(), min_size=0, max_size=3),
        st.lists(_SAFE_TEXT, min_size=1, max_size=2),
        st.dictionaries(_SAFE_TEXT, st.integers(), max_size=2),
    ]
    if none:
        options.append(st.none())
    if not json_only:
        options += [
            st.binary(min_size=0, max_size=20),
            st.builds(object),
            st.frozensets(st.text(max_size=3), max_size=2),
        ]
    return st.one_of(options)


def _non_string(json_only: bool) -> st.SearchStrategy[Any]:
    """A list item that is not a string."""
    options = [st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)]
    options.append(st.dictionaries(_SAFE_TEXT, st.integers(), max_size=2))
    if not json_only:
        options += [st.binary(max_size=10), st.builds(object)]
    return st.one_of(options)


def _set(name: str, value: Any) -> Mutate:
    def apply(request: dict[str, Any]) -> None:
        request[name] = value

    return apply


def _positions(length: int) -> st.SearchStrategy[int]:
    """Where to insert: the ends (where `$` and strip() bite) as often as anywhere."""
    return st.one_of(st.just(0), st.just(length), st.integers(min_value=0, max_value=length))


def _insert(value: str, piece: str, position: int) -> str:
    position = min(position, len(value))
    return value[:position] + piece + value[position:]


def _as_list(request: dict[str, Any], name: str) -> list[Any]:
    value = request.get(name)
    if value is None:
        value = []
    elif isinstance(value, str):
        value = [value]
    request[name] = list(value)
    return request[name]


# A "slot" is one way to break the request; each claims the top-level fields it touches,
# so the slots of one example never overlap.


@st.composite
def _break_string(draw: st.DrawFn, name: str) -> Mutation:
    """Inject CR/LF/NUL, a lone surrogate, a line separator, or make it overlong."""
    current = {
        "account": ACCOUNT,
        "subject": "Hello there",
        "reply_to": "reply@example.com",
        "from_addr": "Sender <sender@example.com>",
        "idempotency_key": "order-77",
    }[name]
    kind = draw(st.sampled_from(["inject", "surrogate", "separator", "overlong"]))
    if name == "account" and kind == "separator":
        kind = "inject"
    known_bug = None
    if kind == "inject":
        piece = draw(st.sampled_from(INJECTIONS))
    elif kind == "surrogate":
        piece = draw(SURROGATES)
        if name == "account":
            known_bug = "account-surrogate"
    elif kind == "separator":
        piece = draw(st.sampled_from(OTHER_LINE_SEPARATORS))
        if name == "subject":
            known_bug = "splitlines-separator"
    else:
        limit = {"account": 100, "idempotency_key": 255}.get(name, 998)
        extra = draw(st.integers(min_value=1, max_value=500))
        if name in ("reply_to", "from_addr"):
            value = "N" * (limit + extra) + " <reply@example.com>"
        else:
            value = ("word " * (limit // 5 + extra))[: limit + extra]
        return Mutation(_set(name, value), frozenset({name}), f"{name} overlong ({len(value)})")
    if kind == "separator" and name in ("reply_to", "from_addr"):
        # Inside the addr-spec: next to a space or at an end, parsing strips it.
        position = current.find("<") + 2 if "<" in current else 1
    else:
        position = draw(_positions(len(current)))
    value = _insert(current, piece, position)
    return Mutation(
        _set(name, value), frozenset({name}), f"{name}: {kind} {piece!r} at {position}", known_bug
    )


@st.composite
def _break_address_list(draw: st.DrawFn, name: str, json_only: bool) -> Mutation:
    kind = draw(st.sampled_from(["inject", "surrogate", "separator", "bad", "overlong", "type"]))
    if kind == "type":
        if name == "to":
            value = draw(
                st.one_of(
                    _wrong_types(json_only).filter(lambda v: not isinstance(v, list)),
                    st.just([]),
                    st.just(""),
                    st.lists(_non_string(json_only), min_size=1, max_size=3),
                )
            )
        else:
            value = draw(
                st.one_of(
                    _wrong_types(json_only).filter(
                        lambda v: not isinstance(v, list) and v is not None
                    ),
                    st.just(""),
                    st.lists(_non_string(json_only), min_size=1, max_size=3),
                )
            )
        return Mutation(_set(name, value), frozenset({name}), f"{name} = {_short(value)!r}")
    index = draw(st.integers(min_value=0, max_value=3))
    if kind == "bad":
        item = draw(st.one_of(st.sampled_from(BAD_ADDRESSES), _NO_AT))
    elif kind == "overlong":
        item = "N" * draw(st.integers(min_value=999, max_value=1500)) + " <bob@example.com>"
    else:
        base = draw(addresses())
        piece = {
            "inject": st.sampled_from(INJECTIONS),
            "surrogate": SURROGATES,
            "separator": st.sampled_from(OTHER_LINE_SEPARATORS),
        }[kind]
        if kind == "separator":
            # Inside the addr-spec: next to a space or at an end, parsing strips it.
            at = base.find("<") + 2 if "<" in base else 1
            item = _insert(base, draw(piece), at)
        else:
            item = _insert(base, draw(piece), draw(_positions(len(base))))

    def apply(request: dict[str, Any]) -> None:
        items = _as_list(request, name)
        items.insert(min(index, len(items)), item)

    return Mutation(apply, frozenset({name}), f"{name}[~{index}] = {_short(item)!r}")


@st.composite
def _break_body(draw: st.DrawFn, name: str, json_only: bool) -> Mutation:
    kind = draw(st.sampled_from(["nul", "surrogate", "type"]))
    if kind == "type":
        value = draw(_wrong_types(json_only))
        if value is None:
            value = 0
        return Mutation(_set(name, value), frozenset({name}), f"{name} = {_short(value)!r}")
    base = "Hello,\r\nthis is the body.\n"
    piece = "\x00" if kind == "nul" else draw(SURROGATES)
    value = _insert(base, piece, draw(_positions(len(base))))
    return Mutation(_set(name, value), frozenset({name}), f"{name}: {kind}")


@st.composite
def _break_subject_type(draw: st.DrawFn, json_only: bool) -> Mutation:
    value = draw(_wrong_types(json_only, none=True))
    return Mutation(_set("subject", value), frozenset({"subject"}), f"subject = {value!r}")


@st.composite
def _break_scalar_type(draw: st.DrawFn, name: str, json_only: bool) -> Mutation:
    """account / reply_to / from_addr / idempotency_key of the wrong type or empty."""
    value = draw(
        st.one_of(
            _wrong_types(json_only).filter(lambda v: v is not None),
            st.just(""),
            *([st.just("   ")] if name == "account" else []),
        )
    )
    return Mutation(_set(name, value), frozenset({name}), f"{name} = {_short(value)!r}")


@st.composite
def _break_idempotency_key(draw: st.DrawFn) -> Mutation:
    value = draw(
        st.one_of(
            st.just(""),
            st.integers(min_value=256, max_value=2000).map(lambda n: "k" * n),
            st.tuples(
                _KEYS, st.sampled_from(["\t", "\n", "\r", "\x00", "\x7f", "\u2028", "\x1b"])
            ).map("".join),
            st.tuples(_KEYS, SURROGATES).map("".join),
        )
    )
    return Mutation(
        _set("idempotency_key", value), frozenset({"idempotency_key"}), f"key {_short(value)!r}"
    )


RESERVED = [
    "From",
    "To",
    "Cc",
    "Bcc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Sender",
    "Return-Path",
    "Received",
]
BAD_HEADER_NAMES = ["", "X Tag", "X:Tag", "X-Täg", "X\tTag", "X-" + "a" * 75, " X-Tag", "X-Tag "]


HEADER_BREAKS = (
    *("name-inject", "value-inject", "value-overlong", "reserved", "bad-name", "type"),
    *("value-type", "too-many", "not-pair", "separator", "surrogate"),
)
ATTACHMENT_BREAKS = (
    *("type", "item", "unknown-key", "filename", "filename-inject", "content"),
    *("content-type", "too-many", "separator", "surrogate"),
)


@st.composite
def _break_headers(draw: st.DrawFn, json_only: bool) -> Mutation:
    kind = draw(st.sampled_from(HEADER_BREAKS))
    known_bug = None
    name, value = "X-Tag", "spring"
    pairs_form = draw(st.booleans()) or kind in ("not-pair",)
    if kind == "name-inject":
        piece = draw(st.sampled_from(INJECTIONS))
        name = _insert(name, piece, draw(_positions(len(name))))
        if re.fullmatch(r"[!-9;-~]+\n", name):
            known_bug = "header-name-trailing-lf"
    elif kind == "value-inject":
        piece = draw(st.sampled_from(INJECTIONS))
        value = _insert(value, piece, draw(_positions(len(value))))
    elif kind == "separator":
        piece = draw(st.sampled_from(OTHER_LINE_SEPARATORS))
        value = _insert(value, piece, draw(_positions(len(value))))
        known_bug = "splitlines-separator"
    elif kind == "surrogate":
        piece = draw(SURROGATES)
        if draw(st.booleans()):
            value = _insert(value, piece, draw(_positions(len(value))))
        else:
            name = _insert(name, piece, draw(_positions(len(name))))
    elif kind == "value-overlong":
        value = "v" * draw(st.integers(min_value=999, max_value=1500))
    elif kind == "reserved":
        name = draw(st.sampled_from(RESERVED))
        name = draw(st.sampled_from([name, name.lower(), name.upper()]))
        value = "victim@example.org"
    elif kind == "bad-name":
        name = draw(st.sampled_from(BAD_HEADER_NAMES))
    elif kind == "value-type":
        value = draw(_non_string(json_only))
    elif kind == "type":
        whole = draw(
            st.one_of(
                st.integers(),
                st.booleans(),
                st.floats(allow_nan=False, allow_infinity=False),
                st.text(max_size=20),
            )
        )
        return Mutation(_set("headers", whole), frozenset({"headers"}), f"headers = {whole!r}")
    elif kind == "too-many":
        count = draw(st.integers(min_value=51, max_value=80))
        entries = [[f"X-H{i}", "v"] for i in range(count)]
        whole = entries if pairs_form else dict(entries)
        return Mutation(_set("headers", whole), frozenset({"headers"}), f"{count} headers")
    elif kind == "not-pair":
        item = draw(
            st.one_of(
                st.just(["X-Tag"]),
                st.just(["X-Tag", "a", "b"]),
                st.just("X-Tag: a"),
                st.integers(),
                st.none(),
            )
        )
        return Mutation(
            _set("headers", [["X-Ok", "fine"], item]), frozenset({"headers"}), f"item {item!r}"
        )
    if not pairs_form and not json_only and draw(st.booleans()):
        name_value: Any = draw(st.sampled_from([1, None, b"X-Tag", ("X", "Tag")]))
        name = name_value
        pairs_form = False

    def apply(request: dict[str, Any]) -> None:
        existing = request.get("headers")
        entries = list(existing.items()) if isinstance(existing, dict) else list(existing or [])
        entries = [list(e) for e in entries if e[0] != name]
        entries.append([name, value])
        request["headers"] = entries if pairs_form else {e[0]: e[1] for e in entries}

    return Mutation(
        apply,
        frozenset({"headers"}),
        f"headers: {kind} {_short(name)!r}: {_short(value)!r}",
        known_bug,
    )


@st.composite
def _break_attachments(draw: st.DrawFn, json_only: bool) -> Mutation:
    kind = draw(st.sampled_from(ATTACHMENT_BREAKS))
    item: Any = {"filename": "report.pdf", "content_type": "application/pdf", "content": "aGk="}
    known_bug = None
    if kind == "type":
        whole = draw(
            st.one_of(
                st.integers(),
                st.booleans(),
                st.text(max_size=10),
                st.dictionaries(_SAFE_TEXT, st.integers(), max_size=2),
            )
        )
        return Mutation(
            _set("attachments", whole), frozenset({"attachments"}), f"attachments = {whole!r}"
        )
    if kind == "too-many":
        count = draw(st.integers(min_value=51, max_value=70))
        whole = [dict(item, filename=f"f{i}.pdf") for i in range(count)]
        return Mutation(_set("attachments", whole), frozenset({"attachments"}), f"{count} files")
    if kind == "item":
        item = draw(st.one_of(_non_string(json_only), st.text(max_size=10)))
    elif kind == "unknown-key":
        item = dict(item, **{draw(st.sampled_from(["size", "path", "url", "name"])): "x"})
    elif kind == "filename":
        item = dict(
            item,
            filename=draw(
                st.one_of(
                    st.sampled_from(
                        ["", "   ", "../etc/passwd", "a/b.txt", "C:\\evil.exe", "..\\x.bat"]
                    ),
                    st.integers(min_value=256, max_value=600).map(lambda n: "f" * n),
                    _non_string(json_only),
                )
            ),
        )
        if item["filename"] is None:
            del item["filename"]
    elif kind in ("filename-inject", "separator", "surrogate"):
        piece = draw(
            {
                "filename-inject": st.sampled_from(INJECTIONS),
                "separator": st.sampled_from(OTHER_LINE_SEPARATORS),
                "surrogate": SURROGATES,
            }[kind]
        )
        name = _insert("report.pdf", piece, draw(_positions(10)))
        item = dict(item, filename=name)
        if kind == "separator":
            known_bug = "splitlines-separator"
    elif kind == "content":
        bad = draw(
            st.one_of(
                st.sampled_from(["***", "aGk", "aGk=x", "!!!!", "aGk=\x00", "a\u00e9Gk="]),
                _non_string(json_only),
            )
        )
        item = dict(item, content=bad)
        if bad is None:
            del item["content"]
    elif kind == "content-type":
        bad = draw(
            st.one_of(
                st.sampled_from(
                    ["text", "text/", "/plain", "text/plain; charset=utf-8", "text plain"]
                ),
                st.tuples(
                    st.sampled_from(["text/plain", "application/pdf"]),
                    st.sampled_from(INJECTIONS),
                    st.sampled_from([0, 4, 99]),
                ).map(lambda t: _insert(t[0], t[1], t[2])),
                st.tuples(st.just("text/plain"), SURROGATES).map("".join),
                st.integers(min_value=1),
                st.just(True),
                st.lists(st.integers(), min_size=1, max_size=2),
            )
        )
        item = dict(item, content_type=bad)
        if isinstance(bad, str) and re.fullmatch(r"[^\n]+\n", bad) and "\r" not in bad:
            known_bug = "content-type-trailing-lf"
    index = draw(st.integers(min_value=0, max_value=2))

    def apply(request: dict[str, Any]) -> None:
        files = _as_list(request, "attachments")
        files.insert(min(index, len(files)), item)

    return Mutation(
        apply, frozenset({"attachments"}), f"attachments: {kind} {_short(item)!r}", known_bug
    )


@st.composite
def _missing(draw: st.DrawFn) -> Mutation:
    which = draw(st.sampled_from(["account", "to", "subject", "body"]))
    names = ("text", "html") if which == "body" else (which,)

    def apply(request: dict[str, Any]) -> None:
        for name in names:
            request.pop(name, None)

    return Mutation(apply, frozenset(names), f"missing {which}")


_UNKNOWN_NAMES = st.one_of(
    st.sampled_from(["subjet", "recipients", "body", "Subject", "from", "replyTo", "attachment"]),
    st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True),
)


@st.composite
def _unknown_field(draw: st.DrawFn) -> Mutation:
    from worker.intake import REQUEST_FIELDS

    name = draw(_UNKNOWN_NAMES.filter(lambda n: n not in REQUEST_FIELDS))
    value = draw(st.one_of(st.none(), st.integers(), _SAFE_TEXT))
    return Mutation(_set(name, value), frozenset({name}), f"unknown field {name!r}")


@st.composite
def _unknown_account(draw: st.DrawFn) -> Mutation:
    name = draw(
        st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True).filter(lambda n: n != ACCOUNT)
    )
    return Mutation(_set("account", name), frozenset({"account"}), f"unknown account {name!r}")


#: The recipient limit is on To + Cc + Bcc together; the refusal names `to`.
RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc"})
#: The size limit is on the whole message; the refusal names `text` or `attachments`.
SIZE_FIELDS = frozenset({"text", "html", "attachments"})


@st.composite
def _too_many_recipients(draw: st.DrawFn, max_recipients: int = 2500) -> Mutation:
    name = draw(st.sampled_from(sorted(RECIPIENT_FIELDS)))
    count = draw(st.integers(min_value=101, max_value=max_recipients))
    value = [f"r{i}@example.com" for i in range(count)]
    return Mutation(_set(name, value), RECIPIENT_FIELDS, f"{count} addresses in {name}")


@st.composite
def _too_big(draw: st.DrawFn, max_bytes: int = 200_000) -> Mutation:
    which = draw(st.sampled_from(["text", "html", "attachment"]))
    size = draw(st.integers(min_value=MAX_MESSAGE_BYTES + 1, max_value=max_bytes))
    if which == "attachment":
        data = b"\x00\xff" * (size // 2)  # encoded size 4/3 of this: over the limit
        item = {"filename": "big.bin", "content": base64.b64encode(data).decode()}

        def apply(request: dict[str, Any]) -> None:
            _as_list(request, "attachments").append(item)

        return Mutation(apply, SIZE_FIELDS, f"attachment of {len(data)} bytes")
    return Mutation(_set(which, "x" * size), SIZE_FIELDS, f"{which} of {size} characters")


def _slots(json_only: bool, *, large: bool) -> dict[str, st.SearchStrategy[Mutation]]:
    """Every way to break a request, by the fields it claims."""
    return {
        "account": st.one_of(_break_string("account"), _break_scalar_type("account", json_only)),
        "unknown-account": _unknown_account(),
        "to": _break_address_list("to", json_only),
        "cc": _break_address_list("cc", json_only),
        "bcc": _break_address_list("bcc", json_only),
        "reply_to": st.one_of(
            _break_string("reply_to"),
            _break_address_list_scalar("reply_to"),
            _break_scalar_type("reply_to", json_only),
        ),
        "from_addr": st.one_of(
            _break_string("from_addr"),
            _break_address_list_scalar("from_addr"),
            _break_scalar_type("from_addr", json_only),
        ),
        "subject": st.one_of(_break_string("subject"), _break_subject_type(json_only)),
        "text": _break_body("text", json_only),
        "html": _break_body("html", json_only),
        "headers": _break_headers(json_only),
        "attachments": _break_attachments(json_only),
        "idempotency_key": st.one_of(
            _break_idempotency_key(),
            _break_string("idempotency_key"),
            _break_scalar_type("idempotency_key", json_only),
        ),
        "missing": _missing(),
        "unknown": _unknown_field(),
        "recipients": _too_many_recipients(2500 if large else 400),
        "size": _too_big(200_000 if large else 20_000),
    }


@st.composite
def _break_address_list_scalar(draw: st.DrawFn, name: str) -> Mutation:
    """reply_to / from_addr that fail RFC syntax."""
    value = draw(st.one_of(st.sampled_from(BAD_ADDRESSES), _NO_AT))
    return Mutation(_set(name, value), frozenset({name}), f"{name} = {_short(value)!r}")


#: Which top-level fields each slot may touch (slots of one example are disjoint).
_SLOT_FIELDS = {
    "account": {"account"},
    "unknown-account": {"account"},
    "to": {"to"},
    "cc": {"cc"},
    "bcc": {"bcc"},
    "reply_to": {"reply_to"},
    "from_addr": {"from_addr"},
    "subject": {"subject"},
    "text": {"text"},
    "html": {"html"},
    "headers": {"headers"},
    "attachments": {"attachments"},
    "idempotency_key": {"idempotency_key"},
    "missing": {"account", "to", "subject", "text", "html"},
    "unknown": {"<unknown>"},
    "recipients": set(RECIPIENT_FIELDS),
    "size": set(SIZE_FIELDS),
}


#: Every way to break a request, by name: tests parametrize over these so each gets the
#: same share of examples (Hypothesis favours the first entries of a `sampled_from`).
SLOTS = tuple(sorted(_SLOT_FIELDS))


@st.composite
def hostile_requests(
    draw: st.DrawFn,
    *,
    json_only: bool = False,
    large: bool = True,
    max_breaks: int = 3,
    first: str | None = None,
) -> Hostile:
    """A valid request with 1 to `max_breaks` of its fields broken; `first` names one
    way of breaking it that is always among them."""
    request = draw(good_requests())
    slots = _slots(json_only, large=large)
    count = draw(st.integers(min_value=1, max_value=max_breaks))
    names = draw(st.lists(st.sampled_from(SLOTS), min_size=count, max_size=count, unique=True))
    if first is not None:
        names = [first, *(name for name in names if name != first)][:count]
    chosen: list[str] = []
    taken: set[str] = set()
    for name in names:
        if _SLOT_FIELDS[name] & taken:
            continue
        chosen.append(name)
        taken |= _SLOT_FIELDS[name]
    mutations = [draw(slots[name]) for name in chosen]
    for mutation in mutations:
        mutation.apply(request)
    bugs = [m.known_bug for m in mutations if m.known_bug]
    return Hostile(
        request=request,
        broken=frozenset().union(*(m.broken for m in mutations)),
        what=tuple(m.what for m in mutations),
        known_bug=bugs[0] if bugs else None,
        slots=tuple(chosen),
    )


def names_a_field(message: str, fields: frozenset[str]) -> bool:
    """Does a refusal's text (``"cc[3]: ...; subject: ..."``) name one of `fields`?"""
    return any(
        re.search(rf"(?:^|; |\(['\"]){re.escape(name)}(?:\[|\.|: )", message) for name in fields
    )
