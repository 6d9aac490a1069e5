"""With no variables set at all, `outbox worker` runs on SQLite (database and broker)
and delivers: the first-run path, with real processes and a real SMTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from standins.services import REPO, OutboxProcess, wait_until

pytestmark = pytest.mark.integration


def test_embedded_defaults_deliver_with_no_configuration(tmp_path, plain_smtp_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_VAR_DIR"] = str(tmp_path / "var")  # where ./var would be; keeps the repo clean

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = cli(
        "account",
        "set",
        "acme",
        "--host",
        "127.0.0.1",
        "--port",
        str(plain_smtp_server.port),
        "--tls",
        "none",
        "--from",
        "Acme <hi@acme.example.com>",
    )
    assert made.returncode == 0, made.stderr
    # The development key is generated, but no password was touched: no warning yet.
    assert "OUTBOX_SECRET_KEY is not set" not in made.stderr
    worker = OutboxProcess(
        [sys.executable, "-m", "worker.cli", "worker", "-c", "1", "--beat"],
        env,
        tmp_path / "worker.log",
    ).start(timeout=60)
    try:
        sent = cli(
            "send",
            "--account",
            "acme",
            "--to",
            "bob@example.com",
            "--subject",
            "Embedded",
            "--text",
            "hello",
            "--json",
        )
        assert sent.returncode == 0, sent.stderr
        message_id = json.loads(sent.stdout)["id"]

        def status() -> str:
            shown = cli("show", str(message_id), "--json")
            return json.loads(shown.stdout)["status"] if shown.returncode == 0 else "?"

        wait_until(
            lambda: status() == "sent", timeout=30, interval=0.5, message="the message to be sent"
        )
        assert [m.message["Subject"] for m in plain_smtp_server.messages] == ["Embedded"]
        assert (tmp_path / "var" / "outbox.sqlite3").exists()
        assert (tmp_path / "var" / "broker.sqlite3").exists()
        assert "sqla+sqlite" in worker.log()
        assert "OUTBOX_SECRET_KEY is not set" in worker.log()  # a worker decrypts passwords
    finally:
        worker.stop()
