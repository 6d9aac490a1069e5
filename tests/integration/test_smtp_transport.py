"""The SMTP transport against a real server: aiosmtpd on loopback, smtplib as client.

Everything goes through `SmtpConnectionPool`; the server (`standins.smtp`)
scripts the failures and records what arrived.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from standins.smtp import ScriptedSMTPServer, TestCA, make_self_signed
from worker.message import OutgoingEmail, compose
from worker.replies import ConnectionFailure, Reply, Stage
from worker.smtp import SendResult, SmtpAccount, SmtpConnectionPool, TlsMode

pytest_plugins = ["tests.support.fixtures_smtp"]

pytestmark = pytest.mark.timeout(30)

SENDER = "support@acme.test"
#: The account the `smtp_server` fixture accepts.
SMTP_USER = "acct"
SMTP_PASSWORD = "s3cret"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def account_for(
    server: ScriptedSMTPServer, ca: TestCA | None = None, **changes: object
) -> SmtpAccount:
    account = SmtpAccount(
        key="acct-1:1",
        host=server.host,
        port=server.port,
        username=SMTP_USER,
        password=SMTP_PASSWORD,
        tls=TlsMode.STARTTLS,
        ca_pem=ca.ca_pem if ca is not None else None,
        timeout_s=5.0,
        local_hostname="worker.outbox.test",
    )
    return replace(account, **changes)  # type: ignore[arg-type]


def plain_account(server: ScriptedSMTPServer, **changes: object) -> SmtpAccount:
    """For `plain_smtp_server`: no TLS, no AUTH."""
    account = replace(account_for(server), tls=TlsMode.NONE, username=None, password=None)
    return replace(account, **changes)  # type: ignore[arg-type]


def message(n: int = 1, to: tuple[str, ...] = ("alice@example.test",)) -> OutgoingEmail:
    return OutgoingEmail(
        message_id=f"<msg-{n}@outbox.test>",
        from_addr=f"Acme Support <{SENDER}>",
        to=to,
        subject=f"Order {n}",
        text=f"Hello, this is message {n}.\n",
    )


def send(
    pool: SmtpConnectionPool, account: SmtpAccount, email: OutgoingEmail | None = None
) -> SendResult:
    email = email or message()
    return pool.send(account, SENDER, email.recipients, compose(email).as_bytes())


@pytest.fixture
def pool() -> Iterator[SmtpConnectionPool]:
    pool = SmtpConnectionPool()
    yield pool
    pool.close()


# -- TLS and AUTH ---------------------------------------------------------------------


def test_starttls_and_auth_deliver_once(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    email = message(1, to=("alice@example.test", "bob@example.test"))
    result = send(pool, account_for(smtp_server, test_ca), email)

    assert result.delivered
    assert result.accepted == ("alice@example.test", "bob@example.test")
    assert result.refused == {}
    assert (result.reply.code, result.reply.stage) == (250, Stage.DATA)
    assert result.per_recipient == {r: result.reply for r in email.recipients}
    [received] = smtp_server.messages
    assert received.tls is True
    assert received.auth_user == "acct"
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ("alice@example.test", "bob@example.test")
    assert smtp_server.message_ids() == ["<msg-1@outbox.test>"]
    assert received.message["Subject"] == "Order 1"


def test_implicit_tls_delivers(test_ca: TestCA, pool: SmtpConnectionPool) -> None:
    with ScriptedSMTPServer(
        tls="implicit", auth={SMTP_USER: SMTP_PASSWORD}, certs=test_ca
    ) as server:
        result = send(pool, account_for(server, test_ca, tls=TlsMode.TLS))

        assert result.delivered, result.reply
        [received] = server.messages
        assert received.tls is True
        assert received.auth_user == "acct"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_self_signed_server_is_refused_unless_its_certificate_is_given(
    mode: str, tmp_path: Path, pool: SmtpConnectionPool
) -> None:
    certs = make_self_signed(tmp_path)
    tls = TlsMode.STARTTLS if mode == "starttls" else TlsMode.TLS
    with ScriptedSMTPServer(tls=mode, auth={SMTP_USER: SMTP_PASSWORD}, certs=certs) as server:  # type: ignore[arg-type]
        refused = send(pool, account_for(server, tls=tls))

        assert refused.reply.code is None
        assert refused.reply.failure is ConnectionFailure.CERTIFICATE
        assert refused.reply.stage is Stage.CONNECT
        assert not refused.delivered
        assert server.messages == []

        trusted = send(pool, account_for(server, certs, key="acct-1:2", tls=tls))

        assert trusted.delivered, trusted.reply
        assert len(server.messages) == 1


def test_certificate_signed_by_another_ca_is_refused(
    smtp_server: ScriptedSMTPServer, tmp_path: Path, pool: SmtpConnectionPool
) -> None:
    other = make_self_signed(tmp_path)
    result = send(pool, account_for(smtp_server, other))

    assert result.reply.failure is ConnectionFailure.CERTIFICATE


def test_starttls_required_but_not_offered_is_a_tls_failure(
    plain_smtp_server: ScriptedSMTPServer, pool: SmtpConnectionPool
) -> None:
    result = send(pool, plain_account(plain_smtp_server, tls=TlsMode.STARTTLS))

    assert result.reply.code is None
    assert result.reply.failure is ConnectionFailure.TLS
    assert result.reply.stage is Stage.CONNECT
    assert "STARTTLS" in result.reply.text
    assert plain_smtp_server.messages == []


def test_unreadable_ca_pem_is_a_certificate_failure(
    smtp_server: ScriptedSMTPServer, pool: SmtpConnectionPool
) -> None:
    result = send(pool, account_for(smtp_server, ca_pem="not a certificate"))

    assert result.reply.failure is ConnectionFailure.CERTIFICATE
    assert result.reply.stage is Stage.CONNECT
    assert smtp_server.connections_opened == 0


def test_auth_not_offered_fails_at_auth_without_a_code(
    plain_smtp_server: ScriptedSMTPServer, pool: SmtpConnectionPool
) -> None:
    result = send(pool, plain_account(plain_smtp_server, username="acct", password="pw"))

    assert result.reply.code is None
    assert result.reply.stage is Stage.AUTH
    assert "AUTH" in result.reply.text
    assert plain_smtp_server.messages == []


def test_wrong_password_is_535_at_auth_after_one_attempt(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    result = send(pool, account_for(smtp_server, test_ca, password="wrong"))

    assert (result.reply.code, result.reply.enhanced) == (535, "5.7.8")
    assert result.reply.stage is Stage.AUTH
    assert not result.delivered
    assert smtp_server.messages == []
    # One failed login per attempt, not one per mechanism the server offers.
    assert smtp_server.commands.count(("AUTH", 535)) == 1


def test_missing_credentials_are_refused_at_mail(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    result = send(pool, account_for(smtp_server, test_ca, username=None, password=None))

    assert (result.reply.code, result.reply.enhanced) == (530, "5.7.0")
    assert result.reply.stage is Stage.MAIL
    assert smtp_server.messages == []


def test_password_fixed_on_the_server_later_works(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.auth = {SMTP_USER: "rotated"}
    account = account_for(smtp_server, test_ca, password="rotated")
    assert send(pool, account).delivered
    smtp_server.auth[SMTP_USER] = "rotated-again"
    assert send(pool, replace(account, key="acct-1:2")).reply.code == 535


# -- per recipient ----------------------------------------------------------------------


def test_one_refused_recipient_does_not_stop_the_others(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.rcpt["ghost@example.test"] = ["550 5.1.1 No such user"]
    email = message(2, to=("ghost@example.test", "alice@example.test"))

    result = send(pool, account_for(smtp_server, test_ca), email)

    assert result.delivered
    assert result.accepted == ("alice@example.test",)
    refusal = result.refused["ghost@example.test"]
    assert (refusal.code, refusal.enhanced, refusal.stage) == (550, "5.1.1", Stage.RCPT)
    assert refusal.text == "No such user"
    assert result.per_recipient["alice@example.test"] == result.reply
    assert result.per_recipient["ghost@example.test"] == refusal
    [received] = smtp_server.messages
    assert received.rcpt_tos == ("alice@example.test",)


def test_all_recipients_refused_sends_no_data(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.default_rcpt = "550 5.1.1 No such user"
    email = message(3, to=("x@example.test", "y@example.test"))
    account = account_for(smtp_server, test_ca)

    result = send(pool, account, email)

    assert not result.delivered
    assert result.accepted == ()
    assert result.reply == result.refused["x@example.test"]
    assert set(result.refused) == {"x@example.test", "y@example.test"}
    assert not any(command == "DATA" for command, _ in smtp_server.commands)
    assert ("RSET", 250) in smtp_server.commands
    # RSET succeeded, so the connection is kept for the next message.
    smtp_server.script.default_rcpt = "250 OK"
    assert send(pool, account).delivered
    assert smtp_server.connections_opened == 1


def test_greylisted_recipient_is_accepted_on_the_next_attempt(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.rcpt["alice@example.test"] = ["451 4.7.1 Greylisted, try again later"]
    account = account_for(smtp_server, test_ca)

    first = send(pool, account)
    second = send(pool, account)

    assert (first.reply.code, first.reply.enhanced, first.reply.stage) == (451, "4.7.1", Stage.RCPT)
    assert not first.delivered
    assert second.delivered
    assert smtp_server.message_ids() == ["<msg-1@outbox.test>"]


def test_451_at_data(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.data = ["451 4.3.0 Temporary failure, try later"]

    result = send(pool, account_for(smtp_server, test_ca))

    assert (result.reply.code, result.reply.enhanced) == (451, "4.3.0")
    assert result.reply.stage is Stage.DATA
    assert not result.delivered
    assert result.accepted == ()
    assert result.per_recipient == {"alice@example.test": result.reply}
    assert smtp_server.messages == []


def test_non_ascii_recipient_uses_smtputf8(
    plain_smtp_server: ScriptedSMTPServer, pool: SmtpConnectionPool
) -> None:
    email = message(4, to=("jörg@exämple.test",))
    result = send(pool, plain_account(plain_smtp_server), email)

    assert result.delivered, result.reply
    [received] = plain_smtp_server.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == ("jörg@exämple.test",)


# -- connection failures ------------------------------------------------------------------


def test_closed_port_is_refused(pool: SmtpConnectionPool) -> None:
    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        account = SmtpAccount(key="acct-9:1", host="127.0.0.1", port=port, tls=TlsMode.NONE)
        result = pool.send(account, SENDER, ["a@example.test"], b"Subject: x\r\n\r\nx\r\n")

    assert result.reply.code is None
    assert result.reply.failure is ConnectionFailure.REFUSED
    assert result.reply.stage is Stage.CONNECT
    assert result.per_recipient == {"a@example.test": result.reply}


def test_unresolvable_host_is_a_dns_failure(pool: SmtpConnectionPool) -> None:
    account = SmtpAccount(key="acct-9:1", host="no-such-host.invalid", port=25, timeout_s=5)
    result = pool.send(account, SENDER, ["a@example.test"], b"Subject: x\r\n\r\nx\r\n")

    assert result.reply.code is None
    # Without a working resolver the lookup may fail differently; never with a code.
    assert result.reply.failure in (ConnectionFailure.DNS, ConnectionFailure.UNREACHABLE)
    assert result.reply.stage is Stage.CONNECT


def test_421_on_connect(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.connect = ["421 4.7.0 Too many connections"]
    account = account_for(smtp_server, test_ca)

    result = send(pool, account)

    assert (result.reply.code, result.reply.enhanced) == (421, "4.7.0")
    assert result.reply.stage is Stage.CONNECT
    assert smtp_server.wait_for(lambda: smtp_server.current_connections == 0)
    # Nothing cached: the next message opens a new connection and goes through.
    assert send(pool, account).delivered
    assert smtp_server.connections_opened == 2


def test_dropped_after_data(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.drop_after_data = 1
    account = account_for(smtp_server, test_ca)

    result = send(pool, account)

    assert result.reply.code is None
    assert result.reply.failure is ConnectionFailure.DROPPED
    assert result.reply.stage is Stage.DATA
    assert not result.delivered
    assert smtp_server.messages == []
    assert len(smtp_server.dropped_messages) == 1
    # The pool discarded that connection: the next message uses a new one.
    assert send(pool, account).delivered
    assert smtp_server.connections_opened == 2


def test_hang_after_data_times_out(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.hang_after_data_s = 10
    smtp_server.script.hang_after_data = 1
    account = account_for(smtp_server, test_ca, timeout_s=1.0)

    started = time.monotonic()
    result = send(pool, account)
    elapsed = time.monotonic() - started

    assert result.reply.code is None
    assert result.reply.failure is ConnectionFailure.TIMEOUT
    assert result.reply.stage is Stage.DATA
    assert elapsed < 4
    assert smtp_server.wait_for(lambda: smtp_server.current_connections == 0)
    assert smtp_server.messages == []
    assert send(pool, account).delivered


def test_421_at_mail_closes_the_connection(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    smtp_server.script.mail = ["421 4.7.0 Try again later, closing connection"]
    account = account_for(smtp_server, test_ca)

    result = send(pool, account)

    assert (result.reply.code, result.reply.stage) == (421, Stage.MAIL)
    assert send(pool, account).delivered
    assert smtp_server.connections_opened == 2


# -- connection reuse -------------------------------------------------------------------------


def test_connection_is_reused(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    account = account_for(smtp_server, test_ca)
    for n in range(5):
        assert send(pool, account, message(n)).delivered

    assert smtp_server.connections_opened == 1
    assert smtp_server.message_ids() == [f"<msg-{n}@outbox.test>" for n in range(5)]
    assert not any(command == "NOOP" for command, _ in smtp_server.commands)


def test_idle_connection_is_closed_before_use(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA
) -> None:
    clock = FakeClock()
    pool = SmtpConnectionPool(idle_s=60, clock=clock)
    account = account_for(smtp_server, test_ca)
    try:
        assert send(pool, account, message(1)).delivered
        clock.now += 59
        assert send(pool, account, message(2)).delivered
        assert smtp_server.connections_opened == 1
        clock.now += 60
        assert send(pool, account, message(3)).delivered
        assert smtp_server.connections_opened == 2
        assert ("QUIT", 221) in smtp_server.commands
    finally:
        pool.close()


def test_connection_is_replaced_after_max_messages(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA
) -> None:
    pool = SmtpConnectionPool(max_per_connection=2)
    account = account_for(smtp_server, test_ca)
    try:
        for n in range(5):
            assert send(pool, account, message(n)).delivered
        assert smtp_server.connections_opened == 3
        assert smtp_server.max_concurrent_connections == 1
    finally:
        pool.close()


def test_server_closing_the_idle_connection_is_transparent(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    account = account_for(smtp_server, test_ca)
    assert send(pool, account, message(1)).delivered

    smtp_server.close_connections()
    result = send(pool, account, message(2))

    assert result.delivered, result.reply
    assert smtp_server.connections_opened == 2
    assert smtp_server.message_ids() == ["<msg-1@outbox.test>", "<msg-2@outbox.test>"]


def test_server_restart_is_transparent(
    plain_smtp_server: ScriptedSMTPServer, pool: SmtpConnectionPool
) -> None:
    account = plain_account(plain_smtp_server)
    assert send(pool, account, message(1)).delivered

    plain_smtp_server.stop()
    plain_smtp_server.start()
    result = send(pool, account, message(2))

    assert result.delivered, result.reply
    assert plain_smtp_server.message_ids() == ["<msg-1@outbox.test>", "<msg-2@outbox.test>"]


def test_new_settings_close_the_old_connection(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    account = account_for(smtp_server, test_ca)
    other = account_for(smtp_server, test_ca, key="acct-2:1")
    assert send(pool, account).delivered
    assert send(pool, other).delivered
    assert smtp_server.current_connections == 2

    assert send(pool, replace(account, key="acct-1:2")).delivered

    # acct-1:1 was closed; acct-2:1 and acct-1:2 remain.
    assert smtp_server.wait_for(lambda: smtp_server.current_connections == 2)
    assert smtp_server.connections_opened == 3


def test_close_quits_every_connection(
    smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool
) -> None:
    assert send(pool, account_for(smtp_server, test_ca)).delivered
    assert send(pool, account_for(smtp_server, test_ca, key="acct-2:1")).delivered

    pool.close()

    assert smtp_server.wait_for(lambda: smtp_server.current_connections == 0)
    assert smtp_server.commands.count(("QUIT", 221)) == 2


# -- probe ---------------------------------------------------------------------------------


def test_probe(smtp_server: ScriptedSMTPServer, test_ca: TestCA, pool: SmtpConnectionPool) -> None:
    ok = pool.probe(account_for(smtp_server, test_ca))
    bad = pool.probe(account_for(smtp_server, test_ca, password="wrong"))

    assert (ok.code, ok.stage) == (235, Stage.AUTH)
    assert (bad.code, bad.enhanced, bad.stage) == (535, "5.7.8", Stage.AUTH)
    assert smtp_server.messages == []
    assert not any(command == "MAIL" for command, _ in smtp_server.commands)
    assert smtp_server.wait_for(lambda: smtp_server.current_connections == 0)


def test_probe_without_auth_returns_the_ehlo_reply(
    plain_smtp_server: ScriptedSMTPServer, pool: SmtpConnectionPool
) -> None:
    reply = pool.probe(plain_account(plain_smtp_server))

    assert (reply.code, reply.stage) == (250, Stage.CONNECT)


# -- secrets -----------------------------------------------------------------------------------


def test_password_never_shows(
    smtp_server: ScriptedSMTPServer,
    test_ca: TestCA,
    pool: SmtpConnectionPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "pa55-W0rd-never-shown"
    smtp_server.auth = {SMTP_USER: secret}
    caplog.set_level(logging.DEBUG, logger="worker.smtp")
    good = account_for(smtp_server, test_ca, password=secret)
    wrong = account_for(smtp_server, test_ca, key="acct-1:2", password=secret + "x")

    replies: list[Reply] = [
        send(pool, good).reply,
        send(pool, wrong).reply,
        pool.probe(good),
        pool.probe(wrong),
    ]
    smtp_server.script.drop_after_data = 1
    replies.append(send(pool, good).reply)

    assert secret not in repr(good)
    assert secret not in str(good)
    for reply in replies:
        assert secret not in reply.text
        assert secret not in str(reply)
    assert secret not in caplog.text
