"""One email as Outbox sends it: the content that every channel (SMTP, backup) shares.

`OutgoingEmail` is what the store hands to a transport; `compose` turns it into MIME
with the standard `email` package, keeping the Message-ID fixed at intake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class OutgoingEmail:
    """Validated content of one message. Addresses are plain strings, already checked."""

    message_id: str  #: e.g. "<0190...@outbox.example>", fixed at intake
    from_addr: str  #: may carry a display name: "Acme Support <support@acme.test>"
    to: tuple[str, ...]
    subject: str
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: str | None = None
    text: str | None = None
    html: str | None = None
    #: Extra headers, already checked for injection, in the caller's order.
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    date: datetime | None = None

    @property
    def recipients(self) -> tuple[str, ...]:
        """Envelope recipients: To, Cc and Bcc, each once, in that order."""
        seen: dict[str, None] = {}
        for address in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(address, None)
        return tuple(seen)


def compose(email: OutgoingEmail) -> EmailMessage:
    """The MIME message: text and/or html alternative, attachments, stable Message-ID.

    Bcc is deliberately absent from the headers; it travels only in the envelope.
    """
    msg = EmailMessage(policy=SMTP)
    _put(msg, "From", email.from_addr)
    _put(msg, "To", ", ".join(email.to))
    if email.cc:
        _put(msg, "Cc", ", ".join(email.cc))
    if email.reply_to:
        _put(msg, "Reply-To", email.reply_to)
    _put(msg, "Subject", email.subject)
    if email.date is not None:
        _put(msg, "Date", format_datetime(email.date))
    _put(msg, "Message-ID", email.message_id)
    for name, value in email.headers:
        msg[name] = value

    if email.text is not None:
        msg.set_content(email.text)
        if email.html is not None:
            msg.add_alternative(email.html, subtype="html")
    elif email.html is not None:
        msg.set_content(email.html, subtype="html")
    else:
        msg.set_content("")

    for attachment in email.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        msg.add_attachment(
            attachment.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=attachment.filename,
        )
    return msg


def _put(msg: EmailMessage, name: str, value: str) -> None:
    """Set a header, skipping the email package's parse of values that need nothing.

    Parsing a header into its structured form was half of `compose`'s time: a plain,
    printable ASCII value that fits on one line comes out exactly as given either way
    (intake already checked and normalised it), so it is stored raw. Anything else (non-
    ASCII to encode, a long line to fold, surrounding spaces, a control character to
    refuse) takes the full path. tests/unit/test_compose.py holds the two to the same bytes.
    """
    if (
        value.isascii()
        and value.isprintable()
        and value == value.strip()
        and value
        and len(name) + 2 + len(value) <= 78
    ):
        msg.set_raw(name, value)
    else:
        msg[name] = value
