"""`outbox send|show|list|retry|cancel|stats|purge`: the messages, for people and scripts."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from rich.progress import Progress

from worker.cli.common import (
    EXIT_REFUSED,
    Column,
    Context,
    ago,
    console,
    emit_json,
    fail,
    pairs,
    parse_since,
    pass_ctx,
    table,
    wide_option,
)

STATUSES = ["pending", "sent", "failed", "cancelled"]
VERDICTS = ["retry", "account", "recipient", "message"]


@click.command("send")
@click.option("--account", required=True, help="The account whose SMTP server sends it.")
@click.option(
    "--to", "to", multiple=True, required=True, help="A recipient, 'Name <addr>' too (repeatable)."
)
@click.option("--cc", multiple=True, help="A Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="A Bcc recipient (repeatable).")
@click.option("--reply-to", help="Where replies go.")
@click.option("--from", "from_addr", help="Overrides the account's default From.")
@click.option("--subject", required=True, help="The subject line.")
@click.option("--text", help="The plain-text body.")
@click.option(
    "--text-file",
    type=click.Path(exists=True, dir_okay=False),
    help="The plain-text body, from a UTF-8 file.",
)
@click.option(
    "--html-file",
    type=click.Path(exists=True, dir_okay=False),
    help="An HTML body, from a UTF-8 file.",
)
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A file to attach (repeatable).",
)
@click.option("--header", "headers", multiple=True, help="'Name: value' (repeatable).")
@click.option(
    "--idempotency-key", help="The same key for the same account sends the mail only once."
)
@click.option(
    "--priority",
    type=click.Choice(["high", "normal", "bulk"]),
    help="Order within the account's mail: high goes first (default normal).",
)
@click.option(
    "--send-at",
    help="Not before this ISO 8601 time with a zone, e.g. 2026-12-24T09:00:00+01:00.",
)
@click.option("--json", "as_json", is_flag=True, help="The id as JSON, refusals field by field.")
@pass_ctx
def send(
    ctx: Context,
    account: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    reply_to: str | None,
    from_addr: str | None,
    subject: str,
    text: str | None,
    text_file: str | None,
    html_file: str | None,
    attach: tuple[str, ...],
    headers: tuple[str, ...],
    idempotency_key: str | None,
    priority: str | None,
    send_at: str | None,
    as_json: bool,
) -> None:
    """Accept one email and schedule its delivery; prints its id."""
    import mimetypes

    from worker.client import IntakeClient, limits_from
    from worker.intake import InvalidRequest

    if text is not None and text_file is not None:
        raise click.UsageError("give --text or --text-file, not both")
    if text_file:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            fail(f"text: {text_file} is not UTF-8 text", as_json=as_json)
    html = None
    if html_file:
        try:
            html = Path(html_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            fail(f"html: {html_file} is not UTF-8 text", as_json=as_json)
    header_pairs = []
    for raw in headers:
        name, sep, value = raw.partition(":")
        if not sep:
            raise click.BadParameter(f"{raw!r} is not 'Name: value'", param_hint="--header")
        header_pairs.append([name.strip(), value.strip()])
    attachments = [
        {
            "filename": Path(p).name,
            "content_type": mimetypes.guess_type(p)[0] or "application/octet-stream",
            "data": Path(p).read_bytes(),
        }
        for p in attach
    ]
    fields = {
        "account": account,
        "to": list(to),
        "cc": list(cc),
        "bcc": list(bcc),
        "reply_to": reply_to,
        "subject": subject,
        "text": text,
        "html": html,
        "headers": header_pairs,
        "attachments": attachments,
        "idempotency_key": idempotency_key,
        "priority": priority,
        "send_at": send_at,
    }
    if from_addr:
        fields["from_addr"] = from_addr
    ctx.ensure_schema()
    client = IntakeClient(
        ctx.db,
        limits=limits_from(ctx.settings),
        window_s=ctx.settings.retry_window_s,
        wakeups=ctx.wakeups(),
    )
    try:
        accepted = client.enqueue(**fields)
    except InvalidRequest as exc:
        if as_json:
            emit_json(exc.as_dict())
            sys.exit(EXIT_REFUSED)
        fail(str(exc))
    if as_json:
        emit_json({"id": accepted.id, "created": accepted.created})
    else:
        click.echo(accepted.id)


#: `outbox show`'s attempts: at 80 columns the server's words get what is left.
ATTEMPT_COLUMNS = (
    Column("#", justify="right"),
    Column("channel", drop=2),
    Column("when"),
    Column("outcome"),
    Column("stage", drop=1),
    Column("code"),
    Column("server said", min_width=30),
)


@click.command("show")
@click.argument("message_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The story as one JSON object.")
@wide_option
@pass_ctx
def show(ctx: Context, message_id: int, as_json: bool, wide: bool) -> None:
    """The whole story of one email, in plain words."""
    from worker.store.reports import message_story

    now = datetime.now(UTC)
    with ctx.db.session() as session:
        story = message_story(session, message_id, now=now)
    if story is None:
        fail(f"no message with id {message_id}", as_json=as_json)
    if as_json:
        emit_json(story)
        return
    status = story["status"]
    if status == "sent" and story["sent_via"] == "backup":
        status = "sent via backup"
    rows = [
        ("status", status + (" (being sent right now)" if story["being_sent"] else "")),
        ("account", story["account"]),
        ("from", story["from"]),
        ("to", ", ".join(story["to"])),
        ("cc", ", ".join(story["cc"]) or None),
        ("bcc", ", ".join(story["bcc"]) or None),
        ("subject", story["subject"]),
        ("message-id", story["message_id"]),
        (
            "created",
            f"{story['created_at']:%Y-%m-%d %H:%M:%S} UTC ({ago(story['created_at'], now)})",
        ),
        ("priority", story["priority"]),
    ]
    if story["send_at"]:
        rows.append(("send at", f"{story['send_at']:%Y-%m-%d %H:%M:%S} UTC"))
    if story["status"] == "pending":  # a finished mail has no deadline left to count down
        rows.append(
            (
                "deadline",
                f"{story['deadline']:%Y-%m-%d %H:%M:%S} UTC ({ago(story['deadline'], now)})",
            )
        )
    elif story["finished_at"]:
        rows.append(("finished", f"{story['finished_at']:%Y-%m-%d %H:%M:%S} UTC"))
    if story["next_attempt_at"]:
        rows.append(("next attempt", ago(story["next_attempt_at"], now)))
    rows.append(("attempts", story["attempt_count"]))
    why = story["why"]
    if why and story["status"] in ("pending", "failed"):
        label = "why pending" if story["status"] == "pending" else "why failed"
        rows.append((label, why["meaning"]))
        if why.get("advice"):
            rows.append(("what to do", why["advice"]))
    elif story["last_error"] and story["status"] != "sent":
        rows.append(("reason", story["last_error"]))
    if story["account_incident"]:
        rows.append(("account", f"SMTP incident open: {story['account_incident']['reason']}"))
    for address, why_refused in story["refused"].items():
        rows.append(
            ("refused", f"{address}: {why_refused['meaning']} What to do: {why_refused['advice']}")
        )
    pairs(f"message {story['id']}", rows)
    if story["attempts"]:
        table(
            "attempts",
            ATTEMPT_COLUMNS,
            [
                [
                    a["number"],
                    a["channel"],
                    f"{a['started_at']:%H:%M:%S}",
                    a["outcome"],
                    a["stage"],
                    " ".join(str(part) for part in (a["code"], a["enhanced"]) if part),
                    (a["server_text"] or "")
                    + (f" [id {a['provider_message_id']}]" if a["provider_message_id"] else ""),
                ]
                for a in story["attempts"]
            ],
            wide=wide,
        )


#: `outbox list`: at 80 columns the creation time and the subject give way first.
LIST_COLUMNS = (
    Column("id", justify="right"),
    Column("account", min_width=8, max_width=24),
    Column("status"),
    Column("to", min_width=14, max_width=40),
    Column("subject", min_width=12, max_width=30, drop=2),
    Column("created", drop=1),
    Column("tries", justify="right"),
    Column("next"),
    Column("last error", min_width=18),
)


@click.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only messages in this state.")
@click.option("--account", help="Only this account's messages.")
@click.option("--since", help="Created in the last 30m / 2h / 7d, or since an ISO date.")
@click.option("--reason", type=click.Choice(VERDICTS), help="Last failure's verdict.")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=50,
    show_default=True,
    help="At most this many messages, newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON list, every field in full.")
@wide_option
@pass_ctx
def list_(
    ctx: Context,
    status: str | None,
    account: str | None,
    since: str | None,
    reason: str | None,
    limit: int,
    as_json: bool,
    wide: bool,
) -> None:
    """Messages, newest first."""
    from worker.store.reports import list_messages

    with ctx.db.session() as session:
        rows = list_messages(
            session,
            status=status,
            account=account,
            since=parse_since(since),
            verdict=reason,
            limit=limit,
        )
    if as_json:
        emit_json(rows)
        return
    now = datetime.now(UTC)
    table(
        f"{len(rows)} message(s)",
        LIST_COLUMNS,
        [
            [
                r["id"],
                r["account"],
                r["status"]
                + (" (backup)" if r["sent_via"] == "backup" else "")
                + (f" ({r['priority']})" if r["priority"] != "normal" else ""),
                ", ".join(r["to"]),
                r["subject"],
                ago(r["created_at"], now),
                r["attempts"],
                ago(r["next_attempt_at"], now),
                r["last_error"] if r["status"] != "sent" else "",
            ]
            for r in rows
        ],
        wide=wide,
    )


def _select_targets(
    ctx: Context, ids: tuple[int, ...], account: str | None, statuses: tuple[str, ...]
) -> list[int]:
    if ids and account:
        raise click.UsageError("give message ids or --account, not both")
    if not ids and not account:
        raise click.UsageError("give message ids or --account NAME")
    if ids:
        return list(ids)
    from worker.store.accounts import get_account
    from worker.store.actions import message_ids_of

    with ctx.db.session() as session:
        acct = get_account(session, account or "")
        if acct is None:
            fail(f"no account named {account!r}")
        return message_ids_of(session, account_id=acct.id, statuses=statuses)


def _confirm_bulk(targets: list[int], verb: str, yes: bool, dry_run: bool, as_json: bool) -> bool:
    """Bulk actions say what they will touch and need --yes (or --dry-run)."""
    if dry_run or not yes:
        if as_json:
            emit_json({"dry_run": True, "would_" + verb: targets})
        else:
            shown = ", ".join(map(str, targets[:20])) + (" ..." if len(targets) > 20 else "")
            click.echo(f"would {verb} {len(targets)} message(s): {shown or 'none'}")
            if not dry_run:
                click.echo("add --yes to do it")
        if not dry_run and not yes:
            sys.exit(EXIT_REFUSED)
        return False
    return True


def _run_in_batches(targets: list[int], action, label: str, as_json: bool):  # type: ignore[no-untyped-def]
    from worker.operator import ActionReport

    total = ActionReport()
    with Progress(console=console, transient=True, disable=as_json or len(targets) < 200) as bar:
        task = bar.add_task(label, total=len(targets))
        for start in range(0, len(targets), 500):
            chunk = targets[start : start + 500]
            total.merge(action(chunk))
            bar.advance(task, len(chunk))
    return total


def _print_report(report, verb: str, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(f"{verb}: {len(report.done)}")
        for mid, why in report.refused.items():
            click.echo(f"refused {mid}: {why}")
    if report.refused:
        sys.exit(EXIT_REFUSED)


@click.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--account", help="Every message of this account instead of IDS.")
@click.option(
    "--status",
    type=click.Choice(["pending", "failed"]),
    default=None,
    help="With --account: which messages (default: pending).",
)
@click.option("--yes", is_flag=True, help="Confirm a bulk retry.")
@click.option("--dry-run", is_flag=True, help="Only say which messages it would retry.")
@click.option("--json", "as_json", is_flag=True, help="What was done and refused, as JSON.")
@pass_ctx
def retry(
    ctx: Context,
    ids: tuple[int, ...],
    account: str | None,
    status: str | None,
    yes: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Try now, whatever the schedule.

    A failed message is reopened with a fresh retry window; sent or cancelled ones are
    refused with the reason.
    """
    from worker.operator import Operator

    targets = _select_targets(ctx, ids, account, (status or "pending",))
    if account and not _confirm_bulk(targets, "retry", yes, dry_run, as_json):
        return
    operator = Operator(ctx.db, window_s=ctx.settings.retry_window_s)
    report = _run_in_batches(targets, operator.retry, "retrying", as_json)
    ctx.wakeups().accounts_due((account_id, None) for account_id in report.accounts)
    _print_report(report, "retrying now", as_json)


@click.command("cancel")
@click.argument("ids", nargs=-1, type=int)
@click.option("--account", help="Every pending message of this account instead of IDS.")
@click.option("--yes", is_flag=True, help="Confirm a bulk cancel.")
@click.option("--dry-run", is_flag=True, help="Only say which messages it would cancel.")
@click.option("--json", "as_json", is_flag=True, help="What was done and refused, as JSON.")
@pass_ctx
def cancel(
    ctx: Context, ids: tuple[int, ...], account: str | None, yes: bool, dry_run: bool, as_json: bool
) -> None:
    """Cancel pending mail: once this returns, it is never sent."""
    from worker.operator import Operator

    targets = _select_targets(ctx, ids, account, ("pending",))
    if account and not _confirm_bulk(targets, "cancel", yes, dry_run, as_json):
        return
    operator = Operator(ctx.db, window_s=ctx.settings.retry_window_s)
    report = _run_in_batches(targets, operator.cancel, "cancelling", as_json)
    _print_report(report, "cancelled", as_json)


#: `outbox stats`: at 80 columns the headers shorten, the total and cancelled counts go.
STATS_COLUMNS = (
    Column("account", min_width=8, max_width=24),
    Column("total", justify="right", drop=2),
    Column("pending", justify="right"),
    Column("sent", justify="right"),
    Column("failed", justify="right"),
    Column("cancelled", justify="right", drop=1),
    Column("via backup", short="backup", justify="right"),
    Column("fallback rate", short="fallback", justify="right"),
    Column("oldest pending", short="oldest"),
    Column("last verdicts", short="verdicts", min_width=16),
)


@click.command("stats")
@click.option("--account", help="Only this account.")
@click.option("--since", help="Created in the last 30m / 2h / 7d, or since an ISO date.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per account.")
@wide_option
@pass_ctx
def stats(ctx: Context, account: str | None, since: str | None, as_json: bool, wide: bool) -> None:
    """Per-account health of the mail.

    Counts by status and by last verdict, the oldest pending message, the share sent
    through the backup provider.
    """
    from worker.store.reports import stats as compute

    with ctx.db.session() as session:
        rows = compute(session, account=account, since=parse_since(since), now=datetime.now(UTC))
    if as_json:
        emit_json(rows)
        return
    table(
        "accounts",
        STATS_COLUMNS,
        [
            [
                r["account"],
                r["total"],
                r["pending"],
                r["sent"],
                r["failed"],
                r["cancelled"],
                r["sent_via_backup"],
                f"{r['fallback_rate']:.1%}",
                ""
                if r["oldest_pending_s"] is None
                else ago(datetime.now(UTC) - timedelta(seconds=r["oldest_pending_s"])),
                ", ".join(f"{k} {v}" for k, v in sorted(r["by_verdict"].items())),
            ]
            for r in rows
        ],
        wide=wide,
    )


@click.command("purge")
@click.option("--older-than", required=True, help="Finished more than this long ago (30d).")
@click.option("--yes", is_flag=True, help="Confirm: without it, only say how many.")
@click.option("--dry-run", is_flag=True, help="Only say how many it would delete.")
@click.option("--json", "as_json", is_flag=True, help="The count as JSON.")
@pass_ctx
def purge(ctx: Context, older_than: str, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Delete finished mail and its attempts.

    Finished: sent, failed or cancelled. Deleted in batches, with a progress bar.
    """
    from config.settings import SettingsError, parse_duration
    from worker.store.retention import count_purgeable, purge_batch

    try:
        cutoff = datetime.now(UTC) - timedelta(
            seconds=parse_duration(older_than, name="--older-than")
        )
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    with ctx.db.session() as session:
        total = count_purgeable(session, cutoff=cutoff)
    if dry_run or not yes:
        if as_json:
            emit_json({"dry_run": True, "would_purge": total, "cutoff": cutoff})
        else:
            click.echo(
                f"would delete {total} finished message(s) older than {cutoff:%Y-%m-%d %H:%M} UTC"
            )
            if not dry_run:
                click.echo("add --yes to do it")
        if not dry_run:
            sys.exit(EXIT_REFUSED)
        return
    deleted = 0
    with Progress(console=console, disable=as_json) as bar:
        task = bar.add_task("purging", total=total)
        while True:
            with ctx.db.session() as session:
                n = purge_batch(session, cutoff=cutoff, limit=1000)
            deleted += n
            bar.advance(task, n)
            if n < 1000:
                break
    if as_json:
        emit_json({"deleted": deleted})
    else:
        click.echo(f"deleted {deleted} message(s)")


COMMANDS = [send, show, list_, retry, cancel, stats, purge]
