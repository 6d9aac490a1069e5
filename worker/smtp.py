"""SMTP transport: one message to one account's own server, every outcome as a `Reply`.

This module owns the conversation with the account's relay (smtplib, synchronous):
connect, STARTTLS or implicit TLS with verification on, EHLO, AUTH, MAIL, RCPT per
recipient, DATA, and the per-process cache of open connections (`SmtpConnectionPool`).
It never raises for an SMTP or network failure: each becomes a `Reply` carrying the
stage where it happened, so callers (retry policy, user-facing explanations) only deal
with values. What a reply *means* lives in `worker.replies`, not here.

Account keys have the form ``f"{account_id}:{settings_version}"``: the part before the
first ``:`` identifies the account, so when its settings change (new version, new key)
connections opened with the old settings are closed rather than reused.

The account password is used for AUTH and nowhere else: it is not in reprs, log lines,
exception messages or Reply texts.
"""

from __future__ import annotations

import errno
import functools
import logging
import smtplib
import socket
import ssl
import threading
import time
from base64 import b64encode
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from worker.replies import ConnectionFailure, Reply, Stage, connection_failure, reply_from

__all__ = ["SendResult", "SmtpAccount", "SmtpConnectionPool", "TlsMode"]

log = logging.getLogger(__name__)

#: Upper bound for the QUIT exchange when closing: a polite goodbye must not cost a
#: full command timeout on a server that has gone silent.
_QUIT_TIMEOUT_S = 2.0

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
)


class TlsMode(StrEnum):
    """How the connection to the account's server is protected."""

    STARTTLS = "starttls"  #: plain connect, then STARTTLS is mandatory (usually port 587)
    TLS = "tls"  #: TLS from the first byte, "implicit TLS" (usually port 465)
    NONE = "none"  #: no TLS at all; whether that is allowed is the caller's decision


@dataclass(frozen=True)
class SmtpAccount:
    """One account's connection settings, password already decrypted.

    ``key`` identifies the account *and* the settings version,
    ``f"{account_id}:{version}"``; it changes whenever the settings change.
    """

    key: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsMode = TlsMode.STARTTLS
    ca_pem: str | None = None  #: extra trusted CA (PEM), e.g. for a private relay
    timeout_s: float = 30.0
    local_hostname: str | None = None

    def __post_init__(self) -> None:
        # Accept the store's own TLS enum or a plain string ("starttls") as well.
        object.__setattr__(self, "tls", TlsMode(self.tls))

    @property
    def account_id(self) -> str:
        """The part of ``key`` before the first ``:`` (the whole key if there is none)."""
        return self.key.partition(":")[0]


@dataclass(frozen=True)
class SendResult:
    """Outcome of one `SmtpConnectionPool.send`.

    ``accepted`` lists the recipients the message was delivered to: accepted at RCPT
    *and* DATA accepted. It is empty whenever ``delivered`` is false, so a caller may
    mark every address in it as sent without further checks.
    """

    accepted: tuple[str, ...]
    #: Refusals at RCPT (stage RCPT), per recipient.
    refused: dict[str, Reply]
    #: The deciding reply: DATA's final reply if DATA ran; else the failing reply
    #: (connect/auth/mail/rcpt/data); for "all recipients refused", the first refusal.
    reply: Reply
    #: The envelope recipients, in order, so that every one of them gets a reply in
    #: `per_recipient` (also those never tried because the connection failed first).
    recipients: tuple[str, ...] = ()

    @property
    def delivered(self) -> bool:
        """DATA was accepted (2xx) for at least one recipient."""
        code = self.reply.code
        return (
            bool(self.accepted)
            and self.reply.stage == Stage.DATA
            and code is not None
            and 200 <= code < 300
        )

    @property
    def per_recipient(self) -> dict[str, Reply]:
        """Every recipient -> its reply: its own refusal at RCPT, else the deciding reply."""
        everyone = self.recipients or (*self.accepted, *self.refused)
        return {address: self.refused.get(address, self.reply) for address in everyone}


class _StepFailed(Exception):
    """Internal: a step of the conversation failed; carries the Reply to report.

    ``alive`` says whether the connection is still in a known state (an SMTP reply
    was read in full) or must be thrown away. ``retryable`` marks a dropped connection
    (not a timeout): on a reused connection's first command it means the server had
    closed it while idle, and the message may go on a fresh one (see `_transaction`).
    """

    def __init__(self, reply: Reply, *, alive: bool, retryable: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.alive = alive
        self.retryable = retryable


@dataclass
class _Connection:
    key: str
    account_id: str
    smtp: smtplib.SMTP
    timeout_s: float
    last_used: float
    #: The reply that proved the session usable: AUTH's 235 or else EHLO's 250.
    ready_reply: Reply
    transactions: int = 0


class SmtpConnectionPool:
    """Per-process cache: at most one open connection per account key; reused across messages.

    Meant for one worker process used from one thread at a time (Celery prefork); a
    lock serialises calls anyway, held for the whole conversation, so concurrent
    callers wait rather than interleave commands on a shared socket.
    """

    def __init__(
        self,
        *,
        idle_s: float = 60.0,
        max_per_connection: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_per_connection < 1:
            raise ValueError("max_per_connection must be at least 1")
        self._idle_s = idle_s
        self._max_per_connection = max_per_connection
        self._clock = clock
        self._lock = threading.Lock()
        self._connections: dict[str, _Connection] = {}
        #: The account key a send is using right now (the reaper leaves it alone).
        self._sending_key: str | None = None

    # -- public API ---------------------------------------------------------------

    def send(
        self,
        account: SmtpAccount,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
    ) -> SendResult:
        """Deliver ``data`` (the full message, CRLF line ends) to ``recipients``.

        Never raises for SMTP or network failures; see `SendResult`.
        """
        if isinstance(recipients, str):
            raise TypeError("recipients must be a sequence of addresses, not one string")
        # Duplicates would get two RCPTs and break the one-reply-per-address mapping.
        rcpts = tuple(dict.fromkeys(recipients))
        if not rcpts:
            raise ValueError("send() needs at least one recipient")

        with self._lock:
            self._sending_key = account.key
            try:
                return self._send_locked(account, envelope_from, rcpts, data)
            finally:
                self._sending_key = None

    def _send_locked(
        self, account: SmtpAccount, envelope_from: str, rcpts: tuple[str, ...], data: bytes
    ) -> SendResult:
        self._close_stale(account)
        conn = self._connections.get(account.key)
        if conn is not None:
            result = self._transaction(conn, account, envelope_from, rcpts, data, True)
            if result is not None:
                return result
            # The server had closed the cached connection before we spoke (nothing
            # of this message was sent): open a fresh one, once, and carry on.
        try:
            conn = self._open(account)
        except _StepFailed as failed:
            return SendResult((), {}, failed.reply, rcpts)
        self._connections[account.key] = conn
        result = self._transaction(conn, account, envelope_from, rcpts, data, False)
        assert result is not None  # only a reused connection asks for a retry
        return result

    def probe(self, account: SmtpAccount) -> Reply:
        """Check settings: connect, TLS, EHLO, AUTH if a username is set, QUIT; no mail.

        Returns the first failing Reply, or the 2xx reply that proved the settings good
        (235 from AUTH, else 250 from EHLO). Uses its own connection, never the cache,
        so it tests exactly the settings given.
        """
        with self._lock:
            try:
                conn = self._open(account)
            except _StepFailed as failed:
                return failed.reply
            _quit(conn.smtp, conn.timeout_s)
            return conn.ready_reply

    def close(self, key: str | None = None) -> None:
        """Close one account key's connection, or all of them (QUIT, errors ignored)."""
        with self._lock:
            keys = list(self._connections) if key is None else [key]
            for k in keys:
                conn = self._connections.pop(k, None)
                if conn is not None:
                    _quit(conn.smtp, conn.timeout_s)

    def close_idle(self) -> int:
        """Close connections idle for `idle_s`; returns how many. Skips if a send is running.

        Called by a timer so that an idle worker does not keep connections (and the
        account's connection slots) open on the server.
        """
        locked = self._lock.acquire(blocking=False)
        # While a send runs (it holds the lock for the whole conversation), the other
        # accounts' idle connections are still closed: their slots expire on time, and an
        # idle connection left open past its slot would break that account's cap.
        busy = None if locked else self._sending_key
        try:
            now = self._clock()
            closed = 0
            for key, conn in list(self._connections.items()):
                idle = key != busy and now - conn.last_used >= self._idle_s
                if idle and self._connections.pop(key, None) is conn:
                    _quit(conn.smtp, conn.timeout_s)
                    closed += 1
            return closed
        finally:
            if locked:
                self._lock.release()

    def has_connection(self, key: str) -> bool:
        """An open, reusable connection is cached for this account key."""
        return key in self._connections

    # -- connection cache -----------------------------------------------------------

    def _close_stale(self, account: SmtpAccount) -> None:
        """Close idle connections (any account) and the account's outdated settings."""
        now = self._clock()
        for key, conn in list(self._connections.items()):
            outdated = conn.account_id == account.account_id and key != account.key
            idle = now - conn.last_used >= self._idle_s
            if outdated or idle:
                log.debug(
                    "smtp %s: closing %s connection",
                    key,
                    "outdated-settings" if outdated else "idle",
                )
                if self._connections.pop(key, None) is conn:  # the reaper may have closed it
                    _quit(conn.smtp, conn.timeout_s)

    def _discard(self, conn: _Connection) -> None:
        """Drop a connection whose state is unknown: no QUIT, just close the socket."""
        if self._connections.get(conn.key) is conn:
            del self._connections[conn.key]
        conn.smtp.close()

    def _release(self, conn: _Connection, *, reset: bool) -> None:
        """After a transaction: keep the connection if it is clean and has uses left."""
        if reset:
            # After a refused or failed transaction the server may still hold
            # envelope state; RSET clears it, and if even RSET fails we don't know
            # what state the session is in.
            try:
                code, _ = conn.smtp.rset()
            except (smtplib.SMTPException, OSError):
                code = -1
            if code != 250:
                self._discard(conn)
                return
        conn.last_used = self._clock()
        if conn.transactions >= self._max_per_connection:
            # Say goodbye now rather than hold a connection we will not use again.
            if self._connections.get(conn.key) is conn:
                del self._connections[conn.key]
            _quit(conn.smtp, conn.timeout_s)

    # -- the conversation -------------------------------------------------------------

    def _open(self, account: SmtpAccount) -> _Connection:
        """Connect, greet, secure and authenticate; raise `_StepFailed` on any failure."""
        log.debug(
            "smtp %s: connecting to %s:%d (tls=%s)",
            account.key,
            account.host,
            account.port,
            account.tls.value,
        )
        context = _tls_context_for(account) if account.tls is not TlsMode.NONE else None
        local_hostname = account.local_hostname or _default_local_hostname()
        smtp: smtplib.SMTP
        if account.tls is TlsMode.TLS:
            smtp = smtplib.SMTP_SSL(
                local_hostname=local_hostname, timeout=account.timeout_s, context=context
            )
        else:
            smtp = smtplib.SMTP(local_hostname=local_hostname, timeout=account.timeout_s)
        # smtplib takes the name to verify the certificate against from `_host`, which
        # only its constructor sets; `connect()` doesn't. We connect separately (so a
        # failed greeting still leaves us the object to close), hence set it here.
        smtp._host = account.host  # type: ignore[attr-defined]
        try:
            code, msg = _step(
                account, smtp, Stage.CONNECT, smtp.connect, account.host, account.port
            )
            if code != 220:
                raise _StepFailed(_reply(account, code, msg, Stage.CONNECT), alive=False)
            ready = _hello(account, smtp)
            if account.tls is TlsMode.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise _StepFailed(
                        _failure(
                            account,
                            ConnectionFailure.TLS,
                            "server does not offer STARTTLS",
                            Stage.CONNECT,
                        ),
                        alive=True,
                    )
                _step(account, smtp, Stage.CONNECT, smtp.starttls, context=context)
                ready = _hello(account, smtp)  # RFC 3207: forget pre-TLS EHLO knowledge
            if account.username:
                ready = _authenticate(account, smtp)
        except _StepFailed as failed:
            if failed.alive:
                _quit(smtp, account.timeout_s)  # a clean goodbye after a refusal
            else:
                smtp.close()
            raise
        log.debug("smtp %s: session ready (%s)", account.key, ready)
        return _Connection(
            key=account.key,
            account_id=account.account_id,
            smtp=smtp,
            timeout_s=account.timeout_s,
            last_used=self._clock(),
            ready_reply=ready,
        )

    def _transaction(
        self,
        conn: _Connection,
        account: SmtpAccount,
        envelope_from: str,
        rcpts: tuple[str, ...],
        data: bytes,
        reused: bool,
    ) -> SendResult | None:
        """MAIL, RCPT each, DATA on an open session.

        Returns None only when ``reused`` and the first command showed the cached
        connection was already dead: nothing was sent, the caller reconnects.
        """
        smtp = conn.smtp
        options, problem = _mail_options(smtp, envelope_from, rcpts, data)
        if problem is not None:
            # Nothing was sent: the session is as clean as before.
            self._release(conn, reset=False)
            return SendResult((), {}, problem, rcpts)
        conn.transactions += 1

        # MAIL. We don't NOOP before reusing a connection (a round trip per message);
        # instead a dead connection shows here and the message goes on a fresh one.
        try:
            code, msg = _step(account, smtp, Stage.MAIL, smtp.mail, envelope_from, options)
        except _StepFailed as failed:
            self._discard(conn)
            if reused and failed.retryable:
                log.debug("smtp %s: cached connection was dead (%s)", account.key, failed.reply)
                return None
            return SendResult((), {}, failed.reply, rcpts)
        mail_reply = _reply(account, code, msg, Stage.MAIL)
        if not 200 <= code < 300:
            if code == 421 and reused:
                # Typically the server's "idle timeout, closing" line, sent while we
                # weren't looking: same as a dead connection.
                log.debug("smtp %s: cached connection was closed (%s)", account.key, mail_reply)
                self._discard(conn)
                return None
            self._after_refusal(conn, mail_reply)
            return SendResult((), {}, mail_reply, rcpts)

        # RCPT, one by one: a refusal of one address doesn't stop the others.
        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        for rcpt in rcpts:
            try:
                code, msg = _step(account, smtp, Stage.RCPT, smtp.rcpt, rcpt)
            except _StepFailed as failed:
                self._discard(conn)
                return SendResult((), refused, failed.reply, rcpts)
            if 200 <= code < 300:
                accepted.append(rcpt)
                continue
            refusal = _reply(account, code, msg, Stage.RCPT)
            refused[rcpt] = refusal
            if code == 421:
                # The server is closing the session: the remaining recipients can't be
                # tried on it, and they share this reply in `per_recipient`.
                self._discard(conn)
                return SendResult((), refused, refusal, rcpts)

        if not accepted:
            first = refused[rcpts[0]]
            self._after_refusal(conn, first)
            return SendResult((), refused, first, rcpts)

        # DATA.
        try:
            code, msg = _step(account, smtp, Stage.DATA, smtp.data, data)
        except _StepFailed as failed:
            if failed.alive:  # DATA itself refused (not 354): the session is intact
                self._after_refusal(conn, failed.reply)
            else:
                self._discard(conn)
            return SendResult((), refused, failed.reply, rcpts)
        data_reply = _reply(account, code, msg, Stage.DATA)
        log.debug("smtp %s: DATA -> %s", account.key, data_reply)
        if 200 <= code < 300:
            self._release(conn, reset=False)
            return SendResult(tuple(accepted), refused, data_reply, rcpts)
        self._after_refusal(conn, data_reply)
        return SendResult((), refused, data_reply, rcpts)

    def _after_refusal(self, conn: _Connection, reply: Reply) -> None:
        log.debug("smtp %s: %s refused: %s", conn.key, reply.stage, reply)
        if reply.code == 421:
            # 421: the server wants us gone and closes its side.
            self._discard(conn)
        else:
            self._release(conn, reset=True)


# -- steps --------------------------------------------------------------------------


def _step(
    account: SmtpAccount,
    smtp: smtplib.SMTP,
    stage: Stage,
    call: Callable[..., object],
    *args: object,
    **kwargs: object,
) -> tuple[int, bytes]:
    """Run one smtplib call, turning every SMTP/network exception into `_StepFailed`."""
    try:
        result = call(*args, **kwargs)
    except smtplib.SMTPResponseException as exc:
        # A complete reply was read (e.g. DATA answered with 554 instead of 354, or
        # STARTTLS with 454), unless smtplib closed the socket itself (line too long).
        reply = _reply(account, exc.smtp_code, exc.smtp_error, stage)
        alive = smtp.sock is not None and exc.smtp_code != 421
        raise _StepFailed(reply, alive=alive) from None
    except (smtplib.SMTPException, OSError, EOFError) as exc:
        failure = _classify(exc, stage)
        retryable = failure is ConnectionFailure.DROPPED
        reply = _failure(account, failure, _describe(exc, failure, stage, account), stage)
        raise _StepFailed(reply, alive=False, retryable=retryable) from None
    return result  # type: ignore[return-value]


def _hello(account: SmtpAccount, smtp: smtplib.SMTP) -> Reply:
    """EHLO, falling back to HELO for a server that doesn't speak ESMTP."""
    code, msg = _step(account, smtp, Stage.CONNECT, smtp.ehlo)
    if 200 <= code < 300:
        return _reply(account, code, _first_line(msg), Stage.CONNECT)
    ehlo_reply = _reply(account, code, msg, Stage.CONNECT)
    if 500 <= code < 600:
        helo_code, helo_msg = _step(account, smtp, Stage.CONNECT, smtp.helo)
        if 200 <= helo_code < 300:
            return _reply(account, helo_code, helo_msg, Stage.CONNECT)
    # EHLO's reply explains more than a HELO refusal that follows it.
    raise _StepFailed(ehlo_reply, alive=code != 421)


def _authenticate(account: SmtpAccount, smtp: smtplib.SMTP) -> Reply:
    """AUTH PLAIN, else AUTH LOGIN, one attempt.

    Not `smtplib.SMTP.login`: it retries every mechanism on a wrong password (several
    failed logins per attempt count against the account on many servers), encodes
    credentials as ASCII only (RFC 4616 says UTF-8), and keeps the password on the
    smtplib object afterwards.
    """
    if not smtp.has_extn("auth"):
        # No reply code exists for this: it's our settings against the server's offer.
        raise _StepFailed(
            Reply(
                code=None,
                text=_scrub(
                    f"{account.host}:{account.port} does not offer AUTH"
                    + (" before TLS" if account.tls is TlsMode.NONE else ""),
                    account,
                ),
                stage=Stage.AUTH,
                failure=ConnectionFailure.UNSUPPORTED,
            ),
            alive=True,
        )
    mechanisms = smtp.esmtp_features["auth"].upper().split()
    user = (account.username or "").encode("utf-8")
    password = (account.password or "").encode("utf-8")
    if "PLAIN" in mechanisms:
        token = b64encode(b"\0" + user + b"\0" + password).decode("ascii")
        code, msg = _step(account, smtp, Stage.AUTH, smtp.docmd, "AUTH", "PLAIN " + token)
    elif "LOGIN" in mechanisms:
        code, msg = _step(account, smtp, Stage.AUTH, smtp.docmd, "AUTH", "LOGIN")
        if code == 334:
            code, msg = _step(account, smtp, Stage.AUTH, smtp.docmd, b64encode(user).decode())
        if code == 334:
            code, msg = _step(account, smtp, Stage.AUTH, smtp.docmd, b64encode(password).decode())
    else:
        offered = " ".join(mechanisms) or "none"
        raise _StepFailed(
            Reply(
                code=None,
                text=f"no AUTH mechanism in common (server offers: {offered})",
                stage=Stage.AUTH,
                failure=ConnectionFailure.UNSUPPORTED,
            ),
            alive=True,
        )
    if code == 334:
        # More challenges than the mechanism has: cancel (RFC 4954) and give up.
        _step(account, smtp, Stage.AUTH, smtp.docmd, "*")
        raise _StepFailed(_reply(account, code, msg, Stage.AUTH), alive=True)
    if code not in (235, 503):  # 503: "already authenticated" is success too
        raise _StepFailed(_reply(account, code, msg, Stage.AUTH), alive=code != 421)
    return _reply(account, code, msg, Stage.AUTH)


def _mail_options(
    smtp: smtplib.SMTP, envelope_from: str, rcpts: tuple[str, ...], data: bytes
) -> tuple[list[str], Reply | None]:
    """MAIL FROM parameters, only when needed and offered; or why we cannot send."""
    options: list[str] = []
    if not (envelope_from.isascii() and all(r.isascii() for r in rcpts)):
        if not smtp.has_extn("smtputf8"):
            return options, Reply(
                code=None,
                text="non-ASCII address, and the server does not offer SMTPUTF8",
                stage=Stage.MAIL,
                failure=ConnectionFailure.UNSUPPORTED,
            )
        options.append("SMTPUTF8")
    if not data.isascii() and smtp.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    return options, None


def _quit(smtp: smtplib.SMTP, timeout_s: float) -> None:
    """QUIT politely with a short timeout, then close; errors don't matter here."""
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(min(timeout_s, _QUIT_TIMEOUT_S))
            smtp.quit()
    except (smtplib.SMTPException, OSError, EOFError, ValueError):
        pass
    finally:
        smtp.close()


# -- replies and failures -----------------------------------------------------------


def _reply(account: SmtpAccount, code: int, msg: bytes | str, stage: Stage) -> Reply:
    reply = reply_from(code, msg, stage)
    scrubbed = _scrub(reply.text, account)
    if scrubbed != reply.text:
        reply = Reply(code=reply.code, enhanced=reply.enhanced, text=scrubbed, stage=stage)
    return reply


def _failure(account: SmtpAccount, failure: ConnectionFailure, text: str, stage: Stage) -> Reply:
    return Reply(code=None, failure=failure, text=_scrub(text, account), stage=stage)


def _scrub(text: str, account: SmtpAccount) -> str:
    """Belt and braces: a server echoing the password must not put it into a Reply."""
    if account.password and account.password in text:
        return text.replace(account.password, "********")
    return text


def _classify(exc: BaseException, stage: Stage) -> ConnectionFailure:
    """Which connection-level failure an exception from smtplib/socket/ssl is.

    An OSError (socket, ssl) is read by its errno and words through the table
    `outbox explain` reads too (`worker.replies.connection_failure`), so an error
    pasted from the logs is explained as the engine decided; its type decides only
    what the table does not know.
    """
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib turns every OSError while sending or reading a reply (including
        # a timeout) into SMTPServerDisconnected; the original is the context.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, TimeoutError):
            return ConnectionFailure.TIMEOUT
        return ConnectionFailure.DROPPED
    if isinstance(exc, OSError):
        # An SSLError's errno is an SSL_ERROR_* number, not an operating-system one.
        number = None if isinstance(exc, ssl.SSLError) else exc.errno
        known = connection_failure(str(exc), number)
        if known is not None:
            return known
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectionFailure.CERTIFICATE
    if isinstance(exc, ssl.SSLError):
        # Only the handshake raises ssl errors directly: later ones are wrapped above.
        return ConnectionFailure.TLS
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailure.REFUSED
    if isinstance(exc, socket.gaierror):
        return ConnectionFailure.DNS
    if isinstance(exc, TimeoutError):
        return ConnectionFailure.TIMEOUT
    if isinstance(exc, ConnectionError | EOFError | smtplib.SMTPException):
        return ConnectionFailure.DROPPED
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return ConnectionFailure.UNREACHABLE
    # Any other OSError: while connecting it means we never reached the server.
    return ConnectionFailure.UNREACHABLE if stage is Stage.CONNECT else ConnectionFailure.DROPPED


def _describe(
    exc: BaseException, failure: ConnectionFailure, stage: Stage, account: SmtpAccount
) -> str:
    where = f"{account.host}:{account.port}"
    step = stage.value.upper()
    if failure is ConnectionFailure.REFUSED:
        return f"{where} refused the connection"
    if failure is ConnectionFailure.DNS:
        return f"{account.host} does not resolve: {exc}"
    if failure is ConnectionFailure.TIMEOUT:
        return f"{where} did not answer within {account.timeout_s:g}s (at {step})"
    if failure is ConnectionFailure.CERTIFICATE:
        reason = getattr(exc, "verify_message", None) or str(exc)
        return f"{where} presented a certificate that is not trusted: {reason}"
    if failure is ConnectionFailure.TLS:
        return f"TLS with {where} failed: {exc}"
    if failure is ConnectionFailure.DROPPED:
        return f"{where} closed the connection unexpectedly (at {step})"
    return f"{where} is unreachable: {exc}"


def _first_line(msg: bytes) -> bytes:
    # EHLO's reply is the server name followed by its extension list; the name is enough.
    return msg.split(b"\n", 1)[0]


# -- TLS and identity -----------------------------------------------------------------


def _tls_context_for(account: SmtpAccount) -> ssl.SSLContext:
    try:
        return _tls_context(account.ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise _StepFailed(
            _failure(
                account,
                ConnectionFailure.CERTIFICATE,
                f"the account's CA certificate (PEM) could not be loaded: {exc}",
                Stage.CONNECT,
            ),
            alive=False,
        ) from None


@functools.lru_cache(maxsize=64)
def _tls_context(ca_pem: str | None) -> ssl.SSLContext:
    """Verifying client context (system CAs + the account's CA); cached: loading the
    system store costs milliseconds, and an SSLContext is safe to share."""
    context = ssl.create_default_context()
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    return context


@functools.cache
def _default_local_hostname() -> str:
    """The EHLO name, as smtplib would compute it, but once per process: smtplib
    calls `socket.getfqdn()` (a reverse DNS lookup) for every connection."""
    fqdn = socket.getfqdn()
    if "." in fqdn:
        return fqdn
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    return f"[{address}]"
