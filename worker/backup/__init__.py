"""Sending through a backup provider's HTTP API when an account's own SMTP server fails.

This package owns the adapters (SendGrid, Postmark, Mailgun), `make_provider` that picks
one from the settings' values, and `backup_sender`: which From and Reply-To a message
carries when it goes out through the backup. An adapter sends once per call and reports
what happened; `backup.engine` (`BackupEngine`) is the fallback itself: it claims a
message whose window is over, sends it through the adapter and records the result.
"""

from __future__ import annotations

import httpx

from worker.backup import mailgun, sendgrid
from worker.backup.base import (
    BackupOutcome,
    BackupProvider,
    BackupResult,
    HttpBackupProvider,
    format_address,
    split_address,
)
from worker.backup.mailgun import MailgunProvider
from worker.backup.postmark import PostmarkProvider
from worker.backup.sendgrid import SendGridProvider
from worker.message import OutgoingEmail

__all__ = [
    "DEFAULT_BASE_URLS",
    "EU_BASE_URLS",
    "PROVIDERS",
    "BackupOutcome",
    "BackupProvider",
    "BackupResult",
    "HttpBackupProvider",
    "MailgunProvider",
    "PostmarkProvider",
    "SendGridProvider",
    "backup_sender",
    "make_provider",
]

#: The provider names make_provider knows; the same list as config.settings.BACKUP_PROVIDERS
#: (kept here so the adapters do not import the Celery app that `config` brings along).
PROVIDERS = ("sendgrid", "postmark", "mailgun")

DEFAULT_BASE_URLS = {
    "sendgrid": SendGridProvider.default_base_url,
    "postmark": PostmarkProvider.default_base_url,
    "mailgun": MailgunProvider.default_base_url,
}
#: Regional API hosts, for OUTBOX_BACKUP_API_URL. Postmark has a single region.
EU_BASE_URLS = {"sendgrid": sendgrid.EU_BASE_URL, "mailgun": mailgun.EU_BASE_URL}


def make_provider(
    name: str,
    *,
    api_key: str,
    base_url: str | None = None,
    mailgun_domain: str | None = None,
    timeout_s: float = 15.0,
    client: httpx.Client | None = None,
) -> BackupProvider:
    """The adapter for ``name``, with its own HTTP client reused across sends.

    ``base_url`` overrides the provider's default API host (EU region, a test stub);
    ``client``, when given, is used instead and left open by `close()`.
    Raises ValueError for an unknown name or a missing key or Mailgun domain.
    """
    key = name.strip().lower()
    if key == "sendgrid":
        return SendGridProvider(
            api_key=api_key, base_url=base_url, timeout_s=timeout_s, client=client
        )
    if key == "postmark":
        return PostmarkProvider(
            api_key=api_key, base_url=base_url, timeout_s=timeout_s, client=client
        )
    if key == "mailgun":
        return MailgunProvider(
            api_key=api_key,
            domain=mailgun_domain or "",
            base_url=base_url,
            timeout_s=timeout_s,
            client=client,
        )
    raise ValueError(f"Unknown backup provider {name!r}: use one of {', '.join(PROVIDERS)}.")


def backup_sender(
    email: OutgoingEmail, *, backup_from: str, verified: bool
) -> tuple[str, str | None]:
    """(from_addr, reply_to) for sending ``email`` through the backup provider.

    ``verified`` says the account's own From address is verified at the provider; then
    the message goes out unchanged. Otherwise it is sent from ``backup_from`` (the
    provider refuses unverified senders) under the account's display name, and replies
    still reach the account: Reply-To is the message's own Reply-To, else its From.
    """
    if verified:
        return email.from_addr, email.reply_to
    account_name, _ = split_address(email.from_addr)
    backup_name, backup_addr = split_address(backup_from)
    from_addr = format_address(account_name or backup_name, backup_addr)
    return from_addr, email.reply_to or email.from_addr
