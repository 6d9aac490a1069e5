"""The operator's `outbox` command. Exit codes: 0 done, 1 refused, 2 usage."""

from __future__ import annotations

import click

from worker.cli import accounts, events, messages, metrics, system


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="outbox", prog_name="outbox", message="%(prog)s %(version)s")
def main() -> None:
    """Outbox: every accepted email reaches its recipient or ends with an honest reason."""


for module in (system, accounts, messages, events, metrics):
    for command in module.COMMANDS:
        main.add_command(command)

__all__ = ["main"]
