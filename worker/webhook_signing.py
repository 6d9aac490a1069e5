"""Standard Webhooks signing (https://www.standardwebhooks.com), pure: the secrets'
format, the three headers of a signed POST, and the receiver's check.

Signed content is ``f"{id}.{timestamp}.{body}"``, HMAC-SHA256 with the base64-decoded
part of a ``whsec_`` secret; one ``v1,<base64>`` per secret, space-separated, so a
receiver can rotate its secret without losing a delivery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

#: The prefix of a webhook secret.
SECRET_PREFIX = "whsec_"
#: A secret's key is this many bytes at least / at most (the spec's range).
KEY_MIN_BYTES, KEY_MAX_BYTES = 24, 64
#: A receiver refuses a timestamp further than this from its clock (replays).
TOLERANCE_S = 5 * 60


def url_problem(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` cannot receive webhooks, or None: https only, plain http only with
    the private-address allowance (tests, internal receivers)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme == "http" and not allow_private:
        return "must be https:// (plain http:// only with OUTBOX_EVENTS_ALLOW_PRIVATE=1)"
    if parts.scheme not in ("https", "http"):
        return "must be an https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry a user or password"
    return None


class SignatureError(ValueError):
    """A webhook's signature or timestamp does not check out."""


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` is not a usable webhook secret, or None when it is."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX} (a Standard Webhooks secret)"
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return f"the part after {SECRET_PREFIX} is not valid base64"
    if not KEY_MIN_BYTES <= len(key) <= KEY_MAX_BYTES:
        return (
            f"its key is {len(key)} bytes: it must be {KEY_MIN_BYTES} to {KEY_MAX_BYTES} "
            "bytes, base64-encoded"
        )
    return None


def secret_key(secret: str) -> bytes:
    problem = secret_problem(secret)
    if problem:
        raise ValueError(f"webhook secret {problem}")
    return base64.b64decode(secret[len(SECRET_PREFIX) :])


def signature(secret: str, *, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of the body under one secret."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign(secrets: Sequence[str], *, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one POST: every secret signs (rotation)."""
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(timestamp))}
    if secrets:
        headers["webhook-signature"] = " ".join(
            signature(s, webhook_id=webhook_id, timestamp=timestamp, body=body) for s in secrets
        )
    return headers


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = TOLERANCE_S,
) -> None:
    """Raise SignatureError unless one of the POST's signatures is ``secret``'s over this
    body and its timestamp is within ``tolerance_s`` of ``now`` (unix seconds)."""
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id = lower.get("webhook-id")
    raw_ts = lower.get("webhook-timestamp")
    given = lower.get("webhook-signature")
    if not webhook_id or not raw_ts or not given:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise SignatureError("webhook-timestamp is not unix seconds") from None
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError("webhook-timestamp is too far from now (a replay?)")
    expected = signature(secret, webhook_id=webhook_id, timestamp=timestamp, body=body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in given.split(" ")):
        raise SignatureError("no signature matches")


__all__ = [
    "KEY_MAX_BYTES",
    "KEY_MIN_BYTES",
    "SECRET_PREFIX",
    "TOLERANCE_S",
    "SignatureError",
    "secret_key",
    "secret_problem",
    "sign",
    "signature",
    "url_problem",
    "verify",
]
