"""Unit tests for building the MIME message (worker.message): what recipients' mail programs see."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import message as message_module
from worker.message import Attachment, OutgoingEmail, compose

MESSAGE_ID = "<18f2a3b4c5d.0123456789abcdef.outbox@example.com>"


def _email(**changes) -> OutgoingEmail:
    values = {
        "message_id": MESSAGE_ID,
        "from_addr": "Acme Billing <billing@example.com>",
        "to": ("bob@example.com",),
        "subject": "Your invoice",
        "text": "Hello Bob",
    }
    values.update(changes)
    return OutgoingEmail(**values)


def _wire(outgoing: OutgoingEmail) -> tuple[bytes, EmailMessage]:
    """The bytes sent, and those bytes parsed back as a mail program would."""
    raw = compose(outgoing).as_bytes()
    return raw, email.message_from_bytes(raw, policy=email.policy.default)


def test_headers_of_a_plain_message():
    raw, msg = _wire(_email(cc=("carol@example.org",), reply_to="help@example.com"))
    assert msg["From"] == "Acme Billing <billing@example.com>"
    assert msg["To"] == "bob@example.com"
    assert msg["Cc"] == "carol@example.org"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["Subject"] == "Your invoice"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Hello Bob"
    assert b"\r\n" in raw  # SMTP line endings


def test_message_id_header_is_the_one_fixed_at_intake():
    _, msg = _wire(_email())
    assert msg["Message-ID"] == MESSAGE_ID
    assert len(msg.get_all("Message-ID")) == 1


def test_bcc_is_in_the_envelope_but_not_in_the_headers():
    outgoing = _email(bcc=("secret@example.net",))
    raw, msg = _wire(outgoing)
    assert msg["Bcc"] is None
    assert b"secret@example.net" not in raw
    assert "secret@example.net" in outgoing.recipients


def test_recipients_are_to_cc_bcc_each_once_in_order():
    outgoing = _email(
        to=("a@example.com", "b@example.com"),
        cc=("c@example.com", "a@example.com"),
        bcc=("b@example.com", "d@example.com", "c@example.com"),
    )
    assert outgoing.recipients == (
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "d@example.com",
    )


def test_no_cc_or_reply_to_header_when_not_given():
    _, msg = _wire(_email())
    assert msg["Cc"] is None
    assert msg["Reply-To"] is None


def test_date_header_when_given():
    when = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
    _, msg = _wire(_email(date=when))
    assert parsedate_to_datetime(msg["Date"]) == when


def test_text_and_html_make_a_multipart_alternative():
    _, msg = _wire(_email(text="Hello Bob", html="<p>Hello <b>Bob</b></p>"))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "Hello Bob"
    assert parts[1].get_content().strip() == "<p>Hello <b>Bob</b></p>"
    assert msg.get_body(preferencelist=("html",)).get_content().strip().startswith("<p>")


def test_html_only_is_a_single_html_part():
    _, msg = _wire(_email(text=None, html="<p>Hi</p>"))
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<p>Hi</p>"


def test_no_body_is_an_empty_text_part():
    _, msg = _wire(_email(text=None))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == ""


def test_attachments_make_a_multipart_mixed_and_bytes_round_trip():
    pdf = b"%PDF-1.4\x00\xff\xfe binary \r\n bytes"
    png = bytes(range(256))
    outgoing = _email(
        html="<p>Hello</p>",
        attachments=(
            Attachment(filename="invoice.pdf", content_type="application/pdf", data=pdf),
            Attachment(filename="logo.png", content_type="image/png", data=png),
        ),
    )
    _, msg = _wire(outgoing)
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(preferencelist=("plain",))
    assert body.get_content().strip() == "Hello Bob"
    attachments = list(msg.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["invoice.pdf", "logo.png"]
    assert [a.get_content_type() for a in attachments] == ["application/pdf", "image/png"]
    assert [a.get_content() for a in attachments] == [pdf, png]
    assert all(a.get_content_disposition() == "attachment" for a in attachments)


def test_non_ascii_attachment_filename_round_trips():
    attachment = Attachment(filename="Rechnung März.pdf", content_type="application/pdf", data=b"x")
    _, msg = _wire(_email(attachments=(attachment,)))
    (part,) = msg.iter_attachments()
    assert part.get_filename() == "Rechnung März.pdf"


def test_extra_headers_are_present_in_order():
    headers = (("X-Campaign", "spring"), ("List-Unsubscribe", "<mailto:unsub@example.com>"))
    _, msg = _wire(_email(headers=headers))
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    names = [name for name, _ in msg.items()]
    assert names.index("X-Campaign") < names.index("List-Unsubscribe")


@pytest.mark.parametrize("subject", ["Grüße aus Köln", "Счёт №42", "請求書 🧾", "a" * 200 + " ü"])
def test_non_ascii_subject_is_encoded_and_reads_back(subject):
    raw, msg = _wire(_email(subject=subject))
    raw.decode("ascii")  # encoded words, not raw 8-bit headers
    assert msg["Subject"] == subject


def test_non_ascii_display_names_are_encoded_and_read_back():
    raw, msg = _wire(
        _email(
            from_addr="Zoë Ünïcode <billing@example.com>",
            to=('"Müller, Jörg" <joerg@example.com>', "Ana <ana@example.org>"),
        )
    )
    raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Zoë Ünïcode", "billing@example.com")
    to = msg["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Müller, Jörg", "joerg@example.com"),
        ("Ana", "ana@example.org"),
    ]


def test_non_ascii_text_body_reads_back():
    _, msg = _wire(_email(text="Grüße, Zoë — 請求書"))
    assert msg.get_content().strip() == "Grüße, Zoë — 請求書"


def test_display_name_as_stored_by_intake_reads_back_unchanged():
    from worker.intake import Limits, validate_request

    request = validate_request(
        {
            "account": "acme",
            "to": ['"Zoë Ünï" <zoe@example.com>'],
            "from_addr": '"Acme Straße" <billing@example.com>',
            "subject": "Hi",
            "text": "x",
        },
        limits=Limits(),
    )
    _, msg = _wire(_email(from_addr=request.from_addr, to=request.to))
    assert msg["From"].addresses[0].display_name == "Acme Straße"
    assert msg["To"].addresses[0].display_name == "Zoë Ünï"


_ADDRESSES = st.sampled_from(
    [
        "a@example.com",
        "x@y.io",
        "very.long.address.for.testing.purposes.here@sub.domain.example.org",
        "Acme <billing@example.com>",
        '"Doe, John" <john@example.com>',
        "=?utf-8?b?w6lsw6g=?= <elle@example.com>",
        "Zoë Quinn <zoe@example.com>",
        "A" * 70 + " <long@example.com>",
    ]
)


@st.composite
def _emails(draw: st.DrawFn) -> OutgoingEmail:
    subject = draw(
        st.one_of(
            st.text(max_size=120),
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
        )
    )
    return _email(
        from_addr=draw(_ADDRESSES),
        to=tuple(draw(st.lists(_ADDRESSES, min_size=1, max_size=4))),
        cc=tuple(draw(st.lists(_ADDRESSES, max_size=2))),
        reply_to=draw(st.one_of(st.none(), _ADDRESSES)),
        subject=subject.replace("\r", "").replace("\n", ""),
        date=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _full_path(msg: EmailMessage, name: str, value: str) -> None:
    msg[name] = value


@settings(max_examples=400, deadline=None)
@given(outgoing=_emails())
def test_headers_stored_raw_come_out_as_the_email_package_writes_them(outgoing):
    """compose() skips parsing plain one-line ASCII headers (for speed); the bytes on the
    wire must be exactly those of the full path, whatever the headers hold."""
    try:
        with mock.patch.object(message_module, "_put", _full_path):
            full = compose(outgoing).as_bytes()
    except ValueError:
        # A header the email package refuses (a form feed, say) is refused either way.
        with pytest.raises(ValueError):
            compose(outgoing).as_bytes()
        return
    fast = compose(outgoing).as_bytes()
    assert fast == full
