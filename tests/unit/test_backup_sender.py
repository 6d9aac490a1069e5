"""`backup_sender`: which From and Reply-To a message carries through the backup provider."""

from __future__ import annotations

from email.utils import parseaddr

import pytest

from worker.backup import backup_sender
from worker.message import OutgoingEmail

RELAY = "relay@outbox.example"


def _email(from_addr: str, reply_to: str | None = None) -> OutgoingEmail:
    return OutgoingEmail(
        message_id="<0190-test@outbox.example>",
        from_addr=from_addr,
        to=("bob@example.test",),
        subject="Invoice",
        reply_to=reply_to,
        text="hello",
    )


def test_unverified_sender_keeps_display_name_on_backup_address() -> None:
    email = _email("Acme Support <help@acme.test>")

    from_addr, reply_to = backup_sender(email, backup_from=RELAY, verified=False)

    assert from_addr == "Acme Support <relay@outbox.example>"
    assert reply_to == "Acme Support <help@acme.test>"


def test_unverified_sender_keeps_the_messages_own_reply_to() -> None:
    email = _email("Acme Support <help@acme.test>", reply_to="Billing <billing@acme.test>")

    from_addr, reply_to = backup_sender(email, backup_from=RELAY, verified=False)

    assert from_addr == "Acme Support <relay@outbox.example>"
    assert reply_to == "Billing <billing@acme.test>"


def test_account_display_name_wins_over_the_backup_addresses_own() -> None:
    email = _email("Acme Support <help@acme.test>")

    from_addr, _ = backup_sender(
        email, backup_from="Outbox Relay <relay@outbox.example>", verified=False
    )

    assert from_addr == "Acme Support <relay@outbox.example>"


def test_backup_display_name_used_when_the_account_has_none() -> None:
    email = _email("help@acme.test")

    from_addr, reply_to = backup_sender(
        email, backup_from="Outbox Relay <relay@outbox.example>", verified=False
    )

    assert from_addr == "Outbox Relay <relay@outbox.example>"
    assert reply_to == "help@acme.test"


def test_no_display_name_anywhere_gives_the_bare_backup_address() -> None:
    from_addr, _ = backup_sender(_email("help@acme.test"), backup_from=RELAY, verified=False)

    assert from_addr == RELAY


@pytest.mark.parametrize(
    ("original", "expected_name"),
    [
        ('"Acme, Inc." <help@acme.test>', "Acme, Inc."),
        ("Acme, Inc. <help@acme.test>", "Acme, Inc."),  # unquoted comma, as users type it
        ("José Núñez <jose@acme.test>", "José Núñez"),
        ("=?utf-8?q?Jos=C3=A9?= <jose@acme.test>", "José"),
        ('"Say \\"hi\\"" <help@acme.test>', 'Say "hi"'),
    ],
)
def test_display_name_survives_punctuation_and_non_ascii(original: str, expected_name: str) -> None:
    from_addr, _ = backup_sender(_email(original), backup_from=RELAY, verified=False)

    assert parseaddr(from_addr) == (expected_name, RELAY)


@pytest.mark.parametrize("reply_to", [None, "Billing <billing@acme.test>"])
def test_verified_sender_passes_through_unchanged(reply_to: str | None) -> None:
    email = _email("Acme Support <help@acme.test>", reply_to=reply_to)

    assert backup_sender(email, backup_from=RELAY, verified=True) == (
        "Acme Support <help@acme.test>",
        reply_to,
    )
