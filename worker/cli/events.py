"""`outbox events`: the status events Outbox wrote, and sending them again."""

from __future__ import annotations

import click

from worker.cli import tables
from worker.cli.common import Context, console, emit_json, fail, parse_since, pass_ctx
from worker.cli.tables import Column

EVENT_COLUMNS = [
    Column("message", justify="right"),
    Column("seq", justify="right"),
    Column("type"),
    Column("at"),
    Column("account", min_width=8, max_width=20, drop=2),
    Column("published", short="pub", drop=1),
    Column("detail", min_width=20),
]


def _detail(event: dict) -> str:
    if event["type"] == "sent":
        return f"{event.get('channel')}: {', '.join(event.get('recipients') or [])}"
    if event["type"] == "recipient_failed":
        return f"{event.get('recipient')}: {event.get('meaning') or event.get('server_text')}"
    if event["type"] in ("deferred", "failed"):
        return str(event.get("meaning") or event.get("reason") or event.get("server_text") or "")
    return str(event.get("reason") or "")


@click.group("events", invoke_without_command=True)
@click.option("--message", "message_id", type=int, help="Only this message's events.")
@click.option("--account", help="Only this account's events.")
@click.option("--since", help="Written in the last 30m / 2h / 7d, or since an ISO date.")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="At most this many (the newest), shown oldest first.",
)
@click.option("--wide", is_flag=True, help="Every column in full, however wide.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the event schema) instead.")
@click.pass_context
def events(
    click_ctx: click.Context,
    message_id: int | None,
    account: str | None,
    since: str | None,
    limit: int,
    wide: bool,
    as_json: bool,
) -> None:
    """Status events: what each sender was told."""
    if click_ctx.invoked_subcommand is not None:
        return
    from worker.store.events import list_events

    ctx = click_ctx.ensure_object(Context)
    with ctx.db.session() as session:
        rows = list_events(
            session,
            message_id=message_id,
            account=account,
            since=parse_since(since),
            limit=limit,
        )
    if as_json:
        emit_json(rows)
        return
    tables.show(
        console,
        f"{len(rows)} event(s)",
        EVENT_COLUMNS,
        [
            [
                e["message_id"],
                e["seq"],
                e["type"],
                e["at"][:19].replace("T", " "),
                e["account"],
                (e["published_at"] or "")[:19].replace("T", " ") or "-",
                _detail(e),
            ]
            for e in rows
        ],
        wide=wide,
    )


@events.command("redeliver")
@click.argument("message_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")
@pass_ctx
def redeliver(ctx: Context, message_id: int, as_json: bool) -> None:
    """Send a message's events again (status task, webhook).

    The same events, with the same ids, in the same order."""
    from worker.store.events import redeliver as mark_again
    from worker.store.webhooks import redeliver as post_again

    with ctx.db.session() as session:
        count = mark_again(session, message_id=message_id)
        hooked = post_again(session, message_id=message_id)
    if count == 0 and hooked == 0:
        fail(
            f"message {message_id} has no events for a status task or a webhook",
            as_json=as_json,
        )
    if as_json:
        emit_json({"message_id": message_id, "events": count, "webhook_events": hooked})
        return
    if count:
        console.print(
            f"{count} event(s) of message {message_id} will be published again "
            "(by the next `outbox.publish_events`, within OUTBOX_SWEEP_INTERVAL).",
            highlight=False,
        )
    if hooked:
        console.print(
            f"{hooked} event(s) of message {message_id} will be posted to its webhook "
            "again (by the next `outbox.deliver_webhooks`, within OUTBOX_EVENTS_INTERVAL).",
            highlight=False,
        )


@events.command("webhooks")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")
@pass_ctx
def webhooks(ctx: Context, as_json: bool) -> None:
    """Events webhooks and notify webhooks: state, errors, backlog.

    The events' destinations first, then each account's notify webhook (incident
    notices): waiting, failing, given up, posted."""
    from worker.store.notices import notice_webhooks
    from worker.store.webhooks import destinations

    with ctx.db.session() as session:
        rows = [{"type": "events", **r} for r in destinations(session)]
        notices = [{"type": "notices", **r} for r in notice_webhooks(session)]
    if as_json:
        emit_json(rows + notices)
        return
    for r in rows:
        state = (
            f"DISABLED ({r['disabled_reason']})"
            if r["disabled_at"]
            else _failing(r)
            if r["failing_since"]
            else "ok"
        )
        console.print(f"{r['destination']}  {r['url']}", highlight=False, soft_wrap=False)
        console.print(
            f"  {state}; {r['behind']} behind, {r['delivered']} delivered", highlight=False
        )
        _last_error(r["last_error"])
    for n in notices:
        state = _failing(n) if n["failing"] else "ok"
        console.print(
            f"{n['account']} (notices)  {n['url'] or 'no notify webhook'}",
            highlight=False,
            soft_wrap=False,
        )
        console.print(f"  {state}", highlight=False)
        console.print(
            f"  {n['waiting']} waiting, {n['failing']} failing, "
            f"{n['given_up']} given up, {n['posted']} posted",
            highlight=False,
        )
        if n["given_up_reason"]:
            console.print(f"  given up: {n['given_up_reason'][:68]}", highlight=False)
        _last_error(n["last_error"])


def _failing(row: dict) -> str:
    """The "failing since ..., next ..." of a destination or a notify webhook."""
    since, next_try = row["failing_since"], row["next_try_at"]
    text = f"failing since {since:%m-%d %H:%M}" if since else "failing"
    return f"{text}, next {next_try:%H:%M:%S}" if next_try else text


def _last_error(error: str | None) -> None:
    if error:
        console.print(f"  last error: {error[:66]}", highlight=False)


COMMANDS = [events]
