"""Standard Webhooks signing, the secret and URL rules, and the retry schedule."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime, timedelta

import pytest

from config.settings import Settings, SettingsError
from tests.support.signed_webhook import spec_verify
from worker.webhook_signing import SignatureError, secret_problem, sign, url_problem, verify
from worker.webhooks import (
    after_failure,
    forbidden_address,
    notice_webhook_id,
    retry_delay_s,
    webhook_id,
)

# The example of the Standard Webhooks reference libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
OTHER = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_signature_is_the_specs_example() -> None:
    headers = sign([SPEC_SECRET], webhook_id=SPEC_ID, timestamp=SPEC_TS, body=SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": SPEC_SIG,
    }


def test_every_secret_signs_during_a_rotation_and_each_verifies() -> None:
    headers = sign([OTHER, SPEC_SECRET], webhook_id=SPEC_ID, timestamp=SPEC_TS, body=SPEC_BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (OTHER, SPEC_SECRET):
        verify(secret, headers, SPEC_BODY, now=SPEC_TS + 10)
        assert spec_verify(secret, headers, SPEC_BODY, now=SPEC_TS + 10)


def test_tampered_body_wrong_secret_and_old_timestamp_are_rejected() -> None:
    headers = sign([SPEC_SECRET], webhook_id=SPEC_ID, timestamp=SPEC_TS, body=SPEC_BODY)
    with pytest.raises(SignatureError):
        verify(SPEC_SECRET, headers, SPEC_BODY.replace(b"2", b"3"), now=SPEC_TS)
    assert not spec_verify(SPEC_SECRET, headers, SPEC_BODY + b" ", now=SPEC_TS)
    with pytest.raises(SignatureError):
        verify(OTHER, headers, SPEC_BODY, now=SPEC_TS)
    with pytest.raises(SignatureError, match="too far"):
        verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 301)
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 299)


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with whsec_"),
        ("whsec_not*base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "23 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
    ],
)
def test_bad_secrets_say_why(secret: str, why: str) -> None:
    assert why in (secret_problem(secret) or "")


def test_good_secrets_pass() -> None:
    for n in (24, 32, 64):
        assert secret_problem("whsec_" + base64.b64encode(b"x" * n).decode()) is None


def test_urls() -> None:
    assert "https://" in (url_problem("http://hooks.example.com/x", allow_private=False) or "")
    assert url_problem("http://127.0.0.1:8000/x", allow_private=True) is None
    assert url_problem("https://hooks.example.com/x", allow_private=False) is None
    assert url_problem("ftp://hooks.example.com/x", allow_private=True)
    assert url_problem("https://u:p@hooks.example.com/x", allow_private=False)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "0.0.0.0",
        "224.0.0.1",
        "::ffff:10.0.0.1",
        "100.64.0.1",
        "fc00::1",
    ],
)
def test_private_addresses_are_forbidden(address: str) -> None:
    assert forbidden_address(address)


def test_public_addresses_are_allowed() -> None:
    assert forbidden_address("93.184.216.34") is None
    assert forbidden_address("2606:2800:220:1:248:1893:25c8:1946") is None


def test_backoff_grows_to_its_cap() -> None:
    delays = [retry_delay_s(failures=n) for n in range(1, 10)]
    assert delays[:4] == [5, 20, 80, 320]
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays[-1] == 7200
    # Over the 24 h window a failing destination is tried at least a dozen times.
    assert sum(delays) < 24 * 3600


def test_webhook_id_is_stable_per_batch() -> None:
    assert webhook_id("a", "b", 2) == webhook_id("a", "b", 2) != webhook_id("a", "c", 2)


def test_a_notices_webhook_id_is_the_same_at_every_try() -> None:
    assert notice_webhook_id(7, "opened") == "msg_incident_7_opened"
    assert notice_webhook_id(7, "opened") != notice_webhook_id(7, "recovered")


T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def test_after_a_failure_the_next_try_backs_off_from_the_first_failure() -> None:
    first = after_failure(
        gone=False, failures=0, failing_since=None, now=T0, window_s=86400, what="notices"
    )
    assert (first.failures, first.failing_since, first.give_up) == (1, T0, None)
    assert first.next_try_at == T0 + timedelta(seconds=5)
    later = T0 + timedelta(seconds=5)
    second = after_failure(
        gone=False, failures=1, failing_since=T0, now=later, window_s=86400, what="notices"
    )
    assert second.failing_since == T0 and second.next_try_at == later + timedelta(seconds=20)


def test_410_or_the_windows_end_gives_up() -> None:
    gone = after_failure(
        gone=True, failures=0, failing_since=None, now=T0, window_s=86400, what="notices"
    )
    assert gone.next_try_at is None and gone.give_up
    assert "410" in gone.give_up and "notices" in gone.give_up
    end = T0 + timedelta(hours=24)
    over = after_failure(
        gone=False, failures=14, failing_since=T0, now=end, window_s=86400, what="events"
    )
    assert over.next_try_at is None and "retry window (24 h)" in (over.give_up or "")
    just_before = after_failure(
        gone=False,
        failures=14,
        failing_since=T0,
        now=end - timedelta(seconds=1),
        window_s=86400,
        what="events",
    )
    assert just_before.give_up is None and just_before.failures == 15


def _env(**values: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    return {"OUTBOX_SECRET_KEY": Fernet.generate_key().decode(), "OUTBOX_VAR_DIR": "/tmp", **values}


def test_settings_refuse_bad_events_values_naming_them() -> None:
    bad = {
        "OUTBOX_EVENTS_WEBHOOK": ("http://hooks.example.com/x", "OUTBOX_EVENTS_WEBHOOK"),
        "OUTBOX_EVENTS_SECRET": ("whsec_abc", "OUTBOX_EVENTS_SECRET"),
        "OUTBOX_EVENTS_RETRY_WINDOW": ("3600", "OUTBOX_EVENTS_RETRY_WINDOW"),
        "OUTBOX_EVENTS_BATCH": ("0", "OUTBOX_EVENTS_BATCH"),
        "OUTBOX_EVENTS_ALLOW_PRIVATE": ("maybe", "OUTBOX_EVENTS_ALLOW_PRIVATE"),
    }
    for name, (value, named) in bad.items():
        with pytest.raises(SettingsError, match=named):
            Settings.from_env(_env(**{name: value}))
    with pytest.raises(SettingsError, match=r"secret #2"):
        Settings.from_env(_env(OUTBOX_EVENTS_SECRET=f"{OTHER},whsec_bad"))


def test_settings_accept_a_rotation_and_plain_http_with_the_allowance() -> None:
    s = Settings.from_env(
        _env(
            OUTBOX_EVENTS_WEBHOOK="http://127.0.0.1:9/x",
            OUTBOX_EVENTS_ALLOW_PRIVATE="1",
            OUTBOX_EVENTS_SECRET=f"{OTHER}, {SPEC_SECRET}",
        )
    )
    assert s.events_secrets == (OTHER, SPEC_SECRET)
    assert s.events_retry_window_s == 86400 and s.events_batch == 100
    assert OTHER not in repr(s)
