"""`outbox metrics`: the Prometheus exporter."""

from __future__ import annotations

import click

from worker.cli.common import Context, fail, pass_ctx


@click.command("metrics")
@click.option(
    "--host", default=None, help="Listen address (OUTBOX_METRICS_ADDRESS; default 127.0.0.1)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (OUTBOX_METRICS_PORT; default 9464); 0 takes a free one.",
)
@pass_ctx
def metrics_command(ctx: Context, host: str | None, port: int | None) -> None:
    """Serve Prometheus metrics, read from the database.

    Every scrape of /metrics reads the database anew; a scrape that cannot read it
    still answers, with outbox_up 0.
    """
    settings = ctx.settings
    from config.logging import configure_logging
    from worker.metrics import MetricsConfig, OutboxCollector, serve
    from worker.store.db import Database

    configure_logging(json_lines=settings.log_json)
    if settings.database_url.startswith("sqlite"):
        ctx.ensure_schema()  # the embedded database migrates itself; PostgreSQL is told
        db = Database(settings.database_url)
    else:
        # A scrape waits for an unreachable database this long at most, then says outbox_up 0.
        db = Database(
            settings.database_url, pool_size=2, max_overflow=2, connect_args={"connect_timeout": 5}
        )
    collector = OutboxCollector(db, MetricsConfig.from_settings(settings))
    address = host or settings.metrics_address
    listen_port = settings.metrics_port if port is None else port
    try:
        serve(
            collector,
            host=address,
            port=listen_port,
            announce=lambda line: click.echo(line, err=True),
        )
    except OSError as exc:  # the port is taken, or the address is not this host's
        fail(f"cannot listen on {address}:{listen_port}: {exc.strerror or exc}")


COMMANDS = [metrics_command]
