"""Unit tests for the door (worker.intake): what is accepted, and how each refusal reads."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.intake import (
    EmailRequest,
    InvalidRequest,
    Limits,
    new_message_id,
    validate_batch,
    validate_request,
)
from worker.message import Attachment

LIMITS = Limits()
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _request(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "account": "acme",
        "to": ["bob@example.com"],
        "subject": "Your invoice",
        "text": "Hello Bob",
    }
    for key, value in changes.items():
        if value is _DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


_DROP = object()


def _refusal(payload: Any, limits: Limits = LIMITS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_request(payload, limits=limits)
    return info.value


def _fields(payload: Any, limits: Limits = LIMITS) -> list[str]:
    return [e.field for e in _refusal(payload, limits).errors]


def _attachment(**changes: Any) -> dict[str, Any]:
    item = {
        "filename": "invoice.pdf",
        "content_type": "application/pdf",
        "content": base64.b64encode(b"%PDF-1.4 fake").decode(),
    }
    item.update(changes)
    return item


# --- Accepted requests ----------------------------------------------------------------


def test_minimal_request_is_accepted():
    request = validate_request(_request(), limits=LIMITS)
    assert isinstance(request, EmailRequest)
    assert request.account == "acme"
    assert request.to == ("bob@example.com",)
    assert request.subject == "Your invoice"
    assert request.text == "Hello Bob"
    assert request.size_bytes > 0


def test_good_request_is_normalised_and_display_names_kept():
    request = validate_request(
        _request(
            account="  acme  ",
            to=["Bob Smith <Bob@EXAMPLE.com>", '"Smith, Carol" <carol@example.org>'],
            cc="  dave@Example.NET ",
            bcc=["erin@example.com"],
            reply_to="Support <help@example.com>",
            from_addr="Acme Billing <billing@acme.example.com>",
            html="<p>Hello</p>",
            headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"},
            attachments=[_attachment()],
            idempotency_key="invoice-42",
        ),
        limits=LIMITS,
    )
    assert request.account == "acme"
    # The domain is lower-cased; the local part and the display name are kept.
    assert request.to == ("Bob Smith <Bob@example.com>", '"Smith, Carol" <carol@example.org>')
    assert request.cc == ("dave@example.net",)
    assert request.bcc == ("erin@example.com",)
    assert request.reply_to == "Support <help@example.com>"
    assert request.from_addr == "Acme Billing <billing@acme.example.com>"
    assert request.headers == (
        ("X-Campaign", "spring"),
        ("List-Unsubscribe", "<mailto:u@example.com>"),
    )
    assert request.attachments == (
        Attachment(filename="invoice.pdf", content_type="application/pdf", data=b"%PDF-1.4 fake"),
    )
    assert request.idempotency_key == "invoice-42"


def test_html_only_body_is_enough():
    request = validate_request(_request(text=_DROP, html="<p>Hi</p>"), limits=LIMITS)
    assert request.text is None
    assert request.html == "<p>Hi</p>"


def test_headers_as_name_value_pairs_are_accepted():
    request = validate_request(_request(headers=[["X-A", "1"], ("X-B", "2")]), limits=LIMITS)
    assert request.headers == (("X-A", "1"), ("X-B", "2"))


def test_attachment_without_content_type_defaults_to_octet_stream():
    item = _attachment()
    del item["content_type"]
    request = validate_request(_request(attachments=[item]), limits=LIMITS)
    assert request.attachments[0].content_type == "application/octet-stream"


def test_attachment_objects_from_the_python_client_are_accepted():
    attachment = Attachment(filename="a.bin", content_type="application/zip", data=b"\x00\x01")
    request = validate_request(_request(attachments=[attachment]), limits=LIMITS)
    assert request.attachments == (attachment,)


def test_duplicate_recipients_count_once_against_the_limit():
    payload = _request(
        to=["a@example.com", "b@example.com"],
        cc=["a@example.com"],
        bcc=["c@example.com", "b@example.com"],
    )
    request = validate_request(payload, limits=Limits(max_recipients=3))
    assert request.bcc == ("c@example.com", "b@example.com")


# --- Injection: CR, LF and NUL in every header-ish field ------------------------------

INJECTION_CASES: list[tuple[str, Any]] = [
    ("to[0]", lambda bad: {"to": [f"bob@example.com{bad}"]}),
    ("to[1]", lambda bad: {"to": ["ok@example.com", f"bob@example.com{bad}Bcc: x@example.com"]}),
    ("cc[0]", lambda bad: {"cc": [f"carol@example.com{bad}"]}),
    ("bcc[0]", lambda bad: {"bcc": [f"dave@example.com{bad}"]}),
    ("reply_to", lambda bad: {"reply_to": f"help@example.com{bad}"}),
    ("from_addr", lambda bad: {"from_addr": f"Acme{bad} <billing@example.com>"}),
    ("subject", lambda bad: {"subject": f"Hello{bad}Bcc: victim@example.com"}),
    ("headers['X-Campaign']", lambda bad: {"headers": {"X-Campaign": f"spring{bad}X-Evil: 1"}}),
    ("attachments[0].filename", lambda bad: {"attachments": [_attachment(filename=f"a{bad}.pdf")]}),
]


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\x00"], ids=["CR", "LF", "CRLF", "NUL"])
@pytest.mark.parametrize(("field", "make"), INJECTION_CASES, ids=[c[0] for c in INJECTION_CASES])
def test_line_breaks_and_nul_in_header_fields_are_refused_naming_the_field(field, make, bad):
    error = _refusal(_request(**make(bad)))
    assert [e.field for e in error.errors] == [field]
    assert "line breaks" in error.errors[0].reason
    assert field in str(error)


def test_nul_in_the_body_is_refused_but_line_breaks_are_fine():
    assert validate_request(_request(text="line 1\r\nline 2\n"), limits=LIMITS).text
    assert _fields(_request(text="a\x00b")) == ["text"]
    assert _fields(_request(html="<p>\x00</p>")) == ["html"]


# --- Headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "from",
        "BCC",
        "Message-ID",
        "message-id",
        "Content-Type",
        "Content-Transfer-Encoding",
        "MIME-Version",
        "Subject",
        "Reply-To",
        "Date",
        "Return-Path",
    ],
)
def test_reserved_headers_are_refused_case_insensitively(name):
    error = _refusal(_request(headers={name: "x"}))
    assert [e.field for e in error.errors] == [f"headers[{name!r}]"]
    assert "set by Outbox" in error.errors[0].reason


@pytest.mark.parametrize("name", ["X Bad", "X:Bad", "X-Ünï", "", "X-" + "a" * 80])
def test_bad_header_names_are_refused(name):
    error = _refusal(_request(headers={name: "x"}))
    assert [e.field for e in error.errors] == [f"headers[{name!r}]"]
    assert "not a valid header name" in error.errors[0].reason


def test_header_value_that_is_not_a_string_is_refused():
    assert _fields(_request(headers={"X-Count": 3})) == ["headers['X-Count']"]


def test_header_pair_of_wrong_shape_is_refused_by_position():
    assert _fields(_request(headers=[["X-A", "1"], ["X-B"]])) == ["headers[1]"]


def test_too_many_headers_are_refused():
    headers = {f"X-H{i}": "v" for i in range(51)}
    assert _fields(_request(headers=headers)) == ["headers"]


def test_overlong_header_value_is_refused():
    assert _fields(_request(headers={"X-Long": "v" * 999})) == ["headers['X-Long']"]


# --- Shape of the request ---------------------------------------------------------------


def test_unknown_fields_are_refused_by_name():
    error = _refusal(_request(attachment=[], urgency="high"))
    assert [e.field for e in error.errors] == ["attachment", "urgency"]
    assert all("not a field of outbox.enqueue" in e.reason for e in error.errors)


@pytest.mark.parametrize("payload", [None, "to=bob", ["bob@example.com"], 42])
def test_request_that_is_not_an_object_is_refused(payload):
    assert _fields(payload) == ["request"]


@pytest.mark.parametrize(
    ("changes", "field", "type_name"),
    [
        ({"to": 5}, "to", "int"),
        ({"cc": {"a": "b"}}, "cc", "dict"),
        ({"to": [5]}, "to[0]", "int"),
        ({"headers": "X-A: 1"}, "headers", "str"),
        ({"attachments": {"filename": "a.pdf"}}, "attachments", "dict"),
        ({"text": ["Hello"]}, "text", "list"),
        ({"html": 1}, "html", "int"),
        ({"subject": 7}, "subject", "int"),
        ({"reply_to": ["help@example.com"]}, "reply_to", "list"),
    ],
)
def test_wrong_json_types_are_refused_naming_field_and_type(changes, field, type_name):
    error = _refusal(_request(**changes))
    assert [e.field for e in error.errors] == [field]
    assert type_name in error.errors[0].reason


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"account": _DROP}, "account"),
        ({"account": "   "}, "account"),
        ({"account": 12}, "account"),
        ({"subject": _DROP}, "subject"),
        ({"text": _DROP}, "text"),
        ({"to": _DROP}, "to"),
        ({"to": []}, "to"),
        ({"to": None}, "to"),
    ],
)
def test_missing_required_fields_are_refused(changes, field):
    assert _fields(_request(**changes)) == [field]


def test_empty_subject_is_allowed():
    assert validate_request(_request(subject=""), limits=LIMITS).subject == ""


def test_account_name_with_line_break_or_too_long_is_refused():
    assert _fields(_request(account="acme\nx")) == ["account"]
    assert _fields(_request(account="a" * 101)) == ["account"]


@pytest.mark.parametrize(
    "address",
    [
        "bob",
        "bob@",
        "@example.com",
        "bob@@example.com",
        "bob@host.invalid",  # reserved never to exist (RFC 6761)
        "bob@invalid",
        "bob@1.2.3.4",  # not a domain name
        "bob@[127.0.0.1]",
        "bob@.local",
        "bob@corp..local",
        "bob@corp.local.",
        "bob smith@corp.local",
        "   ",
    ],
)
def test_invalid_addresses_are_refused(address):
    error = _refusal(_request(to=["ok@example.com", address]))
    assert [e.field for e in error.errors] == ["to[1]"]


def test_a_reserved_domain_is_refused_with_the_address_in_the_reason():
    error = _refusal(_request(to=["bob@host.invalid"]))
    assert error.errors[0].field == "to[0]"
    assert "'bob@host.invalid' is not a valid email address" in error.errors[0].reason
    assert "special-use or reserved name" in error.errors[0].reason


@pytest.mark.parametrize(
    ("address", "stored"),
    [
        ("user@corp.local", "user@corp.local"),
        ("bob@shop.test", "bob@shop.test"),
        ("x@host.internal", "x@host.internal"),
        ("a@localhost", "a@localhost"),
        ("ops@mailhost", "ops@mailhost"),  # a dotless name, valid SMTP
        ("nas@home.arpa", "nas@home.arpa"),
        ("Bob <Bob@Shop.TEST>", "Bob <Bob@shop.test>"),
        ("jörg@exämple.test", "jörg@exämple.test"),
    ],
)
def test_special_use_and_internal_domains_are_accepted_for_the_account_relay(address, stored):
    # Only the account's own relay can say whether such an address exists.
    request = validate_request(
        _request(to=[address], cc=[address.replace("@", "+cc@", 1)]), limits=LIMITS
    )
    assert request.to == (stored,)


def test_special_use_domains_are_accepted_as_sender_and_reply_to():
    request = validate_request(
        _request(from_addr="Shop <shop@corp.local>", reply_to="help@shop.test"), limits=LIMITS
    )
    assert (request.from_addr, request.reply_to) == ("Shop <shop@corp.local>", "help@shop.test")


def test_a_special_use_domain_keeps_the_length_limit_of_the_address():
    # At most 254 characters in all (RFC 5321 + errata), whatever the domain.
    def address(total: int) -> str:
        domain = f"{'b' * 63}.{'c' * 63}.{'d' * (total - 64 - 1 - 134)}.local"
        return f"{'a' * 64}@{domain}"

    assert len(address(254)) == 254
    assert validate_request(_request(to=[address(254)]), limits=LIMITS).to == (address(254),)
    assert _fields(_request(to=[address(255)])) == ["to[0]"]


def test_too_many_recipients_across_to_cc_bcc_is_refused():
    payload = _request(to=["a@example.com", "b@example.com"], cc=["c@example.com"])
    payload["bcc"] = ["d@example.com"]
    error = _refusal(payload, Limits(max_recipients=3))
    assert [e.field for e in error.errors] == ["to"]
    assert "4 recipients" in error.errors[0].reason
    assert "at most 3" in error.errors[0].reason


# --- Size -------------------------------------------------------------------------------


def test_oversize_text_names_the_text_field():
    error = _refusal(_request(text="x" * 3000), Limits(max_message_bytes=2048))
    assert [e.field for e in error.errors] == ["text"]
    assert "OUTBOX_MAX_MESSAGE_BYTES" in error.errors[0].reason
    assert "2,048" in error.errors[0].reason


def test_oversize_with_attachments_names_the_attachments_field():
    content = base64.b64encode(b"\x00" * 2000).decode()
    payload = _request(attachments=[_attachment(content=content)])
    error = _refusal(payload, Limits(max_message_bytes=2048))
    assert [e.field for e in error.errors] == ["attachments"]
    assert "OUTBOX_MAX_MESSAGE_BYTES" in error.errors[0].reason


def test_message_under_the_size_limit_is_accepted():
    request = validate_request(_request(text="x" * 1000), limits=Limits(max_message_bytes=2048))
    assert request.size_bytes < 2048


# --- Attachments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "field", "words"),
    [
        (_attachment(content="not base64!!"), "attachments[0].content", "base64"),
        (_attachment(content=None), "attachments[0].content", "required"),
        (_attachment(filename="../etc/passwd"), "attachments[0].filename", "plain file name"),
        (_attachment(filename="dir\\file.txt"), "attachments[0].filename", "plain file name"),
        (_attachment(filename="a" * 256), "attachments[0].filename", "plain file name"),
        (_attachment(filename="  "), "attachments[0].filename", "required"),
        (_attachment(filename=None), "attachments[0].filename", "required"),
        (_attachment(content_type="pdf"), "attachments[0].content_type", "not a MIME type"),
        (_attachment(content_type="text/"), "attachments[0].content_type", "not a MIME type"),
        (
            _attachment(content_type="text/plain\r\nX-Evil: 1"),
            "attachments[0].content_type",
            "not a MIME type",
        ),
        (_attachment(data="text"), "attachments[0].data", "bytes"),
        (_attachment(size=3), "attachments[0]", "unknown fields: size"),
        ("invoice.pdf", "attachments[0]", "must be an object"),
    ],
)
def test_bad_attachments_are_refused_naming_the_field(item, field, words):
    error = _refusal(_request(attachments=[item]))
    assert [e.field for e in error.errors] == [field]
    assert words in error.errors[0].reason


def test_too_many_attachments_are_refused():
    assert _fields(_request(attachments=[_attachment()] * 51)) == ["attachments"]


def test_second_bad_attachment_is_named_by_its_position():
    items = [_attachment(), _attachment(content="%%%")]
    assert _fields(_request(attachments=items)) == ["attachments[1].content"]


# --- Idempotency key --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k" * 256, "", "a\tb", "line\nbreak", "nul\x00", 42])
def test_bad_idempotency_keys_are_refused(key):
    error = _refusal(_request(idempotency_key=key))
    assert [e.field for e in error.errors] == ["idempotency_key"]
    assert "1 to 255 characters" in error.errors[0].reason


def test_idempotency_key_of_255_printable_characters_is_accepted():
    key = "k" * 255
    assert validate_request(_request(idempotency_key=key), limits=LIMITS).idempotency_key == key


# --- Invalid UTF-8 (lone surrogates from a bad decode) ---------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"subject": "Hi \udcff"}, "subject"),
        ({"text": "body \udcff"}, "text"),
        ({"html": "<p>\udcff</p>"}, "html"),
        ({"to": ["bob\udcff@example.com"]}, "to[0]"),
        ({"from_addr": "Acme \udcff <billing@example.com>"}, "from_addr"),
        ({"headers": {"X-A": "\udcff"}}, "headers['X-A']"),
        ({"attachments": [_attachment(filename="a\udcff.pdf")]}, "attachments[0].filename"),
    ],
)
def test_lone_surrogates_are_refused_as_invalid_utf8(changes, field):
    error = _refusal(_request(**changes))
    assert [e.field for e in error.errors] == [field]
    assert "not valid UTF-8" in error.errors[0].reason


# --- Several errors, and the error's shape ---------------------------------------------


def test_every_bad_field_is_reported_at_once():
    payload = {
        "account": "",
        "to": 5,
        "headers": "X-A: 1",
        "attachments": {"filename": "a.pdf"},
        "text": ["Hello"],
        "idempotency_key": "",
        "priority": "urgent",
    }
    error = _refusal(payload)
    assert {e.field for e in error.errors} == {
        "priority",
        "account",
        "to",
        "subject",
        "text",
        "headers",
        "attachments",
        "idempotency_key",
    }
    for e in error.errors:
        assert f"{e.field}: {e.reason}" in str(error)


def test_as_dict_has_error_message_and_fields():
    error = _refusal(_request(subject=_DROP, to=["bob@host.invalid"]))
    data = error.as_dict()
    assert set(data) == {"error", "message", "fields"}
    assert data["error"] == "invalid_request"
    assert data["message"] == str(error)
    assert [f["field"] for f in data["fields"]] == ["to[0]", "subject"]
    assert all(set(f) == {"field", "reason"} for f in data["fields"])
    assert all(isinstance(f["reason"], str) and f["reason"] for f in data["fields"])


def test_invalid_request_is_a_value_error():
    assert isinstance(_refusal(_request(to=[])), ValueError)


# --- Message-ID ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_addr", "domain"),
    [
        ("billing@example.com", "example.com"),
        ("Acme Billing <billing@acme.example.com>", "acme.example.com"),
        ('"Smith, Bob" <bob@mail.example.org>', "mail.example.org"),
    ],
)
def test_message_id_uses_the_domain_of_the_from_address(from_addr, domain):
    message_id = new_message_id(from_addr, now=NOW)
    assert re.fullmatch(r"<[^<>@\s]+@" + re.escape(domain) + ">", message_id)


@pytest.mark.parametrize("from_addr", ["", "nobody", "billing@", "Acme <>"])
def test_message_id_falls_back_to_outbox_invalid_without_a_domain(from_addr):
    message_id = new_message_id(from_addr, now=NOW)
    assert message_id.endswith("@outbox.invalid>")
    assert re.fullmatch(r"<[^<>@\s]+@outbox\.invalid>", message_id)


def test_message_ids_are_unique():
    ids = {new_message_id("billing@example.com", now=NOW) for _ in range(1000)}
    assert len(ids) == 1000


def test_message_ids_sort_by_intake_time():
    earlier = new_message_id("a@example.com", now=datetime(2025, 1, 1, tzinfo=UTC))
    later = new_message_id("a@example.com", now=datetime(2025, 6, 1, tzinfo=UTC))
    assert earlier.split(".")[0] < later.split(".")[0]


# -- priority and send_at -----------------------------------------------------------------


@pytest.mark.parametrize(("value", "rank"), [(None, 1), ("high", 0), ("normal", 1), ("bulk", 2)])
def test_priority_is_ranked_in_send_order(value, rank):
    payload = _request() if value is None else _request(priority=value)
    assert validate_request(payload, limits=LIMITS, now=NOW).priority == rank


@pytest.mark.parametrize("value", ["urgent", "HIGH", "", 0, ["high"]])
def test_unknown_priority_is_refused_naming_the_choices(value):
    error = _refusal(_request(priority=value))
    assert [e.field for e in error.errors] == ["priority"]
    assert "high, normal, bulk" in error.errors[0].reason


def _send_at(value: Any, limits: Limits = LIMITS) -> datetime | None:
    return validate_request(_request(send_at=value), limits=limits, now=NOW).send_at


def test_send_at_with_a_zone_is_kept_in_utc():
    assert _send_at("2025-03-01T14:30:00+01:00") == datetime(2025, 3, 1, 13, 30, tzinfo=UTC)
    assert _send_at("2025-03-02T00:00:00Z") == datetime(2025, 3, 2, tzinfo=UTC)


def test_send_at_in_the_past_means_at_once():
    assert _send_at("2025-03-01T11:00:00+00:00") is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("2025-03-01T14:30:00", "time zone"),
        ("tomorrow at nine", "not an ISO 8601 time"),
        (1740830400, "ISO 8601 time string"),
        ("2025-04-15T12:00:00+00:00", "30 days ahead"),
    ],
)
def test_bad_send_at_is_refused_with_the_reason(value, words):
    with pytest.raises(InvalidRequest) as info:
        validate_request(_request(send_at=value), limits=LIMITS, now=NOW)
    assert [e.field for e in info.value.errors] == ["send_at"]
    assert words in info.value.errors[0].reason


def test_the_send_at_horizon_is_a_setting():
    limits = Limits(send_at_horizon_s=3600.0)
    assert _send_at("2025-03-01T12:59:00Z", limits) == datetime(2025, 3, 1, 12, 59, tzinfo=UTC)
    with pytest.raises(InvalidRequest):
        _send_at("2025-03-01T13:01:00Z", limits)


# -- enqueue_many -------------------------------------------------------------------------


def test_a_batch_validates_each_request_on_its_own_in_order():
    results = validate_batch(
        [_request(), _request(to=5), _request(priority="bulk")], limits=LIMITS, now=NOW
    )
    assert isinstance(results[0], EmailRequest)
    assert isinstance(results[1], InvalidRequest)
    assert [e.field for e in results[1].errors] == ["to"]
    assert isinstance(results[2], EmailRequest) and results[2].priority == 2


@pytest.mark.parametrize(
    ("requests", "words"),
    [
        ([_request()] * 1001, "1,001 requests; at most 1,000"),
        ([], "is empty"),
        ({"account": "acme"}, "must be a list"),
        ("[]", "must be a list"),
    ],
)
def test_a_batch_that_is_not_a_list_of_at_most_1000_is_refused_whole(requests, words):
    with pytest.raises(InvalidRequest) as info:
        validate_batch(requests, limits=LIMITS, now=NOW)
    assert [e.field for e in info.value.errors] == ["requests"]
    assert words in info.value.errors[0].reason


def test_a_batch_of_exactly_1000_is_accepted():
    assert len(validate_batch([_request()] * 1000, limits=LIMITS, now=NOW)) == 1000
