"""A scripted, recording SMTP server on loopback, for tests and demos (aiosmtpd).

`ScriptedSMTPServer` runs aiosmtpd in a background thread on 127.0.0.1. Tests script
its replies at runtime (greylisting at RCPT, 451 at DATA, 421 on connect, dropping or
hanging after DATA) through ``server.script``, and inspect what it received through
``server.messages`` and the connection counters. `make_test_ca` / `make_self_signed`
create the certificates for its TLS modes.

No pytest here: the fixtures live in ``tests.support.fixtures_smtp``, and a standalone
process (``make demo``) can import this module as is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.message
import email.policy
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Received",
    "Script",
    "ScriptedSMTPServer",
    "TestCA",
    "make_self_signed",
    "make_test_ca",
]

TlsOption = Literal["starttls", "implicit", "none"]

_log = logging.getLogger(__name__)

DEFAULT_RCPT_REPLY = "250 OK"
DEFAULT_MAIL_REPLY = "250 OK"
DEFAULT_DATA_REPLY = "250 2.0.0 OK queued"
AUTH_REQUIRED_REPLY = "530 5.7.0 Authentication required"


# -- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class TestCA:
    """Certificates for a test server.

    ``ca_pem`` is what a client must trust to accept the server (`SmtpAccount.ca_pem`):
    the CA's certificate, or for `make_self_signed` the server certificate itself.
    """

    __test__ = False  # not a pytest test class, despite the name

    ca_pem: str
    ca_cert_path: Path
    cert_path: Path  #: server certificate (PEM)
    key_path: Path  #: server private key (PEM, unencrypted)
    cert_pem: str

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSL context presenting this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts ``ca_pem``."""
        context = ssl.create_default_context(cadata=self.ca_pem)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Outbox tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _server_san() -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(days=1)).not_valid_after(
        now + dt.timedelta(days=30)
    )


def make_test_ca(tmp_dir: str | Path) -> TestCA:
    """A CA and a server certificate it signs, for ``localhost`` / 127.0.0.1 / ::1.

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` into ``tmp_dir``. EC P-256
    keys: generating them takes milliseconds.
    """
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Outbox Test CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_server_san(), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _write(tmp, ca_pem=_pem(ca_cert), cert=server_cert, key=server_key)


def make_self_signed(tmp_dir: str | Path) -> TestCA:
    """A self-signed server certificate (no CA): what a private relay often presents.

    A client refuses it unless it trusts the certificate itself, so ``ca_pem`` is the
    server certificate. Files: ``selfsigned.pem``, ``selfsigned.key``.
    """
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("localhost")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Like `openssl req -x509`: CA:TRUE with keyCertSign, which OpenSSL needs to
        # treat the certificate as its own issuer (a trust anchor) once trusted.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_server_san(), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _write(tmp, ca_pem=_pem(cert), cert=cert, key=key, stem="selfsigned")


def _write(
    tmp: Path,
    *,
    ca_pem: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    stem: str = "server",
) -> TestCA:
    ca_path = tmp / ("ca.pem" if stem == "server" else f"{stem}-ca.pem")
    cert_path = tmp / f"{stem}.pem"
    key_path = tmp / f"{stem}.key"
    ca_path.write_text(ca_pem)
    cert_path.write_text(_pem(cert))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return TestCA(
        ca_pem=ca_pem,
        ca_cert_path=ca_path,
        cert_path=cert_path,
        key_path=key_path,
        cert_pem=_pem(cert),
    )


# -- script and records -----------------------------------------------------------------


class Script:
    """What the server replies, changeable from any thread while it runs.

    Assign whole values from the test thread (``script.rcpt["a@x"] = [...]``,
    ``script.drop_after_data = 1``); the server consumes them under a lock.

    - ``connect``: replies sent *instead of the greeting*, one per new connection, after
      which the server closes it (``"421 4.7.0 Too many connections"``).
      ``greeting_reply`` does the same for every connection while set.
    - ``mail`` / ``data``: replies for MAIL FROM / end of DATA, consumed in order; when
      exhausted, ``default_mail`` / ``default_data``.
    - ``rcpt[address]``: replies for RCPT TO of that address, consumed in order; when
      exhausted (or for other addresses), ``default_rcpt``.
    - ``drop_after_data``: for the next n messages, close the connection after the
      data arrived, without replying (the message goes to ``dropped_messages``).
    - ``hang_after_data_s``: wait that long before replying to the end of DATA; for the
      next ``hang_after_data`` messages, or every one while it is None.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self.connect: list[str] = []
            self.greeting_reply: str | None = None
            self.mail: list[str] = []
            self.default_mail: str = DEFAULT_MAIL_REPLY
            self.rcpt: dict[str, list[str]] = {}
            self.default_rcpt: str = DEFAULT_RCPT_REPLY
            self.data: list[str] = []
            self.default_data: str = DEFAULT_DATA_REPLY
            self.drop_after_data: int = 0
            self.hang_after_data_s: float = 0.0
            self.hang_after_data: int | None = None

    def next_connect(self) -> str | None:
        with self._lock:
            if self.connect:
                return self.connect.pop(0)
            return self.greeting_reply

    def next_mail(self) -> str:
        with self._lock:
            return self.mail.pop(0) if self.mail else self.default_mail

    def next_rcpt(self, address: str) -> str:
        with self._lock:
            replies = self.rcpt.get(address)
            if replies is None:
                replies = self.rcpt.get(address.lower())
            return replies.pop(0) if replies else self.default_rcpt

    def next_data(self) -> tuple[str, bool, float]:
        """(reply, drop without replying, seconds to wait before replying)."""
        with self._lock:
            reply = self.data.pop(0) if self.data else self.default_data
            if self.drop_after_data > 0:
                self.drop_after_data -= 1
                return reply, True, 0.0
            hang = 0.0
            if self.hang_after_data_s > 0 and self.hang_after_data != 0:
                hang = self.hang_after_data_s
                if self.hang_after_data is not None:
                    self.hang_after_data -= 1
            return reply, False, hang


@dataclass(frozen=True)
class Received:
    """One message as the server received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: email.message.Message
    tls: bool
    auth_user: str | None
    peer: Any
    mail_options: tuple[str, ...] = field(default=())

    @property
    def message_id(self) -> str | None:
        value = self.message["Message-ID"]
        return str(value) if value is not None else None


# -- aiosmtpd glue ---------------------------------------------------------------------


class _ScriptedSMTP(SMTP):
    """aiosmtpd's SMTP session, plus connection bookkeeping and command recording."""

    def __init__(self, owner: ScriptedSMTPServer, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner
        self._counted = False
        self._command = "CONNECT"
        # Wrap the command dispatch table so each reply can be logged with the
        # command it answers (aiosmtpd offers no hook that sees every reply).
        self._smtp_methods = {
            name: self._tracked(name, method) for name, method in self._smtp_methods.items()
        }

    def _tracked(self, name: str, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def run(arg: Any) -> Any:
            self._command = name
            return await method(arg)

        return run

    @property
    def uses_tls(self) -> bool:
        # STARTTLS sets _tls_protocol; implicit TLS doesn't (aiosmtpd sees a plain
        # transport wrapped by asyncio), so ask the transport too.
        if self._tls_protocol is not None:
            return True
        return self.transport is not None and (
            self.transport.get_extra_info("ssl_object") is not None
        )

    async def _handle_client(self) -> None:
        self._counted = self._owner._session_opened(self)
        if self._counted:
            scripted = self._owner.script.next_connect()
            if scripted is not None:
                # Reply instead of the greeting, then hang up: "421 too many connections".
                await self.push(scripted)
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.close()
                return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd may call this twice (after a failed STARTTLS handshake).
        if self._counted:
            self._counted = False
            self._owner._session_closed(self)
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        final = text[:3].isdigit() and text[3:4] in ("", " ")
        # Record final lines only (not "250-" continuations of a multiline reply), and
        # before sending: once the client has the reply, a test may already look.
        if self._counted and final:
            self._owner._record_command(self._command, int(text[:3]))
        await super().push(status)
        if final and text.startswith("421") and self.transport is not None:
            # RFC 5321: 421 means the server closes the session (scripted or not).
            self.transport.close()


class _Handler:
    def __init__(self, owner: ScriptedSMTPServer) -> None:
        self._owner = owner

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client refusing our certificate: expected in tests, not worth a traceback.
            _log.debug("TLS handshake failed: %r", error.__cause__)
        else:
            _log.warning("SMTP session error", exc_info=error)
        return f"500 Error: ({error.__class__.__name__}) {error}"

    async def handle_EHLO(
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With this hook present aiosmtpd leaves setting host_name to us.
        session.host_name = hostname
        if self._owner.auth is None:
            # aiosmtpd always advertises AUTH; a server without accounts shouldn't.
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return responses

    async def handle_MAIL(
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Enforced here rather than with aiosmtpd's auth_required: that one warns
        # whenever AUTH is allowed without TLS (our "none" and "implicit" modes).
        if self._owner.auth is not None and not session.authenticated:
            return AUTH_REQUIRED_REPLY
        reply = self._owner.script.next_mail()
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._owner.script.next_rcpt(address)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        reply, drop, hang_s = self._owner.script.next_data()
        data = envelope.original_content or b""
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            message=email.message_from_bytes(data, policy=email.policy.default),
            tls=server.uses_tls,
            auth_user=session.auth_data if isinstance(session.auth_data, str) else None,
            peer=session.peer,
            mail_options=tuple(envelope.mail_options),
        )
        if drop:
            self._owner._record_dropped(received)
            if server.transport is not None:
                server.transport.close()
            # Never reply: closing the transport cancels this session's task.
            await asyncio.Event().wait()
        if hang_s:
            # If the client gives up meanwhile, its close cancels this sleep and the
            # message is not recorded (it was never acknowledged).
            await asyncio.sleep(hang_s)
        if reply.startswith("2"):
            self._owner._record(received)
        return reply


class _Controller(Controller):
    def __init__(self, owner: ScriptedSMTPServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self._owner = owner

    def factory(self) -> SMTP:
        return _ScriptedSMTP(self._owner, self.handler, loop=self.loop, **self._owner._smtp_kwargs)


class _DropDeprecatedLoginData(logging.Filter):
    # aiosmtpd logs a deprecation warning on every successful AUTH (it sets the
    # legacy Session.login_data itself); noise in test output and demos.
    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


# -- the server ------------------------------------------------------------------------


class ScriptedSMTPServer:
    """A scripted, recording SMTP server on loopback (aiosmtpd in a background thread).

    ``tls``: ``"starttls"`` (offers STARTTLS; AUTH only after it), ``"implicit"`` (TLS
    from the first byte) or ``"none"``. ``auth``: username -> password; when set, MAIL
    needs a successful AUTH PLAIN/LOGIN first (``530 5.7.0 Authentication required``;
    bad credentials get ``535 5.7.8 Authentication credentials invalid``). The dict is
    read at each AUTH, so a test may change it while the server runs.

    The port is chosen once (a free one unless given) and kept across `stop`/`start`.
    """

    def __init__(
        self,
        *,
        tls: TlsOption = "none",
        require_starttls: bool = False,
        auth: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        certs: TestCA | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        server_hostname: str = "localhost",
        ready_timeout: float = 5.0,
        session_timeout_s: float = 60.0,
    ) -> None:
        if tls not in ("starttls", "implicit", "none"):
            raise ValueError(f"tls must be 'starttls', 'implicit' or 'none', not {tls!r}")
        if tls != "none" and ssl_context is None:
            if certs is None:
                raise ValueError("a TLS server needs ssl_context or certs")
            ssl_context = certs.server_context()
        self.tls: TlsOption = tls
        self.require_starttls = require_starttls
        self.auth = auth
        self.ssl_context = ssl_context
        self.host = host
        self.port = port or _free_port(host)
        self.server_hostname = server_hostname
        self.ready_timeout = ready_timeout
        self.session_timeout_s = session_timeout_s
        self.script = Script()

        self._lock = threading.Lock()
        self._controller: _Controller | None = None
        self._accepting = False
        self._live: set[_ScriptedSMTP] = set()
        self._messages: list[Received] = []
        self._dropped: list[Received] = []
        self._commands: list[tuple[str, int]] = []
        self._opened = 0
        self._peak = 0

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> ScriptedSMTPServer:
        if self._controller is not None:
            raise RuntimeError("server already running")
        logging.getLogger("mail.log").addFilter(_LOGIN_DATA_FILTER)
        controller = _Controller(
            self,
            hostname=self.host,
            port=self.port,
            ready_timeout=self.ready_timeout,
            # Implicit TLS: asyncio wraps each connection before aiosmtpd sees it.
            ssl_context=self.ssl_context if self.tls == "implicit" else None,
            server_hostname=self.server_hostname,
        )
        # Controller.start() opens a connection itself to check the server is up;
        # that one must neither count nor consume a scripted connect reply.
        self._accepting = False
        controller.start()
        self._controller = controller
        self._accepting = True
        return self

    def stop(self) -> None:
        controller = self._controller
        if controller is None:
            return
        self._accepting = False
        self.close_connections()
        controller.stop()
        self._controller = None

    def __enter__(self) -> ScriptedSMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def close_connections(self, *, abort: bool = False, timeout: float = 2.0) -> None:
        """Close every open session from the server side, as an idle timeout would."""
        controller = self._controller
        if controller is None:
            return
        with self._lock:
            sessions = list(self._live)

        def close_all() -> None:
            for session in sessions:
                transport = session.transport
                if isinstance(transport, asyncio.Transport) and abort:
                    transport.abort()
                elif transport is not None:
                    transport.close()
                # asyncio's graceful TLS close waits for the client's close_notify,
                # which an idle client never sends; close the TCP connection
                # underneath too (after STARTTLS aiosmtpd keeps it; with implicit TLS
                # asyncio's SSL protocol does), so the client sees EOF now, as with
                # a real server's idle timeout.
                tcp = session._original_transport or getattr(
                    getattr(transport, "_ssl_protocol", None), "_transport", None
                )
                if tcp is not None:
                    tcp.close()

        controller.loop.call_soon_threadsafe(close_all)
        self.wait_for(lambda: not any(s in self._live for s in sessions), timeout)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Poll ``condition`` until true or ``timeout``; returns its last value."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                return condition()
            time.sleep(0.01)
        return True

    # -- records ----------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        """Messages received and acknowledged with a 2xx, in order."""
        with self._lock:
            return list(self._messages)

    @property
    def dropped_messages(self) -> list[Received]:
        """Messages received in full but never acknowledged (``drop_after_data``)."""
        with self._lock:
            return list(self._dropped)

    @property
    def commands(self) -> list[tuple[str, int]]:
        """(command, reply code) for each reply sent; ``CONNECT`` for the greeting."""
        with self._lock:
            return list(self._commands)

    def message_ids(self) -> list[str | None]:
        return [m.message_id for m in self.messages]

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._opened

    @property
    def current_connections(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def max_concurrent_connections(self) -> int:
        with self._lock:
            return self._peak

    def reset(self) -> None:
        """Forget records and counters (open sessions still count) and clear the script."""
        with self._lock:
            self._messages.clear()
            self._dropped.clear()
            self._commands.clear()
            self._opened = 0
            self._peak = len(self._live)
        self.script.clear()

    # -- called from the server thread --------------------------------------------------

    @property
    def _smtp_kwargs(self) -> dict[str, Any]:
        return {
            "hostname": self.server_hostname,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "timeout": self.session_timeout_s,
            "tls_context": self.ssl_context if self.tls == "starttls" else None,
            "require_starttls": self.require_starttls and self.tls == "starttls",
            "auth_required": False,  # enforced in handle_MAIL
            # aiosmtpd counts only STARTTLS as TLS, so with implicit TLS it would
            # refuse AUTH ("538 Encryption required") on an encrypted connection.
            "auth_require_tls": self.tls == "starttls",
            "authenticator": self._authenticate,
        }

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        accounts = self.auth
        if accounts is None or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if user in accounts and accounts[user] == password:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)  # -> 535 5.7.8

    def _session_opened(self, session: _ScriptedSMTP) -> bool:
        with self._lock:
            if not self._accepting:
                return False
            self._live.add(session)
            self._opened += 1
            self._peak = max(self._peak, len(self._live))
            return True

    def _session_closed(self, session: _ScriptedSMTP) -> None:
        with self._lock:
            self._live.discard(session)

    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)

    def _record_dropped(self, received: Received) -> None:
        with self._lock:
            self._dropped.append(received)

    def _record_command(self, command: str, code: int) -> None:
        with self._lock:
            self._commands.append((command, code))


_LOGIN_DATA_FILTER = _DropDeprecatedLoginData()


def _free_port(host: str) -> int:
    # aiosmtpd's Controller connects to its own port to check it's up, so it can't
    # bind port 0: pick a free port first.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
