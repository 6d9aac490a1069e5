"""The Mailgun adapter: `POST /v3/{domain}/messages` and what its answers mean.

This module owns the Mailgun request shape (a multipart form with one `to` field per
address, `h:` fields for Reply-To, the original Message-Id and the extra headers, and
`attachment` file parts) and Mailgun's answers: 200 with a JSON `id`, a plain "Forbidden"
for a bad key, 404 for a domain it does not know at that base URL (US vs EU region).
"""

from __future__ import annotations

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

DEFAULT_BASE_URL = "https://api.mailgun.net"
EU_BASE_URL = "https://api.eu.mailgun.net"

#: A multipart part: (field name, (filename or None, content[, content type])).
FormPart = tuple[str, tuple[str | None, bytes] | tuple[str | None, bytes, str]]


def build_form(email: OutgoingEmail, *, from_addr: str, reply_to: str | None) -> list[FormPart]:
    """The multipart form of one Messages request, fields in a stable order."""
    fields: list[tuple[str, str]] = [("from", with_quoted_name(from_addr))]
    fields += [("to", with_quoted_name(address)) for address in email.to]
    fields += [("cc", with_quoted_name(address)) for address in email.cc]
    fields += [("bcc", with_quoted_name(address)) for address in email.bcc]
    fields.append(("subject", email.subject))
    text, html = body_parts(email)
    if text is not None:
        fields.append(("text", text))
    if html is not None:
        fields.append(("html", html))
    if reply_to:
        fields.append(("h:Reply-To", with_quoted_name(reply_to)))
    fields.append(("h:Message-Id", email.message_id))
    fields += [(f"h:{name}", value) for name, value in extra_headers(email)]

    # Plain fields go as file-less parts (filename None) so that the request is always
    # multipart/form-data, with or without attachments.
    parts: list[FormPart] = [(name, (None, value.encode("utf-8"))) for name, value in fields]
    parts += [
        ("attachment", (attachment.filename, attachment.data, attachment.content_type))
        for attachment in email.attachments
    ]
    return parts


class MailgunProvider(HttpBackupProvider):
    """Mailgun's Messages API for one sending domain; EU domains use `EU_BASE_URL`."""

    name = "mailgun"
    display_name = "Mailgun"
    default_base_url = DEFAULT_BASE_URL
    url_settings = "OUTBOX_BACKUP_API_URL and OUTBOX_BACKUP_MAILGUN_DOMAIN"

    def __init__(
        self,
        *,
        api_key: str,
        domain: str,
        base_url: str | None = None,
        timeout_s: float = 15.0,
        client: httpx.Client | None = None,
    ) -> None:
        domain = (domain or "").strip()
        if not domain or "/" in domain:
            raise ValueError(
                f"Mailgun needs its sending domain (OUTBOX_BACKUP_MAILGUN_DOMAIN), not {domain!r}."
            )
        super().__init__(api_key=api_key, base_url=base_url, timeout_s=timeout_s, client=client)
        self.domain = domain

    def __repr__(self) -> str:
        return (
            f"MailgunProvider(base_url={self.base_url!r}, domain={self.domain!r}, "
            f"timeout_s={self.timeout_s:g})"
        )

    def _post_message(
        self, email: OutgoingEmail, *, from_addr: str, reply_to: str | None
    ) -> httpx.Response:
        return self._post(
            f"/v3/{self.domain}/messages",
            files=build_form(email, from_addr=from_addr, reply_to=reply_to),
            auth=httpx.BasicAuth("api", self._api_key.reveal()),
        )

    def _interpret(self, response: httpx.Response) -> BackupResult:
        status = response.status_code
        body = dict_body(response)
        message = body.get("message")
        detail = str(message) if message else text_body(response)
        if 200 <= status < 300:
            message_id = body.get("id")
            if not message_id:
                return self._unexpected_success(response, detail)
            return self._sent(status, str(message_id), detail)
        if status == 403:
            return self._failed(
                status,
                detail,
                f"Mailgun refused to send for the domain {self.domain}: {detail}. Check the "
                "domain's state in Mailgun (a sandbox domain only sends to authorized "
                "recipients; a disabled domain sends nothing) and "
                "OUTBOX_BACKUP_MAILGUN_DOMAIN.",
                config=True,
            )
        if status == 404:
            return self._failed(
                status,
                detail,
                f"Mailgun does not know the domain {self.domain} at {self.base_url}: check "
                "OUTBOX_BACKUP_MAILGUN_DOMAIN, and OUTBOX_BACKUP_API_URL (a domain in "
                f"Mailgun's EU region needs {EU_BASE_URL}).",
                config=True,
            )
        return self._by_status(response, detail)
