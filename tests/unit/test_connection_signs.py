"""One table of connection failures (`reply_codes.CONNECTION_SIGNS`), read by the engine
(worker.smtp, from the exception) and by `outbox explain` (from pasted text): a failure
copied from the logs is explained exactly as the engine decided it."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from worker import smtp
from worker.replies import (
    ConnectionFailure,
    NotAReply,
    Stage,
    Verdict,
    classify,
    connection_failure,
    connection_reply,
    explain_text,
    parse_reply,
)
from worker.store.reports import explain_stored

F = ConnectionFailure
ACCOUNT = smtp.SmtpAccount(key="7:1", host="smtp.acme.example", port=587, timeout_s=5)


@pytest.mark.parametrize(
    ("text", "failure", "verdict"),
    [
        ("[Errno -2] Name or service not known", F.DNS, Verdict.ACCOUNT),
        ("[Errno -3] Temporary failure in name resolution", F.DNS, Verdict.ACCOUNT),
        ("[Errno 8] nodename nor servname provided, or not known", F.DNS, Verdict.ACCOUNT),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
            "certificate (_ssl.c:1000)",
            F.CERTIFICATE,
            Verdict.ACCOUNT,
        ),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
            "certificate is not valid for 'smtp.acme.example'. (_ssl.c:1000)",
            F.CERTIFICATE,
            Verdict.ACCOUNT,
        ),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)", F.TLS, Verdict.ACCOUNT),
        ("[Errno 111] Connection refused", F.REFUSED, Verdict.ACCOUNT),
        ("ConnectionRefusedError: [Errno 111] Connection refused", F.REFUSED, Verdict.ACCOUNT),
        ("[Errno 101] Network is unreachable", F.UNREACHABLE, Verdict.ACCOUNT),
        ("[Errno 113] No route to host", F.UNREACHABLE, Verdict.ACCOUNT),
        ("[Errno 104] Connection reset by peer", F.DROPPED, Verdict.RETRY),
        ("Connection reset by peer", F.DROPPED, Verdict.RETRY),
        ("Connection unexpectedly closed", F.DROPPED, Verdict.RETRY),
        ("timed out", F.TIMEOUT, Verdict.RETRY),
        ("[Errno 110] Connection timed out", F.TIMEOUT, Verdict.RETRY),
        ("_ssl.c:989: The handshake operation timed out", F.TIMEOUT, Verdict.RETRY),
    ],
)
def test_usual_texts_are_explained_as_their_failure(text, failure, verdict):
    explanation = explain_text(text)
    assert explanation.reply.failure is failure
    assert explanation.verdict is verdict
    # ...with the very entry the engine's own reply of that failure gets.
    assert explanation.as_dict() == classify(connection_reply(failure, text)).as_dict()


def test_the_engines_recorded_form_names_the_failure_itself():
    text = "smtp.acme.example does not resolve: [Errno -2] x"
    reply = parse_reply(f"connection dns: {text}")
    assert (reply.failure, reply.text) == (F.DNS, text)


@pytest.mark.parametrize("text", ["hello", "ok", "it did not work", "999 what", "600 x", ""])
def test_text_that_is_no_reply_and_no_known_failure_is_not_guessed_at(text):
    with pytest.raises(NotAReply, match="is not an SMTP reply"):
        explain_text(text)


def test_an_unknown_code_less_text_stays_a_reply_without_failure():
    assert connection_failure("something odd happened") is None
    assert parse_reply("something odd happened").failure is None


def _cert_error() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate "
        "(_ssl.c:1000)",
    )
    exc.verify_message = "self-signed certificate"
    return exc


def _disconnected_by_timeout() -> smtplib.SMTPServerDisconnected:
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as cause:
            raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {cause}")  # noqa: B904 - as smtplib raises it
    except smtplib.SMTPServerDisconnected as exc:
        return exc


#: What the engine meets, as socket, ssl and smtplib raise it.
EXCEPTIONS = [
    (socket.gaierror(-2, "Name or service not known"), F.DNS),
    (socket.gaierror(-3, "Temporary failure in name resolution"), F.DNS),
    (socket.gaierror(-8, "Servname not supported for ai_socktype"), F.DNS),
    (_cert_error(), F.CERTIFICATE),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)"), F.TLS),
    (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF) (_ssl.c:1000)"), F.TLS),
    (ConnectionRefusedError(111, "Connection refused"), F.REFUSED),
    (ConnectionResetError(104, "Connection reset by peer"), F.DROPPED),
    (BrokenPipeError(32, "Broken pipe"), F.DROPPED),
    (OSError(101, "Network is unreachable"), F.UNREACHABLE),
    (OSError(113, "No route to host"), F.UNREACHABLE),
    (OSError(99, "Cannot assign requested address"), F.UNREACHABLE),
    (TimeoutError("timed out"), F.TIMEOUT),
    (OSError(110, "Connection timed out"), F.TIMEOUT),
    (_disconnected_by_timeout(), F.TIMEOUT),
    (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), F.DROPPED),
    (EOFError(), F.DROPPED),
]


@pytest.mark.parametrize(("exc", "failure"), EXCEPTIONS, ids=lambda v: repr(v)[:60])
def test_the_engine_and_explain_agree_on_every_failure_it_meets(exc, failure):
    stage = Stage.CONNECT
    decided = smtp._classify(exc, stage)
    assert decided is failure
    reply = smtp._failure(ACCOUNT, decided, smtp._describe(exc, decided, stage, ACCOUNT), stage)
    engine = classify(reply).as_dict()
    # What the logs and `outbox list` print (str(reply)), what `outbox show` and the
    # notices explain from (the stored text), and the raw exception's own words.
    assert explain_text(str(reply)).as_dict() == engine
    assert explain_stored(None, None, reply.text) == engine
    if str(exc) not in SAY_NOTHING:
        assert connection_failure(str(exc)) is decided


#: Words that say nothing of the failure (or whose failure depends on the stage): the
#: engine goes by the exception's type, and logs its own words, checked above.
SAY_NOTHING = {"", "[Errno 99] Cannot assign requested address"}


def test_a_wrong_ca_file_is_a_certificate_failure_both_ways():
    text = "the account's CA certificate (PEM) could not be loaded: [X509] no certificate"
    assert explain_text(text).reply.failure is F.CERTIFICATE


@pytest.mark.parametrize(
    ("text", "failure"),
    [
        ("server does not offer STARTTLS", F.TLS),
        ("smtp.acme.example:25 does not offer AUTH before TLS", F.UNSUPPORTED),
        ("no AUTH mechanism in common (server offers: CRAM-MD5)", F.UNSUPPORTED),
        ("non-ASCII address, and the server does not offer SMTPUTF8", F.UNSUPPORTED),
    ],
)
def test_the_engines_own_words_for_what_the_server_lacks(text, failure):
    assert explain_text(text).reply.failure is failure
