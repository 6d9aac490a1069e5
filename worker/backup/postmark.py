"""The Postmark adapter: `POST /email` and what its answers mean.

This module owns the Postmark request shape (comma-joined address strings, `Headers` as
Name/Value pairs carrying the original Message-ID, base64 `Attachments`, the "outbound"
message stream) and Postmark's answers: 200 with `ErrorCode` 0 and a `MessageID`, and
422 with an `ErrorCode` that says which problem it is (300 invalid request, 406 inactive
recipient, 400/401 sender signature, ...).
"""

from __future__ import annotations

import base64
from typing import Any

import httpx

from worker.backup.base import (
    BackupResult,
    HttpBackupProvider,
    body_parts,
    dict_body,
    extra_headers,
    text_body,
    with_quoted_name,
)
from worker.message import OutgoingEmail

DEFAULT_BASE_URL = "https://api.postmarkapp.com"
MESSAGE_STREAM = "outbound"

# Postmark's API error codes (https://postmarkapp.com/developer/api/overview#error-codes).
BAD_TOKEN = 10
MAINTENANCE = 100
INVALID_EMAIL_REQUEST = 300
SENDER_SIGNATURE_NOT_FOUND = 400
SENDER_SIGNATURE_NOT_CONFIRMED = 401
INVALID_JSON = 402
INCOMPATIBLE_JSON = 403
NOT_ALLOWED_TO_SEND = 405
INACTIVE_RECIPIENT = 406
JSON_REQUIRED = 409
FORBIDDEN_ATTACHMENT_TYPE = 411
ACCOUNT_PENDING = 412
ACCOUNT_MAY_NOT_SEND = 413
RATE_LIMIT = 429
STREAM_NOT_FOUND = 1235


def _join(addresses: tuple[str, ...]) -> str:
    # Re-written so that a display name with a comma is quoted: Postmark splits on
    # commas and answers ErrorCode 300 for an unquoted "Doe, Jane <j@x.test>".
    return ", ".join(with_quoted_name(address) for address in addresses)


def build_payload(email: OutgoingEmail, *, from_addr: str, reply_to: str | None) -> dict[str, Any]:
    """The JSON body of one `/email` request."""
    text, html = body_parts(email)
    payload: dict[str, Any] = {
        "From": with_quoted_name(from_addr),
        "To": _join(email.to),
        "Subject": email.subject,
        "Headers": [{"Name": "Message-ID", "Value": email.message_id}]
        + [{"Name": name, "Value": value} for name, value in extra_headers(email)],
        "MessageStream": MESSAGE_STREAM,
    }
    if email.cc:
        payload["Cc"] = _join(email.cc)
    if email.bcc:
        payload["Bcc"] = _join(email.bcc)
    if reply_to:
        payload["ReplyTo"] = with_quoted_name(reply_to)
    if text is not None:
        payload["TextBody"] = text
    if html is not None:
        payload["HtmlBody"] = html
    if email.attachments:
        payload["Attachments"] = [
            {
                "Name": attachment.filename,
                "Content": base64.b64encode(attachment.data).decode("ascii"),
                "ContentType": attachment.content_type,
            }
            for attachment in email.attachments
        ]
    return payload


class PostmarkProvider(HttpBackupProvider):
    """Postmark's `/email` endpoint with a server token."""

    name = "postmark"
    display_name = "Postmark"
    default_base_url = DEFAULT_BASE_URL

    def _post_message(
        self, email: OutgoingEmail, *, from_addr: str, reply_to: str | None
    ) -> httpx.Response:
        return self._post(
            "/email",
            json=build_payload(email, from_addr=from_addr, reply_to=reply_to),
            headers={
                "X-Postmark-Server-Token": self._api_key.reveal(),
                "Accept": "application/json",
            },
        )

    def _interpret(self, response: httpx.Response) -> BackupResult:
        status = response.status_code
        body = dict_body(response)
        code = body.get("ErrorCode")
        message = str(body.get("Message") or "")
        detail = f"ErrorCode {code}: {message}" if isinstance(code, int) else text_body(response)
        if 200 <= status < 300:
            if code == 0 and body.get("MessageID"):
                return self._sent(status, str(body["MessageID"]), message or "OK")
            if not isinstance(code, int) or code == 0:
                return self._unexpected_success(response, detail)
            # A non-zero ErrorCode is an error whatever the HTTP status says.
            return self._by_error_code(status, code, message, detail)
        if status == 401 or code == BAD_TOKEN:
            return self._bad_key(status, detail)
        if status == 422 and isinstance(code, int):
            return self._by_error_code(status, code, message, detail)
        return self._by_status(response, detail)

    def _by_error_code(self, status: int, code: int, message: str, detail: str) -> BackupResult:
        lowered = message.lower()
        if code in (SENDER_SIGNATURE_NOT_FOUND, SENDER_SIGNATURE_NOT_CONFIRMED) or (
            code == INVALID_EMAIL_REQUEST and "sender signature" in lowered
        ):
            return self._failed(
                status,
                detail,
                "Postmark refused the sender address: it is not a confirmed Sender "
                "Signature (or verified domain) at Postmark. Confirm it in Postmark, or set "
                "OUTBOX_BACKUP_FROM to an address that is. No mail goes through the backup "
                "until then.",
                config=True,
            )
        if code == INACTIVE_RECIPIENT:
            return self._failed(
                status,
                detail,
                "Postmark will not send to an inactive recipient: the address bounced "
                "hard before or marked earlier mail as spam, so Postmark suppresses it. "
                "Remove the recipient, or reactivate it in Postmark only if the address "
                "is known to be good again.",
            )
        if code == INVALID_EMAIL_REQUEST:
            return self._failed(
                status,
                detail,
                f"Postmark found the message invalid: {message or 'invalid email request'}. "
                "It will not be accepted as it is (check its addresses, its body, and that "
                "it has at most 50 recipients); correct it and send it again.",
            )
        if code == FORBIDDEN_ATTACHMENT_TYPE:
            return self._failed(
                status,
                detail,
                "Postmark does not accept one of the attachments' file types: send the "
                "file another way (for example as a link).",
            )
        if code in (NOT_ALLOWED_TO_SEND, ACCOUNT_PENDING, ACCOUNT_MAY_NOT_SEND):
            return self._failed(
                status,
                detail,
                f"Postmark does not let Outbox's account send right now ({message}): "
                "check the Postmark account (approval, credits, sending suspended).",
                config=True,
            )
        if code == STREAM_NOT_FOUND:
            return self._failed(
                status,
                detail,
                f"The Postmark server has no '{MESSAGE_STREAM}' message stream: check that "
                "OUTBOX_BACKUP_API_KEY is a server token of a server with transactional "
                "sending.",
                config=True,
            )
        if code in (INVALID_JSON, INCOMPATIBLE_JSON, JSON_REQUIRED):
            return self._failed(
                status,
                detail,
                f"Postmark could not read Outbox's request ({message}): this is a fault in "
                "Outbox's Postmark adapter, not in the message; report it.",
                config=True,
            )
        if code in (MAINTENANCE, RATE_LIMIT):
            return self._retry(
                status,
                detail,
                f"Postmark is not taking mail right now ({message}): the message is sent "
                "again later.",
            )
        return self._failed(
            status,
            detail,
            f"Postmark refused the message: {message or detail}. It will not be accepted as it is.",
        )
