"""What a new user met (issue 13): a key warning printed by every command, an incident
notice promising a backup that is not configured and its log line, `outbox --version`.
Real CLI processes, a real worker, real PostgreSQL and a real webhook receiver."""

from __future__ import annotations

import os
from importlib.metadata import version

import pytest

from standins.accounts import make_account
from standins.services import wait_until
from tests.support.cli_runs import outbox_cli, outbox_cli_many
from tests.support.outbox import wrong_password_account
from tests.support.webhook import WebhookReceiver
from worker.clock import utcnow
from worker.notify import build_notice
from worker.store.models import Account, Incident

pytestmark = pytest.mark.integration

WARNING = "OUTBOX_SECRET_KEY is not set"


def test_the_development_key_warning_comes_only_where_a_password_is_touched(tmp_path):
    # The embedded defaults (SQLite) in a fresh directory, no OUTBOX_SECRET_KEY.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_VAR_DIR"] = str(tmp_path / "var")
    made = outbox_cli(
        "account", "set", "acme", "--host", "127.0.0.1", "--port", "1", "--tls", "none", env=env
    )
    assert made.returncode == 0, made.stderr
    quiet = outbox_cli_many(
        [
            ["account", "list"],
            ["account", "show", "acme"],
            ["list"],
            ["stats"],
            ["explain", "550 5.1.1 no such user"],
            ["account", "set", "acme", "--port", "2"],
            ["account", "test", "acme"],  # no password stored: none decrypted
        ],
        env=env,
    )
    for result in quiet:
        assert WARNING not in result.stderr + result.stdout, result.args
    assert [r.returncode for r in quiet] == [0, 0, 0, 0, 0, 0, 1]

    stored = outbox_cli(
        *("account", "set", "acme", "--username", "u", "--password-stdin"),
        env=env,
        input="s3cret\n",
    )
    assert stored.returncode == 0, stored.stderr
    assert stored.stderr.count(WARNING) == 1
    tested, rotated, listed = outbox_cli_many(
        [["account", "test", "acme"], ["rotate-key"], ["account", "list"]], env=env
    )
    assert WARNING in tested.stderr and WARNING in rotated.stderr
    assert WARNING not in listed.stderr


def test_outbox_version_comes_from_the_package_metadata():
    [by_flag] = outbox_cli_many([["--version"]], env={})
    assert by_flag.returncode == 0
    assert by_flag.stdout.strip() == f"outbox {version('outbox')}"


def test_a_notice_without_a_backup_provider_says_the_mail_will_end_failed(
    env, db, box, smtp_server, test_ca, start_worker
):
    assert "OUTBOX_BACKUP_PROVIDER" not in env.values
    with WebhookReceiver() as hook:
        wrong_password_account(
            db, box, smtp_server, test_ca.ca_pem, "broken", notify_webhook=hook.url
        )
        worker = start_worker()
        env.client(db).enqueue(account="broken", to=["bob@example.com"], subject="x", text="y")
        wait_until(lambda: hook.events("opened"), timeout=20, message="the incident notice")
    [notice] = hook.events("opened")
    assert "they end failed: no backup provider is configured" in notice["message"]
    assert "backup provider." not in notice["message"]  # no promise of a backup
    wait_until(lambda: "was told" in worker.log(), timeout=10, message="the notice's log line")
    assert "account broken was told its SMTP server is failing (by webhook)" in worker.log()
    assert "notice opened sent for account" not in worker.log()


def test_a_notice_with_a_backup_provider_says_the_backup_takes_over(db, box):
    make_account(db, box, "acme", port=2525, tls_mode="none")
    with db.session() as session:
        account = session.query(Account).filter_by(name="acme").one()
        incident = Incident(
            account_id=account.id,
            opened_at=utcnow(),
            verdict="account",
            reason="login refused",
            last_code=535,
            last_enhanced="5.7.8",
            last_reply="535 5.7.8 Authentication credentials invalid",
        )
        session.add(incident)
        session.flush()
        with_backup = build_notice(session, incident.id, "opened", backup_configured=True)
        without = build_notice(session, incident.id, "opened", backup_configured=False)
    assert with_backup is not None and without is not None
    assert with_backup.text.endswith("they go out through Outbox's backup provider.")
    assert without.text.endswith(
        "they end failed: no backup provider is configured to send them instead."
    )
