"""Every table of the `outbox` CLI in an 80-column terminal: run as real processes with
COLUMNS=80 over mail a real worker tried to send. No header broken mid-word, no line
wider than the terminal, one line per row (so no address is split over two); `--wide`
prints everything in full."""

from __future__ import annotations

import json
import re

import pytest
from rich.cells import cell_len

from standins.accounts import make_account
from tests.support.cli_runs import CliResult, outbox_cli_many
from tests.support.outbox import wait_for_attempts, wait_for_status

pytestmark = pytest.mark.integration

LONG_TO = "someone.with.a.rather.long.name@subsidiary.example-company.com"
GHOST = "nobody.at.all.under.this.name@subsidiary.example-company.com"
GREYLISTED = (
    "450 4.2.0 <someone.with.a.rather.long.name@subsidiary.example-company.com>: "
    "Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/"
    "subsidiary.example-company.com.html"
)
UNKNOWN = (
    "550 5.1.1 <nobody.at.all.under.this.name@subsidiary.example-company.com>: "
    "Recipient address rejected: User unknown in virtual mailbox table"
)
ACCOUNT = "acme-international-shipping"


def _lines(result: CliResult) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n").splitlines()


def _body(lines: list[str], header_words: list[str]) -> tuple[str, list[str]]:
    """The header line and the row lines of the table whose header holds these words."""
    at = next(i for i, line in enumerate(lines) if all(w in line for w in header_words[:2]))
    assert set(lines[at + 1].strip()) == {"─"}, lines
    rows = []
    for line in lines[at + 2 :]:
        if not line.strip() or "--wide shows it all" in line:
            break
        rows.append(line)
    return lines[at], rows


def _fits(result: CliResult, header_words: list[str], *, rows: int, width: int = 80) -> list[str]:
    lines = _lines(result)
    assert max(cell_len(line.rstrip()) for line in lines) <= width, result.stdout
    header, body = _body(lines, header_words)
    for word in header_words:  # whole words: nothing like "accou" / "nt"
        assert re.search(rf"(^|\s){re.escape(word)}(\s|$)", header), (word, header)
    assert len(body) == rows, result.stdout  # one line per row
    return body


@pytest.fixture
def tried(env, db, box, plain_smtp_server, start_worker):
    """Two messages a real worker tried: one greylisted (pending), one refused (failed)."""
    env.values.update({"OUTBOX_RETRY_BASE": "900", "OUTBOX_RETRY_MAX": "3600"})
    plain_smtp_server.script.rcpt[LONG_TO] = [GREYLISTED] * 5
    plain_smtp_server.script.rcpt[GHOST] = [UNKNOWN]
    make_account(
        db,
        box,
        ACCOUNT,
        port=plain_smtp_server.port,
        tls_mode="none",
        from_addr="Acme International Shipping <notifications@acme-international.example.com>",
    )
    # Never sent through: long settings for `account list`.
    make_account(
        db,
        box,
        "globex",
        host="smtp-relay.eu-west.globex-corporation.example.com",
        port=587,
        smtp_username="mailer-with-a-long-user-name",
    )
    start_worker()
    client = env.client(db)
    pending = client.enqueue(
        account=ACCOUNT,
        to=[LONG_TO, "second.recipient@example-company.com"],
        subject="Your shipment #1001-2024-XYZ has left our warehouse in Rotterdam",
        text="x",
        priority="high",
    ).id
    failed = client.enqueue(account=ACCOUNT, to=[GHOST], subject="Hello", text="x").id
    wait_for_attempts(db, pending, 1)
    wait_for_status(db, failed, "failed")
    return env, pending, failed


def test_every_table_fits_80_columns_with_one_line_per_row(tried):
    env, pending, failed = tried
    narrow = {**env.values, "COLUMNS": "80"}
    listed, stats, accounts, shown = outbox_cli_many(
        [["list"], ["stats"], ["account", "list"], ["show", str(failed)]], env=narrow
    )

    rows = _fits(listed, ["id", "account", "status", "to", "tries", "next", "last error"], rows=2)
    by_id = {int(row.split()[0]): row for row in rows}
    assert "pending (high)" in by_id[pending] and "failed" in by_id[failed]
    # An address is whole, or cut with an ellipsis on its own line, never folded.
    assert LONG_TO[:12] in by_id[pending] and "…" in by_id[pending]
    assert "cut to fit the terminal: --wide shows it all" in listed.stdout

    [row] = _fits(stats, ["account", "pending", "sent", "failed", "fallback", "oldest"], rows=1)
    assert re.search(r"\s1\s+0\s+1\s", row), row  # pending 1, sent 0, failed 1

    acme, globex = _fits(accounts, ["name", "server", "tls", "conns", "incident"], rows=2)
    assert re.search(r"\s127\.0\.0\.1:\d+\s", acme), acme  # host and port whole, one line
    assert re.search(r"\ssmtp-relay\.eu-west\.globex-\S*…\s", globex), globex  # cut, not folded

    lines = _lines(shown)
    assert max(cell_len(line.rstrip()) for line in lines) <= 80, shown.stdout
    _header, attempts = _body(lines, ["#", "when", "outcome", "code", "server said"])
    assert len(attempts) == 1 and "550 5.1.1" in attempts[0]


def test_wide_shows_everything_in_full_however_long_the_lines(tried):
    env, _pending, failed = tried
    narrow = {**env.values, "COLUMNS": "80"}
    listed, stats, accounts, shown = outbox_cli_many(
        [
            ["list", "--wide"],
            ["stats", "--wide"],
            ["account", "list", "--wide"],
            ["show", str(failed), "--wide"],
        ],
        env=narrow,
    )
    rows = _body(_lines(listed), ["id", "account", "subject", "created"])[1]
    row = next(r for r in rows if r.split()[0] == str(failed))
    assert GHOST in row and ACCOUNT in row
    [as_json] = outbox_cli_many([["list", "--json"]], env=narrow)
    [last_error] = [r["last_error"] for r in json.loads(as_json.stdout) if r["id"] == failed]
    assert last_error in row  # the whole error on the row's one line
    assert "--wide shows it all" not in listed.stdout

    header, [row] = _body(_lines(stats), ["account", "total", "cancelled", "via backup"])
    for word in ("total", "cancelled", "via backup", "fallback rate", "oldest pending"):
        assert word in header

    header, [acme, globex] = _body(_lines(accounts), ["name", "server", "user", "from", "updated"])
    assert "notifications@acme-international.example.com" in acme
    assert "mailer-with-a-long-user-name" in globex
    assert "smtp-relay.eu-west.globex-corporation.example.com:587" in globex

    header, attempts = _body(_lines(shown), ["#", "channel", "stage", "server said"])
    assert UNKNOWN.split(" ", 2)[2] in attempts[0]


def test_show_of_a_sent_mail_says_when_it_finished_not_a_deadline(
    env, db, box, plain_smtp_server, start_worker
):
    make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    mid = env.client(db).enqueue(account="acme", to=["bob@example.com"], subject="x", text="y").id
    wait_for_status(db, mid, "sent")
    [shown] = outbox_cli_many([["show", str(mid)]], env={**env.values, "COLUMNS": "80"})
    assert re.search(r"^finished\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\s*$", shown.stdout, re.M)
    assert "deadline" not in shown.stdout
    assert not re.search(r"\(in \d", shown.stdout)  # nothing counts down any more
