"""Secrets at rest: SMTP passwords are stored encrypted with Fernet (AES-128-CBC + HMAC).

Several keys may be configured (newest first): the first encrypts, all decrypt, so a
key can be rotated without downtime and `outbox rotate-key` re-encrypts stored secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("outbox.crypto")


class SecretKeyError(Exception):
    """A stored secret cannot be decrypted with any configured key."""


class SecretBox:
    """Encrypts and decrypts stored secrets.

    ``warning`` (the development key's, `Settings.secret_key_warning`) is logged once,
    the first time a secret is actually encrypted or decrypted: only the commands and
    workers that touch a password say it.
    """

    def __init__(self, keys: Sequence[str], *, warning: str | None = None) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        self._warning = warning

    def _used(self) -> None:
        if self._warning:
            warning, self._warning = self._warning, None
            log.warning("%s", warning)

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    def encrypt(self, plaintext: str) -> str:
        self._used()
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        self._used()
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise SecretKeyError(
                "a stored secret cannot be decrypted with OUTBOX_SECRET_KEY: was the key "
                "changed without keeping the old one (OUTBOX_SECRET_KEY=new,old)?"
            ) from None

    def rotate(self, token: str) -> str:
        """The same secret, encrypted under the first (newest) key."""
        self._used()
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise SecretKeyError(
                "a stored secret cannot be decrypted with any configured key"
            ) from None
