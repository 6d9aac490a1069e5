"""The SendGrid adapter: `POST /v3/mail/send` (v3 Mail Send API) and what its answers mean.

This module owns the SendGrid request shape (one personalization carrying To/Cc/Bcc,
text before html, base64 attachments, custom headers including the original Message-ID)
and SendGrid's answers: 202 with the id in `X-Message-Id`, `errors[].message` bodies,
and 403 for a sender address that is not a verified Sender Identity.
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
    split_address,
    text_body,
)
from worker.message import OutgoingEmail

DEFAULT_BASE_URL = "https://api.sendgrid.com"
EU_BASE_URL = "https://api.eu.sendgrid.com"

#: Headers SendGrid refuses to take from the request (beyond those Outbox sets itself).
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
    }
)


def _party(address: str) -> dict[str, str]:
    name, addr = split_address(address)
    return {"email": addr, "name": name} if name else {"email": addr}


def build_payload(email: OutgoingEmail, *, from_addr: str, reply_to: str | None) -> dict[str, Any]:
    """The JSON body of one Mail Send request."""
    # SendGrid answers 400 when an address appears twice across to/cc/bcc of one
    # personalization; keep its first place (To before Cc before Bcc).
    seen: set[str] = set()

    def unique(addresses: tuple[str, ...]) -> list[dict[str, str]]:
        parties = []
        for address in addresses:
            party = _party(address)
            if party["email"].lower() not in seen:
                seen.add(party["email"].lower())
                parties.append(party)
        return parties

    personalization: dict[str, Any] = {"to": unique(email.to)}
    cc = unique(email.cc)
    bcc = unique(email.bcc)
    if cc:
        personalization["cc"] = cc
    if bcc:
        personalization["bcc"] = bcc

    text, html = body_parts(email)
    # SendGrid requires text/plain to come first when both are present.
    content = []
    if text is not None:
        content.append({"type": "text/plain", "value": text})
    if html is not None:
        content.append({"type": "text/html", "value": html})

    headers: dict[str, str] = {"Message-ID": email.message_id}
    for name, value in extra_headers(email, also_skip=RESERVED_HEADERS):
        # A JSON object holds one value per name; a repeated header keeps its first.
        headers.setdefault(name, value)

    payload: dict[str, Any] = {
        "personalizations": [personalization],
        "from": _party(from_addr),
        "subject": email.subject,
        "content": content,
        "headers": headers,
    }
    if reply_to:
        payload["reply_to"] = _party(reply_to)
    if email.attachments:
        payload["attachments"] = [
            {
                "content": base64.b64encode(attachment.data).decode("ascii"),
                "filename": attachment.filename,
                "type": attachment.content_type,
                "disposition": "attachment",
            }
            for attachment in email.attachments
        ]
    return payload


def error_detail(response: httpx.Response) -> str:
    """``errors[].message`` (with the field when given), joined; else the body as text."""
    errors = dict_body(response).get("errors")
    if isinstance(errors, list):
        messages = []
        for error in errors:
            if isinstance(error, dict) and error.get("message"):
                field = error.get("field")
                messages.append(f"{error['message']} ({field})" if field else str(error["message"]))
        if messages:
            return "; ".join(messages)
    return text_body(response)


class SendGridProvider(HttpBackupProvider):
    """SendGrid's v3 Mail Send API; EU subusers use `EU_BASE_URL` as the base URL."""

    name = "sendgrid"
    display_name = "SendGrid"
    default_base_url = DEFAULT_BASE_URL

    def _post_message(
        self, email: OutgoingEmail, *, from_addr: str, reply_to: str | None
    ) -> httpx.Response:
        return self._post(
            "/v3/mail/send",
            json=build_payload(email, from_addr=from_addr, reply_to=reply_to),
            headers={"Authorization": f"Bearer {self._api_key.reveal()}"},
        )

    def _interpret(self, response: httpx.Response) -> BackupResult:
        status = response.status_code
        if 200 <= status < 300:
            message_id = response.headers.get("X-Message-Id")
            if not message_id:
                return self._unexpected_success(response, text_body(response))
            return self._sent(status, message_id, f"{status} {response.reason_phrase}".strip())
        detail = error_detail(response)
        if status == 403:
            lowered = detail.lower()
            if "sender identity" in lowered or "from address" in lowered:
                return self._failed(
                    status,
                    detail,
                    "SendGrid refused the sender address: it is not a verified Sender "
                    "Identity at SendGrid. Verify the address (or authenticate its domain) "
                    "in SendGrid, or set OUTBOX_BACKUP_FROM to an address that is verified. "
                    "No mail goes through the backup until then.",
                    config=True,
                )
            return self._failed(
                status,
                detail,
                "SendGrid refused to let Outbox's API key send mail: give the key the "
                "'Mail Send' permission in SendGrid, or check OUTBOX_BACKUP_API_KEY.",
                config=True,
            )
        return self._by_status(response, detail)
