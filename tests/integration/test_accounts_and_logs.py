"""Accounts from the CLI, and the per-attempt log line (JSON with OUTBOX_LOG_JSON=1)."""

from __future__ import annotations

import json

import pytest

from standins.accounts import make_account
from tests.support.outbox import cli, wait_for_status

pytestmark = pytest.mark.integration


def test_account_set_changes_only_what_is_given_and_never_shows_the_password(env, db):
    made = cli(
        env,
        "account",
        "set",
        "acme",
        "--host",
        "smtp.acme.example.com",
        "--port",
        "587",
        "--username",
        "mailer",
        "--password-stdin",
        "--from",
        "Acme <hi@acme.example.com>",
        "--notify-webhook",
        "https://acme.example.com/hook",
        stdin="pw-CANARY-1\n",
    )
    assert made.returncode == 0, made.stderr
    changed = cli(env, "account", "set", "acme", "--max-connections", "5")
    assert changed.returncode == 0, changed.stderr
    shown = json.loads(cli(env, "account", "show", "acme", "--json").stdout)
    assert (shown["host"], shown["port"], shown["username"], shown["max_connections"]) == (
        "smtp.acme.example.com",
        587,
        "mailer",
        5,
    )
    assert shown["password"] == "set" and shown["tls"] == "starttls"
    assert shown["notify_webhook"] == "https://acme.example.com/hook"
    listed = cli(env, "account", "list", "--json")
    assert [a["name"] for a in json.loads(listed.stdout)] == ["acme"]
    for out in (made, changed, listed, cli(env, "account", "show", "acme")):
        assert "pw-CANARY-1" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--port", "70000"], "port"),
        (["--tls", "none"], "tls"),  # plaintext to a remote host needs --allow-plaintext
        (["--notify-webhook", "ftp://x"], "notify_webhook"),
        (["--from", "not an address"], "from"),
        (["--max-connections", "0"], "max_connections"),
    ],
)
def test_account_set_refuses_bad_settings_naming_the_field(env, db, args, field):
    # The later --port wins, so each case overrides one good setting with a bad one.
    out = cli(
        env, "account", "set", "acme", "--host", "smtp.acme.example.com", "--port", "587", *args
    )
    assert out.returncode == 1
    assert f"{field}:" in out.stderr
    assert json.loads(cli(env, "account", "list", "--json").stdout) == []


def test_one_json_log_line_per_attempt_without_secrets_or_bodies(
    env, db, box, smtp_server, test_ca, start_worker
):
    env.values["OUTBOX_LOG_JSON"] = "1"
    make_account(
        db,
        box,
        "acme",
        port=smtp_server.port,
        smtp_username="acct",
        password="s3cret",
        tls_mode="starttls",
        ca_pem=test_ca.ca_pem,
    )
    worker = start_worker()
    mid = (
        env.client(db)
        .enqueue(account="acme", to=["bob@example.com"], subject="Hi", text="BODY-CANARY-7")
        .id
    )
    wait_for_status(db, mid, "sent")
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    [attempt] = [e for e in lines if e.get("event") == "attempt"]
    assert (
        attempt["message_id"],
        attempt["account"],
        attempt["verdict"],
        attempt["code"],
        attempt["channel"],
    ) == (mid, "acme", "ok", 250, "smtp")
    assert "BODY-CANARY-7" not in worker.log() and "s3cret" not in worker.log()
