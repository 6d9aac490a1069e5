"""The CLI's tables (worker.cli.tables) and the demo's live table, rendered in-process on
an 80-column console: one line per row, headers whole, nothing wider than the terminal;
`wide` shows everything in full."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

import demo
from worker.cli import tables
from worker.cli.accounts import ACCOUNT_COLUMNS
from worker.cli.messages import ATTEMPT_COLUMNS, LIST_COLUMNS, STATS_COLUMNS
from worker.cli.tables import Column

LONG_ERROR = (
    "550 5.1.1 <someone.with.a.rather.long.name@subsidiary.example-company.com>: Recipient "
    "address rejected: User unknown in virtual mailbox table"
)
LONG_TO = "someone.with.a.rather.long.name@subsidiary.example-company.com"

CASES = {
    "list": (
        LIST_COLUMNS,
        [
            [
                1001,
                "acme-international",
                "pending (high)",
                LONG_TO,
                "Your invoice for March",
                "5.0h ago",
                12,
                "in 3m",
                LONG_ERROR,
            ],
            [7, "globex", "sent", "bob@example.com", "Hi", "1m ago", 1, "", ""],
        ],
    ),
    "stats": (
        STATS_COLUMNS,
        [
            [
                "acme-international",
                1234,
                12,
                1000,
                22,
                200,
                5,
                "0.5%",
                "5.0h ago",
                "account 3, recipient 1, retry 12",
            ]
        ],
    ),
    "account list": (
        ACCOUNT_COLUMNS,
        [
            [
                "acme",
                "127.0.0.1:8025",
                "starttls",
                "mailer",
                "Acme <hello@acme.example>",
                2,
                "OPEN",
                "3m ago",
            ],
            [
                "globex",
                "smtp-relay.eu-west.globex-corporation.example.com:587",
                "tls",
                "x",
                "Globex <billing@globex.example.com>",
                10,
                "",
                "5.0h ago",
            ],
        ],
    ),
    "show attempts": (
        ATTEMPT_COLUMNS,
        [
            [1, "smtp", "12:00:01", "deferred", "rcpt", "451 4.7.1", "Greylisted, try later"],
            [2, "smtp", "12:05:01", "failed", "rcpt", "550 5.1.1", LONG_ERROR],
        ],
    ),
}


def render(columns, rows, *, width: int = 80, wide: bool = False, title="t") -> list[str]:
    table, needed = tables.build(title, columns, rows, width=width, wide=wide)
    # As tables.show prints it: on a console as wide as the table when it is wider.
    console = Console(width=max(width, needed), record=True, force_terminal=False)
    console.print(table)
    return [line.rstrip() for line in console.export_text().splitlines()]


@pytest.mark.parametrize("name", CASES)
def test_each_table_fits_80_columns_one_line_per_row(name):
    columns, rows = CASES[name]
    lines = render(columns, rows)
    assert max(cell_len(line) for line in lines) <= 80, "\n".join(lines)
    header, rule, *body = lines[1:]
    assert set(rule) == {"─"}
    assert body[-1] == tables.CUT_NOTE
    assert len(body) - 1 == len(rows), "\n".join(lines)  # each row on one line
    shown = [c for c in columns if (c.short or c.header) in header or c.header in header]
    for column in shown:  # a header is whole, never "accou" + "nt"
        word = column.header if column.header in header else column.short
        assert re.search(rf"(^|\s){re.escape(word)}(\s|$)", header), (word, header)
    for row in body[:-1]:
        for token in row.split():
            # An address is whole, or cut with an ellipsis: never folded to the next line.
            assert "@" not in token or token.endswith(("…", ">", ",")) or "." in token


@pytest.mark.parametrize("name", CASES)
def test_wide_shows_every_column_and_all_of_the_text(name):
    columns, rows = CASES[name]
    lines = render(columns, rows, wide=True)
    header, _, *body = lines[1:]
    for column in columns:
        assert column.header in header
    assert len(body) == len(rows)
    for row, line in zip(rows, body, strict=True):
        for cell in row:
            assert str(cell) in line


def test_the_long_error_loses_to_the_terminal_before_the_id_and_status():
    lines = render(*CASES["list"])
    row = lines[3]
    assert row.split()[:3] == ["1001", "acme-in…", "pending"]
    assert "in 3m" in row and "12" in row
    assert row.endswith("…")


def test_tight_tables_shorten_headers_then_drop_columns_highest_drop_first():
    columns = (
        Column("account", min_width=8),
        Column("oldest pending", short="oldest"),
        Column("total", drop=2),
        Column("cancelled", drop=1),
        Column("note", min_width=10),
    )
    rows = [["acme", "3m ago", 10, 2, "x" * 40]]
    wide = tables.layout(columns, [[tables._text(c) for c in rows[0]]], width=200, wide=False)
    assert wide.headers == ("account", "oldest pending", "total", "cancelled", "note")
    assert not wide.cut
    tight = tables.layout(columns, [[tables._text(c) for c in rows[0]]], width=40, wide=False)
    assert tight.headers == ("account", "oldest", "cancelled", "note")  # total went first
    assert tight.width <= 40 and tight.cut


def test_line_breaks_in_caller_data_never_make_a_row_two_lines():
    lines = render([Column("id"), Column("said", min_width=10)], [[1, "first\nsecond\r\nthird"]])
    assert lines[3].split() == ["1", "first", "second", "third"]


def test_caller_text_is_never_read_as_markup():
    lines = render([Column("said")], [["[bold]hi[/bold] [link=x]y"]])
    assert lines[3] == "[bold]hi[/bold] [link=x]y"


# -- the demo ---------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _attempt(channel: str, outcome: str, code=None, enhanced=None, text="") -> dict[str, Any]:
    return {
        "channel": channel,
        "outcome": outcome,
        "code": code,
        "enhanced": enhanced,
        "server_text": text,
        "started_at": NOW,
        "finished_at": NOW,
        "provider_message_id": "pm-1" if channel == "backup" else None,
    }


def _story(status: str, attempts: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    story = {
        "status": status,
        "sent_via": None,
        "account": "globex",
        "to": ["grace@example.net"],
        "attempts": attempts,
        "attempt_count": len(attempts),
        "refused": {},
        "why": None,
        "being_sent": False,
        "account_incident": None,
        "last_error": None,
        "deadline": NOW + timedelta(seconds=30),
        "next_attempt_at": NOW + timedelta(seconds=5),
        "created_at": NOW - timedelta(seconds=60),
        "finished_at": NOW,
    }
    story.update(changes)
    return story


BAD_PASSWORD = _attempt("smtp", "deferred", 535, "5.7.8", "Authentication credentials invalid")

STORIES = {
    1: _story("sent", [_attempt("smtp", "sent", 250)], account="acme", to=["alice@example.org"]),
    4: _story(
        "failed",
        [_attempt("smtp", "failed", 550, "5.1.1", "User unknown")],
        account="acme",
        to=["dave@example.org"],
        why={"meaning": "There is no mailbox with this name at the recipient's domain."},
    ),
    5: _story(
        "pending",
        [_attempt("smtp", "deferred", 452, "4.2.2", "Mailbox full")],
        account="acme",
        to=["erin@example.com", "frank@example.com"],
        why={"meaning": "The recipient's mailbox is full; it may have room later."},
    ),
    6: _story("sent", [BAD_PASSWORD] * 18 + [_attempt("backup", "sent")], sent_via="backup"),
}


def test_the_demos_live_table_shows_every_message_on_one_line_at_80_columns():
    console = Console(width=80, record=True, force_terminal=False)
    console.print(demo.message_table(STORIES, NOW, width=80))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert max(cell_len(line) for line in lines) <= 80
    header, _rule, *body = lines
    assert header.split() == ["id", "to", "status", "tries", "next", "why"]
    assert len(body) == len(STORIES)
    why_starts = header.index("why")
    # The why column gets room to say something, not one character.
    assert len(body[1][why_starts:]) >= 28 and body[1][why_starts:].startswith("There is no")


def test_the_demos_tries_count_smtp_attempts_as_its_story_does():
    console = Console(width=132, record=True, force_terminal=False)
    console.print(demo.message_table(STORIES, NOW, width=132))
    row = next(line for line in console.export_text().splitlines() if line.lstrip().startswith("6"))
    assert re.search(r"Sent via backup\s+18\s", row), row
    story_lines = demo.tell(STORIES[6])
    assert any("18 SMTP attempt(s)" in line for line in story_lines), story_lines


def test_a_message_that_failed_as_scripted_carries_no_green_check():
    failed = next(s for s in demo.SCENARIOS if s.expect == "Failed")
    line = demo.headline(4, failed, STORIES[4], None)
    assert "✓" not in line.plain
    assert line.plain.endswith("Failed, as scripted")
    greens = [line.plain[s.start : s.end] for s in line.spans if "green" in str(s.style)]
    assert greens == []
    off = demo.headline(4, failed, STORIES[4], "ended Sent, expected Failed")
    assert off.plain.startswith("✗ ") and "NOT as scripted" in off.plain
    sent = demo.headline(1, demo.SCENARIOS[0], STORIES[1], None)
    assert [sent.plain[s.start : s.end] for s in sent.spans if "green" in str(s.style)] == ["Sent"]
