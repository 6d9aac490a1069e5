"""`outbox db`, `outbox worker`, `outbox explain`, key management."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.markup import escape

from worker.cli.common import (
    EXIT_REFUSED,
    Context,
    emit_json,
    err_console,
    fail,
    pairs,
    pass_ctx,
    table,
)


@click.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations)."""


@db_group.command("upgrade")
@click.option(
    "--revision", default="head", show_default=True, help="Alembic revision to upgrade to."
)
@pass_ctx
def db_upgrade(ctx: Context, revision: str) -> None:
    """Apply migrations up to REVISION."""
    from worker.store import migrate

    migrate.upgrade(ctx.settings.database_url, revision)
    click.echo(f"database at revision {migrate.current(ctx.settings.database_url)}")


@click.command("worker")
@click.option("--beat", is_flag=True, help="Embed the beat scheduler (one machine only).")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes (default: OUTBOX_CONCURRENCY, two per core).",
)
@click.option(
    "--loglevel",
    "-l",
    default="INFO",
    show_default=True,
    help="DEBUG, INFO, WARNING or ERROR.",
)
@click.option("--queues", "-Q", default=None, help="Comma-separated queues (default: all).")
@pass_ctx
def worker_command(
    ctx: Context, beat: bool, concurrency: int | None, loglevel: str, queues: str | None
) -> None:
    """Run a Celery worker on all of Outbox's queues."""
    settings = ctx.settings
    ctx.ensure_schema()
    from config.celery import app
    from worker.contract import QUEUES

    argv = ["worker", "--loglevel", loglevel, "-E", "-Q", queues or ",".join(QUEUES)]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if beat:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(settings.var_dir / "celerybeat-schedule")]
    if settings.secret_key_warning:
        click.echo(settings.secret_key_warning, err=True)  # a worker decrypts passwords
    if settings.is_embedded:
        click.echo(
            f"Outbox worker on the embedded defaults: database {settings.database_url}, "
            f"broker {settings.broker_url}",
            err=True,
        )
    app.worker_main(argv)


@click.command("explain")
@click.argument("replies", nargs=-1)
@click.option(
    "--stage",
    type=click.Choice(["connect", "auth", "mail", "rcpt", "data"]),
    default=None,
    help="Where in the session the reply came.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reply.")
def explain(replies: tuple[str, ...], stage: str | None, as_json: bool) -> None:
    """Explain SMTP replies and connection errors in plain words.

    As the engine decides them; the replies as arguments, or one per line on stdin.
    Exit code 1 if some text is neither an SMTP reply nor a known connection error.
    """
    from worker.replies import NotAReply, Stage, explain_text

    texts = list(replies)
    if not texts:
        if sys.stdin.isatty():
            raise click.UsageError("give one or more replies, or pipe them one per line")
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    results: list[dict[str, Any]] = []
    for text in texts:
        try:
            e = explain_text(text.replace("\\r\\n", "\n"), Stage(stage) if stage else None)
        except NotAReply as exc:
            results.append({"reply": text, "error": str(exc)})
            continue
        results.append({"reply": text, **e.as_dict()})
    unknown = [r for r in results if "error" in r]
    if as_json:
        emit_json(results if len(results) > 1 else results[0])
        if unknown:
            sys.exit(EXIT_REFUSED)
        return
    for r in results:
        if "error" in r:
            err_console.print(f"[bold red]error:[/] {escape(r['error'])}", highlight=False)
            click.echo()
            continue
        pairs(
            r["reply"],
            [
                ("code", r["code"]),
                ("enhanced", r["enhanced"]),
                ("verdict", r["verdict"]),
                ("fallback", "yes" if r["fallback"] else "no"),
                ("meaning", r["meaning"]),
                ("what to do", r["advice"]),
            ],
        )
        click.echo()
    if unknown:
        sys.exit(EXIT_REFUSED)


@click.command("secret-key")
def secret_key() -> None:
    """Print a new key for OUTBOX_SECRET_KEY."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@click.command("rotate-key")
@click.option("--json", "as_json", is_flag=True, help="The count as JSON.")
@pass_ctx
def rotate_key(ctx: Context, as_json: bool) -> None:
    """Re-encrypt stored SMTP passwords under the newest key.

    The newest is the first of OUTBOX_SECRET_KEY: set OUTBOX_SECRET_KEY=NEW,OLD, run
    this, then drop OLD.
    """

    from worker.crypto import SecretKeyError
    from worker.store.accounts import all_accounts

    rotated = 0
    try:
        # One transaction: a secret that cannot be decrypted leaves every row as it was.
        with ctx.db.session() as session:
            for account in all_accounts(session, for_update=True):
                if account.smtp_password_encrypted:
                    try:
                        account.smtp_password_encrypted = ctx.box.rotate(
                            account.smtp_password_encrypted
                        )
                    except SecretKeyError as exc:
                        raise SecretKeyError(f"account {account.name}: {exc}") from None
                    rotated += 1
    except SecretKeyError as exc:
        fail(f"{exc}; nothing was changed", as_json=as_json)
    if as_json:
        emit_json({"rotated": rotated})
    else:
        table(None, ["secrets re-encrypted"], [[rotated]])


@click.command("flower")
@click.option("--address", default=None, help="Listen address (OUTBOX_FLOWER_ADDRESS; 127.0.0.1).")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Port (OUTBOX_FLOWER_PORT; 5555)."
)
@pass_ctx
def flower_command(ctx: Context, address: str | None, port: int | None) -> None:
    """Run Flower, the monitor, behind basic auth.

    The users and passwords come from OUTBOX_FLOWER_BASIC_AUTH (see config/flower.py).
    """
    import os

    from config.settings import SettingsError
    from worker.cli.common import EXIT_USAGE, fail

    ctx.settings  # noqa: B018 - a wrong OUTBOX_* variable fails here, in one sentence
    env = dict(os.environ)
    if address is not None:
        env["OUTBOX_FLOWER_ADDRESS"] = address
    if port is not None:
        env["OUTBOX_FLOWER_PORT"] = str(port)
    from config.flower import flower_argv, flower_config, flower_env

    try:
        config = flower_config(env)
        argv, child_env = flower_argv(env), flower_env(env)
    except SettingsError as exc:
        fail(str(exc), code=EXIT_USAGE)
    users = ", ".join(config.users) if config.users else "none: open on loopback"
    host = f"[{config.address}]" if ":" in config.address else config.address
    click.echo(f"Flower on http://{host}:{config.port}/ (basic auth users: {users})", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, child_env)  # Flower takes this process: signals go to it


COMMANDS = [db_group, worker_command, explain, secret_key, rotate_key, flower_command]
