"""Real connection failures, met by the engine's SMTP transport, pasted into `outbox
explain` as the logs print them: the answer is the engine's own, verdict and words."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from standins.smtp import ScriptedSMTPServer
from tests.support.cli_runs import outbox_cli_many
from worker.replies import ConnectionFailure, Reply, classify
from worker.smtp import SmtpAccount, SmtpConnectionPool, TlsMode
from worker.store.reports import explain_stored

pytest_plugins = ["tests.support.fixtures_smtp"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture
def resetting_port() -> Iterator[int]:
    """Accepts, then resets the connection (RST, not a polite FIN)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


def _probe(account: SmtpAccount) -> Reply:
    pool = SmtpConnectionPool()
    try:
        return pool.probe(account)
    finally:
        pool.close()


def test_failures_met_for_real_are_explained_as_the_engine_decided(
    closed_port, silent_port, resetting_port, smtp_server: ScriptedSMTPServer
):
    base = SmtpAccount(key="9:1", host="127.0.0.1", port=closed_port, tls=TlsMode.NONE)
    cases = {
        ConnectionFailure.REFUSED: base,
        ConnectionFailure.DNS: SmtpAccount(key="9:1", host="no-such-relay.invalid", port=25),
        # The server's certificate comes from a CA this account was never told about.
        ConnectionFailure.CERTIFICATE: SmtpAccount(
            key="9:1", host="127.0.0.1", port=smtp_server.port, tls=TlsMode.STARTTLS
        ),
        ConnectionFailure.TIMEOUT: SmtpAccount(
            key="9:1", host="127.0.0.1", port=silent_port, tls=TlsMode.NONE, timeout_s=1
        ),
        ConnectionFailure.DROPPED: SmtpAccount(
            key="9:1", host="127.0.0.1", port=resetting_port, tls=TlsMode.NONE
        ),
    }
    replies = {failure: _probe(account) for failure, account in cases.items()}
    if replies[ConnectionFailure.DNS].failure is ConnectionFailure.UNREACHABLE:
        pytest.skip("no resolver here: the lookup fails as 'unreachable', not as DNS")
    assert {f: r.failure for f, r in replies.items()} == {f: f for f in cases}

    # As the log line and `outbox list` print it, and as the attempt stores it.
    printed = [str(reply) for reply in replies.values()]
    stored = [reply.text for reply in replies.values()]
    results = outbox_cli_many([["explain", "--json", text] for text in printed + stored], env={})
    for reply, by_print, by_store in zip(
        replies.values(), results[: len(cases)], results[len(cases) :], strict=True
    ):
        engine = classify(reply).as_dict()
        for result in (by_print, by_store):
            assert result.returncode == 0, result.stderr
            answer = json.loads(result.stdout)
            answer.pop("reply")
            assert answer == engine, (reply, answer)
        assert explain_stored(None, None, reply.text) == engine


def test_wrong_ca_is_explained_as_a_certificate_failure(smtp_server: ScriptedSMTPServer):
    reply = _probe(
        SmtpAccount(
            key="9:1",
            host="127.0.0.1",
            port=smtp_server.port,
            tls=TlsMode.STARTTLS,
            ca_pem="-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
        )
    )
    assert reply.failure is ConnectionFailure.CERTIFICATE
    assert explain_stored(None, None, reply.text) == classify(reply).as_dict()
