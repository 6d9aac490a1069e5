"""`outbox --help` answers every question a new user has: each option says what it does,
`outbox --version` exists, and `account test` says what it really does."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version

import click
from click.testing import CliRunner

from worker.cli import main


def _commands(command: click.Command, path: str = "outbox") -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help():
    missing = [
        f"{path} {'/'.join(param.opts)}"
        for path, command in _commands(main)
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and not param.help
    ]
    assert missing == []


def test_every_command_has_a_one_line_description_that_fits_80_columns():
    for path, command in list(_commands(main))[1:]:  # the root has no line of its own
        short = command.get_short_help_str(limit=60)
        assert short and not short.endswith("..."), (path, short)


def test_version_comes_from_the_package_metadata():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"outbox {version('outbox')}"


def test_account_test_says_it_checks_without_sending_and_only_what_the_settings_ask():
    result = CliRunner().invoke(main, ["account", "test", "--help"], terminal_width=80)
    said = " ".join(result.output.split())
    assert "Check NAME's SMTP settings without sending mail." in said
    assert "TLS unless --tls none, AUTH only with a username" in said
