"""`outbox account set|show|list|test`."""

from __future__ import annotations

import sys
from typing import Any

import click

from worker.cli.common import (
    EXIT_REFUSED,
    Column,
    Context,
    ago,
    emit_json,
    fail,
    pairs,
    pass_ctx,
    table,
    wide_option,
)

#: `outbox account list`: a host:port is cut only past 30 characters; at 80 columns the
#: last change, the From and the user give way first.
ACCOUNT_COLUMNS = (
    Column("name", min_width=8, max_width=30),
    Column("server", min_width=30),
    Column("tls"),
    Column("user", min_width=8, max_width=24, drop=2),
    Column("from", min_width=12, max_width=40, drop=3),
    Column("conns", justify="right"),
    Column("incident"),
    Column("updated", drop=1),
)


@click.group("account")
def account_group() -> None:
    """Accounts: each one's own SMTP server."""


@account_group.command("set")
@click.argument("name")
@click.option("--host", help="SMTP server host name.")
@click.option("--port", type=int, help="SMTP port (587 for starttls, 465 for tls).")
@click.option("--username", help="SMTP AUTH user; empty string to remove.")
@click.option("--password-stdin", is_flag=True, help="Read the SMTP password from stdin.")
@click.option("--tls", type=click.Choice(["starttls", "tls", "none"]), help="TLS mode.")
@click.option(
    "--allow-plaintext/--no-allow-plaintext",
    default=None,
    help="Permit --tls none to a non-loopback host.",
)
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM file of a private CA to trust for this relay.",
)
@click.option("--from", "from_addr", help="Default From address.")
@click.option("--notify-email", help="Where incident notices are emailed.")
@click.option("--notify-webhook", help="URL that receives incident notices as JSON POSTs.")
@click.option("--max-connections", type=int, help="Concurrent SMTP connections, all workers.")
@click.option("--events-webhook", help="HTTPS URL for the status events; '' removes it.")
@click.option(
    "--events-secret-stdin",
    is_flag=True,
    help="Read the webhook's whsec_ secret from stdin (after the password).",
)
@click.option("--no-events-webhook", is_flag=True, help="Remove the events webhook.")
@click.option(
    "--backup-verified/--no-backup-verified",
    default=None,
    help="The From domain is verified at the backup provider.",
)
@click.option("--json", "as_json", is_flag=True, help="What changed, as JSON.")
@pass_ctx
def account_set(
    ctx: Context,
    name: str,
    host: str | None,
    port: int | None,
    username: str | None,
    password_stdin: bool,
    tls: str | None,
    allow_plaintext: bool | None,
    ca_file: str | None,
    from_addr: str | None,
    notify_email: str | None,
    notify_webhook: str | None,
    max_connections: int | None,
    events_webhook: str | None,
    events_secret_stdin: bool,
    no_events_webhook: bool,
    backup_verified: bool | None,
    as_json: bool,
) -> None:
    """Create account NAME, or change only the options given.

    Options not given keep their value. Changing SMTP settings sends the account's
    pending mail at once.
    """
    from worker.store.accounts import AccountChanges, save_account
    from worker.store.errors import InvalidAccountSettings
    from worker.webhook_signing import secret_problem, url_problem

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    events_secret = None
    if events_secret_stdin:
        events_secret = sys.stdin.readline().strip()
        problem = secret_problem(events_secret)
        if problem:
            fail(f"events_secret: {problem}", as_json=as_json)
    if no_events_webhook:
        events_webhook = ""
    # Both webhooks are posted to through the same guard: refused here, not at delivery.
    for field, url in (("events_webhook", events_webhook), ("notify_webhook", notify_webhook)):
        if url:
            problem = url_problem(url, allow_private=ctx.settings.events_allow_private)
            if problem:
                fail(f"{field}: {url!r} {problem}", as_json=as_json)
    ca_pem = None
    if ca_file:
        with open(ca_file) as f:
            ca_pem = f.read()
    changes = AccountChanges(
        smtp_host=host,
        smtp_port=port,
        smtp_username=username,
        password=password,
        tls_mode=tls,
        allow_plaintext=allow_plaintext,
        ca_pem=ca_pem,
        from_addr=from_addr,
        notify_email=notify_email,
        notify_webhook=notify_webhook,
        max_connections=max_connections,
        backup_verified=backup_verified,
    )
    ctx.ensure_schema()
    from worker.clock import utcnow

    now = utcnow()
    try:
        with ctx.db.session() as session:
            saved = save_account(
                session,
                name,
                changes,
                box=ctx.box,
                default_max_connections=ctx.settings.default_max_connections,
                now=now,
            )
            if events_webhook is not None or events_secret is not None:
                _set_events_webhook(session, saved.account_id, events_webhook, events_secret, ctx)
    except InvalidAccountSettings as exc:
        fail(str(exc), as_json=as_json)
    woken = saved.pending if saved.smtp_changed else 0
    if woken:
        ctx.wakeups().mail_due(saved.account_id)
    result = {
        "account": name,
        "created": saved.created,
        "smtp_changed": saved.smtp_changed,
        "pending_sent_now": woken,
    }
    if as_json:
        emit_json(result)
    else:
        verb = "created" if saved.created else "updated"
        click.echo(
            f"account {name} {verb}"
            + (f"; {woken} pending message(s) are being sent now" if woken else "")
        )


def _set_events_webhook(
    session: Any, account_id: int, url: str | None, secret: str | None, ctx: Context
) -> None:
    """Point the account's events at its webhook (again: re-enables it), or remove it."""
    from worker.store.accounts import account_by_id
    from worker.store.errors import InvalidAccountSettings
    from worker.store.webhooks import set_account_webhook

    account = account_by_id(session, account_id)
    assert account is not None
    target = account.events_webhook if url is None else (url or None)
    if target is None and secret is not None:
        raise InvalidAccountSettings(
            [("events_secret", "needs an events webhook (--events-webhook URL)")]
        )
    set_account_webhook(
        session,
        account_id,
        url=target,
        secret_encrypted=ctx.box.encrypt(secret) if secret else None,
    )


@account_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Settings and health as JSON.")
@pass_ctx
def account_show(ctx: Context, name: str, as_json: bool) -> None:
    """Settings (never the password) and health of one account."""
    from worker.clock import utcnow
    from worker.store.accounts import account_summary, get_account

    with ctx.db.session() as session:
        account = get_account(session, name)
        if account is None:
            fail(f"no account named {name!r}", as_json=as_json)
        summary = account_summary(session, account, now=utcnow())
        summary["events_webhook"] = _events_webhook_state(session, account)
    if as_json:
        emit_json(summary)
        return
    hook = summary["events_webhook"]
    rows = [
        (k, v) for k, v in summary.items() if k not in ("messages", "incident", "events_webhook")
    ]
    rows.append(("events webhook", _describe_hook(hook)))
    rows.append(("messages", ", ".join(f"{k} {v}" for k, v in summary["messages"].items())))
    incident = summary["incident"]
    rows.append(
        (
            "incident",
            "none"
            if incident is None
            else f"open since {incident['opened_at']}: {incident['reason']} "
            f"(last reply: {incident['last_reply']})",
        )
    )
    pairs(f"account {name}", rows)


def _events_webhook_state(session: Any, account: Any) -> dict[str, Any] | None:
    from worker.store.webhooks import destination_of

    if not account.events_webhook:
        return None
    state = destination_of(session, account.id) or {}
    return {
        "url": account.events_webhook,
        "secret": "set" if account.events_secret_encrypted else "not set",
        **{k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in state.items()},
    }


def _describe_hook(hook: dict[str, Any] | None) -> str:
    if hook is None:
        return "none (the global OUTBOX_EVENTS_WEBHOOK, if set)"
    text = f"{hook['url']} (secret: {hook['secret']})"
    if hook.get("disabled_at"):
        text += f"; DISABLED since {hook['disabled_at']}: {hook['disabled_reason']}"
    elif hook.get("failing_since"):
        text += f"; failing since {hook['failing_since']}, next try {hook['next_try_at']}"
    if hook.get("last_error"):
        text += f"; last error: {hook['last_error']}"
    return text


@account_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, every setting in full.")
@wide_option
@pass_ctx
def account_list(ctx: Context, as_json: bool, wide: bool) -> None:
    """All accounts."""
    from worker.store.accounts import accounts_with_open_incidents, all_accounts

    with ctx.db.session() as session:
        open_incidents = accounts_with_open_incidents(session)
        rows: list[dict[str, Any]] = [
            {
                "name": a.name,
                "host": a.smtp_host,
                "port": a.smtp_port,
                "tls": a.tls_mode,
                "username": a.smtp_username,
                "from": a.from_addr,
                "max_connections": a.max_connections,
                "incident": a.id in open_incidents,
                "updated_at": a.updated_at,
            }
            for a in all_accounts(session)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        "accounts",
        ACCOUNT_COLUMNS,
        [
            [
                r["name"],
                f"{r['host']}:{r['port']}",
                r["tls"],
                r["username"],
                r["from"],
                r["max_connections"],
                "OPEN" if r["incident"] else "",
                ago(r["updated_at"]),
            ]
            for r in rows
        ],
        wide=wide,
    )


@account_group.command("test")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The server's answer and verdict as JSON.")
@pass_ctx
def account_test(ctx: Context, name: str, as_json: bool) -> None:
    """Check NAME's SMTP settings without sending mail.

    Connects, then upgrades to TLS and logs in as the settings say (TLS unless --tls
    none, AUTH only with a username), and says goodbye. Exit code 1 if any step fails,
    with the server's answer explained.
    """
    from worker.crypto import SecretKeyError
    from worker.delivery import smtp_account_for
    from worker.replies import classify
    from worker.smtp import SmtpConnectionPool
    from worker.store.accounts import get_account

    pool = SmtpConnectionPool()
    with ctx.db.session() as session:
        account = get_account(session, name)
        if account is None:
            fail(f"no account named {name!r}", as_json=as_json)
        try:
            smtp_account = smtp_account_for(account, ctx.box, timeout_s=ctx.settings.smtp_timeout_s)
        except SecretKeyError as exc:
            fail(f"account {name}: {exc}", as_json=as_json)
    reply = pool.probe(smtp_account)
    pool.close()
    explanation = classify(reply)
    ok = explanation.verdict.value == "ok"
    result = {
        "account": name,
        "ok": ok,
        "reply": str(reply),
        "stage": reply.stage.value if reply.stage else None,
        **explanation.as_dict(),
    }
    if as_json:
        emit_json(result)
    else:
        pairs(
            f"account {name}: {'OK' if ok else 'FAILED'}",
            [
                ("server", f"{smtp_account.host}:{smtp_account.port} ({smtp_account.tls.value})"),
                ("reply", str(reply)),
                ("stage", result["stage"]),
                ("verdict", result["verdict"]),
                ("meaning", result["meaning"]),
                ("what to do", result["advice"]),
            ],
        )
    if not ok:
        sys.exit(EXIT_REFUSED)


COMMANDS = [account_group]
