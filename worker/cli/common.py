"""What every `outbox` command shares: settings, database, output as table or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.cli import tables
from worker.cli.tables import Cell, Column

#: Exit codes scripts can trust.
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

console = Console()
err_console = Console(stderr=True)


class Context:
    """Built on first use, so `outbox --help` and `outbox explain` need no database."""

    def __init__(self) -> None:
        self._settings: Any = None
        self._db: Any = None
        self._box: Any = None

    @property
    def settings(self) -> Any:
        if self._settings is None:
            from config.settings import SettingsError, get_settings

            try:
                self._settings = get_settings()
            except SettingsError as exc:
                fail(str(exc), code=EXIT_USAGE)
        return self._settings

    @property
    def db(self) -> Any:
        if self._db is None:
            from worker.store.db import Database

            if self.settings.database_url.startswith("sqlite"):
                # The embedded database migrates itself, for read commands too: a new
                # user's first `outbox account list` must not meet "no such table".
                from worker.store import migrate

                migrate.upgrade(self.settings.database_url)
            self._db = Database(self.settings.database_url)
        return self._db

    @property
    def box(self) -> Any:
        if self._box is None:
            from worker.crypto import SecretBox

            self._box = SecretBox(
                self.settings.secret_keys, warning=self.settings.secret_key_warning
            )
        return self._box

    def ensure_schema(self) -> None:
        """The embedded SQLite database migrates itself; PostgreSQL needs `outbox db upgrade`."""
        from worker.store import migrate

        url = self.settings.database_url
        if url.startswith("sqlite"):
            migrate.upgrade(url)
            return
        if migrate.current(url) != migrate.head():
            fail(
                "The database schema is not up to date: run `outbox db upgrade` first.",
                code=EXIT_REFUSED,
            )

    def wakeups(self) -> Any:
        """Coalesced drain wake-ups, published by name to the configured broker."""
        from worker.client import broker_publisher
        from worker.wakeups import Wakeups

        return Wakeups(
            self.db,
            broker_publisher(self.settings.broker_url),
            grace_s=self.settings.wake_grace_s,
            countdown_max_s=self.settings.countdown_max_s,
        )


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def fail(message: str, *, code: int = EXIT_REFUSED, as_json: bool = False) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        # The message may quote caller input: never read it as rich markup.
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_default, ensure_ascii=False))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def table(
    title: str | None,
    columns: Sequence[str | Column],
    rows: Iterable[Sequence[Cell]],
    *,
    wide: bool = False,
) -> None:
    """A table that fits the terminal (see worker.cli.tables), or all of it with `wide`."""
    tables.show(console, title, columns, rows, wide=wide)


#: `--wide` on every command that prints a table.
wide_option = click.option(
    "--wide",
    is_flag=True,
    help="Every column in full, however long the lines get (default: fit the terminal).",
)


def pairs(title: str | None, items: Iterable[tuple[str, Any]]) -> None:
    t = Table(
        title=escape(title) if title else None,
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for key, value in items:
        t.add_row(key, "" if value is None else escape(str(value)))
    console.print(t)


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """'in 3m', '2h ago' — for people reading a table."""
    if moment is None:
        return ""
    now = now or datetime.now(UTC)
    seconds = (moment - now).total_seconds()
    future = seconds > 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{seconds:.0f}s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f}h"
    else:
        text = f"{seconds / 86400:.1f}d"
    return f"in {text}" if future else f"{text} ago"


def parse_since(value: str | None) -> datetime | None:
    """`--since 2h`, `--since 30m`, or an ISO date/time."""
    if value is None:
        return None
    from datetime import timedelta

    from config.settings import SettingsError, parse_duration

    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(value, name="--since"))
    except SettingsError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a duration (30m, 2h, 7d) nor an ISO date", param_hint="--since"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
