"""A real relay for integration tests: a private Debian Postfix instance on loopback.

`PostfixRelay` writes its own main.cf/master.cf into a fresh directory, starts it with
``postfix -c DIR start`` (no postmulti, nothing of /etc/postfix is used or changed) and
stops it with ``postfix -c DIR stop``. It listens on a free 127.0.0.1 port and is set up
the way an account's own relay usually is:

- STARTTLS required (``smtpd_tls_security_level = encrypt``), with a server certificate
  signed by a CA the test made: the account must trust that CA (``ca_pem``);
- SASL AUTH (Cyrus, a private sasldb written with ``saslpasswd2``), offered only after
  STARTTLS and required for relaying;
- a known-recipient list for its one relay domain: others get Postfix's own
  ``550 5.1.1 ... User unknown in relay recipient table``;
- a small ``message_size_limit``: bigger mail is read in full, then refused at the end
  of DATA with ``552 5.3.4 Error: message file too big``;
- greylisting by a real postgrey (``check_policy_service``, its own port, database and
  a delay of seconds) for the recipients listed as greylisted: a restriction class, as
  Postfix's RESTRICTION_CLASS_README does "greylisting for some recipients only".

What Postfix accepts it relays to a local `ScriptedSMTPServer` sink (no TLS, no AUTH),
so a test sees what arrived there. Nothing leaves 127.0.0.1: other destinations and
local delivery are turned into errors.

The programs come from Debian's postfix, postgrey and sasl2-bin packages
(``scripts/install-system-deps.sh``). The `postfix_relay` fixture (one instance per test
session, registered in ``tests/conftest.py``) skips with `missing_programs`'s reason when
they are absent, and only then.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from standins.services import wait_until
from standins.smtp import Received, ScriptedSMTPServer, TestCA, make_test_ca

__all__ = [
    "RELAY_DOMAIN",
    "RELAY_GREYLISTED",
    "RELAY_KNOWN",
    "RELAY_PASSWORD",
    "RELAY_SIZE_LIMIT",
    "RELAY_USER",
    "PostfixRelay",
    "missing_programs",
    "postfix_relay",
]

#: The one domain the relay accepts mail for; its known users are `PostfixRelay.known`.
RELAY_DOMAIN = "example.com"
#: The relay's name in its greeting, Received headers and SASL realm.
RELAY_HOSTNAME = "relay.outbox.test"
#: The SASL account of the `postfix_relay` fixture.
RELAY_USER = "mailer"
RELAY_PASSWORD = "s3cret"
#: Local parts of `RELAY_DOMAIN` the `postfix_relay` fixture knows; of them, "grey" is
#: greylisted. Tests share one instance per session: each takes its own addresses.
RELAY_KNOWN = ("bob", "carol", "erin", "frank", "big", "grey")
RELAY_GREYLISTED = ("grey",)
#: Its message_size_limit (bytes).
RELAY_SIZE_LIMIT = 64 * 1024

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
#: Program -> the Debian package that ships it (for the skip reason).
_PROGRAMS = {
    "postfix": "postfix",
    "postgrey": "postgrey",
    "saslpasswd2": "sasl2-bin",
}
#: The users the Debian packages create: Postfix's daemons and postgrey drop to them.
_USERS = {"postfix": "postfix", "postgrey": "postgrey"}


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(_SBIN))


def missing_programs() -> str | None:
    """Why a private Postfix cannot run here (a sentence), or None when it can."""
    missing = sorted({pkg for prog, pkg in _PROGRAMS.items() if _which(prog) is None})
    for user, pkg in _USERS.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append(pkg)
    if missing:
        return (
            f"a real Postfix relay needs the Debian packages {', '.join(sorted(set(missing)))} "
            "(run scripts/install-system-deps.sh as root)"
        )
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (its daemons drop privileges)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PostfixRelay:
    """A private Postfix (and postgrey) on 127.0.0.1:`port`, relaying to `sink`.

    ``users``: SASL username -> password. ``known``: the local parts of `RELAY_DOMAIN`
    it accepts; ``greylisted``: those of them whose mail postgrey delays first by
    ``greylist_delay_s`` seconds. ``size_limit``: Postfix's ``message_size_limit`` in bytes.
    """

    def __init__(
        self,
        *,
        users: dict[str, str],
        known: Sequence[str],
        greylisted: Sequence[str] = (),
        size_limit: int = 64 * 1024,
        greylist_delay_s: int = 2,
        base: Path | None = None,
    ) -> None:
        self.users = dict(users)
        self.known = tuple(known)
        self.greylisted = tuple(greylisted)
        self.size_limit = size_limit
        self.greylist_delay_s = greylist_delay_s
        # Not pytest's tmp_path: its parents are mode 0700, and Postfix's daemons (user
        # postfix) must reach their queue directory.
        self.base = base or Path(tempfile.mkdtemp(prefix="outbox-postfix-"))
        self.base.chmod(0o755)
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.log_path = self.base / "postfix.log"
        self.postgrey_log_path = self.base / "postgrey.log"
        self.port = _free_port()
        self.policy_port = _free_port()
        self.ca: TestCA = make_test_ca(self.base / "tls")
        self.sink = ScriptedSMTPServer(tls="none")
        self._postgrey: subprocess.Popen[bytes] | None = None
        self._postgrey_log: BinaryIO | None = None
        self._started = False

    # -- addresses ----------------------------------------------------------------------

    @staticmethod
    def address(local_part: str) -> str:
        return f"{local_part}@{RELAY_DOMAIN}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> PostfixRelay:
        """Start the sink, postgrey and Postfix; return once both daemons listen."""
        self.sink.start()
        self._write_config()
        # postgrey (Perl) takes about two seconds to load: start Postfix meanwhile.
        self._start_postgrey()
        self._postfix("start")
        self._started = True
        wait_until(
            lambda: _port_open(self.port),
            timeout=timeout,
            message=f"Postfix to listen on 127.0.0.1:{self.port}\n{self.log_tail()}",
        )
        wait_until(
            lambda: self._postgrey_listening(),
            timeout=timeout,
            message=f"postgrey to listen on 127.0.0.1:{self.policy_port}",
        )
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            master = self._master_pid()
            stopped = self._postfix("stop", check=False)
            # `postfix stop` only signals the master: wait for it, or end it ourselves.
            if master is not None:
                try:
                    if stopped.returncode != 0:
                        raise TimeoutError
                    wait_until(lambda: not _alive(master), timeout=10, message="Postfix to stop")
                except TimeoutError:
                    self._kill_master(master)
        if self._postgrey is not None:
            self._postgrey.terminate()
            try:
                self._postgrey.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._postgrey.kill()
                self._postgrey.wait(timeout=10)
            self._postgrey = None
        if self._postgrey_log is not None:
            self._postgrey_log.close()
            self._postgrey_log = None
        self.sink.stop()

    def cleanup(self) -> None:
        """Stop, then remove the instance's directory (configuration, queue, logs)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- what arrived ---------------------------------------------------------------------

    def delivered(self, message_id: str) -> list[Received]:
        """What the relay passed on to the sink for the message with this Message-ID."""
        return [m for m in self.sink.messages if m.message_id == message_id]

    def wait_delivered(
        self, message_id: str, *, copies: int = 1, timeout: float = 15.0
    ) -> list[Received]:
        """Wait until the relay has passed on ``copies`` copies of the message."""
        wait_until(
            lambda: len(self.delivered(message_id)) >= copies,
            timeout=timeout,
            message=f"Postfix to relay {message_id} to the sink\n{self.log_tail()}",
        )
        return self.delivered(message_id)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no Postfix log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- configuration --------------------------------------------------------------------

    def _write_config(self) -> None:
        etc = self.config_dir
        etc.mkdir(parents=True)
        # `postfix start` creates what is missing inside; the tops must exist, the queue
        # owned by root (Postfix checks), the data directory by Postfix's own user.
        self.queue_dir.mkdir(mode=0o755)
        self.data_dir.mkdir(mode=0o700)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        (etc / "main.cf").write_text(self._main_cf())
        (etc / "master.cf").write_text(self._master_cf())
        (etc / "relay_recipients").write_text(
            "".join(f"{self.address(user)} OK\n" for user in self.known)
        )
        (etc / "greylisted").write_text(
            "".join(f"{self.address(user)} greylisting\n" for user in self.greylisted)
        )

        # SASL: Cyrus reads <smtpd_sasl_path>.conf from cyrus_sasl_config_path (Debian's
        # Postfix: from $config_directory/sasl); smtpd (user postfix, no chroot) opens
        # the sasldb at each AUTH.
        sasl = etc / "sasl"
        sasl.mkdir()
        sasldb = sasl / "sasldb2"
        (sasl / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            f"sasldb_path: {sasldb}\n"
            "mech_list: PLAIN LOGIN\n"
        )
        saslpasswd2 = _which("saslpasswd2")
        assert saslpasswd2 is not None
        for user, password in self.users.items():
            # The realm is the one smtpd_sasl_local_domain gives plain usernames.
            subprocess.run(
                [saslpasswd2, "-p", "-c", "-f", str(sasldb), "-u", RELAY_HOSTNAME, user],
                input=password.encode(),
                check=True,
                capture_output=True,
                timeout=30,
            )
        # Root-owned, as Postfix wants its configuration; smtpd (group postfix) reads it.
        sasldb.chmod(0o640)
        os.chown(sasldb, 0, postfix_user.pw_gid)

    def _main_cf(self) -> str:
        etc = self.config_dir
        return f"""\
# A private Postfix instance for Outbox's integration tests (tests/support/postfix.py).
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.log_path}
maillog_file_prefixes = {self.base}
myhostname = {RELAY_HOSTNAME}
mydomain = outbox.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.1/32
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
biff = no
append_dot_mydomain = no
smtputf8_enable = no
alias_maps =
alias_database =

# The one domain it relays for, to the sink; unknown users are refused at RCPT.
relay_domains = {RELAY_DOMAIN}
relay_recipient_maps = texthash:{etc}/relay_recipients
relay_transport = relay:[127.0.0.1]:{self.sink.port}
# Nothing else leaves this machine, nor goes to a local mailbox.
default_transport = error:this test relay delivers only to {RELAY_DOMAIN}
local_transport = error:local delivery is disabled
smtp_tls_security_level = none
smtp_dns_support_level = disabled

# STARTTLS is required, with a certificate from the test's own CA (its key is root's,
# mode 0600: smtpd reads it before dropping privileges).
smtpd_tls_security_level = encrypt
smtpd_tls_cert_file = {self.ca.cert_path}
smtpd_tls_key_file = {self.ca.key_path}
smtpd_tls_received_header = yes
smtpd_tls_session_cache_database =

# SASL AUTH (Cyrus, sasldb), only over TLS, and needed to relay.
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {etc}/sasl
smtpd_sasl_local_domain = $myhostname
smtpd_sasl_security_options = noanonymous
smtpd_tls_auth_only = yes
smtpd_sasl_authenticated_header = yes
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions =
    reject_unlisted_recipient,
    check_recipient_access texthash:{etc}/greylisted,
    permit

# Greylisting, by postgrey, for the recipients the map above names.
smtpd_restriction_classes = greylisting
greylisting = check_policy_service inet:127.0.0.1:{self.policy_port}

message_size_limit = {self.size_limit}
mailbox_size_limit = 0

# Answer at once: no error sleeps, no waiting for DNS.
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = no
"""

    def _master_cf(self) -> str:
        # chroot "n" everywhere: smtpd must read the sasldb, and nothing needs copying
        # into a jail. The listener is the instance's own port, nothing on port 25.
        services = [
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "".join(f"{line}\n" for line in services)

    # -- processes ------------------------------------------------------------------------

    def _postfix(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        postfix = _which("postfix")
        assert postfix is not None
        done = subprocess.run(
            [postfix, "-c", str(self.config_dir), command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"postfix {command} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                f"{self.log_tail()}"
            )
        return done

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _kill_master(self, pid: int) -> None:
        """`postfix stop` did not end this instance's master: SIGTERM, then SIGKILL."""
        try:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not _alive(pid), timeout=10, message=f"Postfix master {pid} to end")
        except ProcessLookupError:
            return
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)

    def _start_postgrey(self) -> None:
        postgrey = _which("postgrey")
        assert postgrey is not None
        dbdir = self.base / "postgrey"
        dbdir.mkdir()
        owner = pwd.getpwnam("postgrey")
        os.chown(dbdir, owner.pw_uid, owner.pw_gid)
        empty = self.base / "postgrey-whitelist"
        empty.write_text("")
        self._postgrey_log = open(self.postgrey_log_path, "ab")  # noqa: SIM115 - closed in stop()
        # In the foreground (no --daemonize): it logs to our file, and stop() ends it.
        self._postgrey = subprocess.Popen(
            [
                postgrey,
                f"--inet=127.0.0.1:{self.policy_port}",
                f"--dbdir={dbdir}",
                f"--delay={self.greylist_delay_s}",
                # Not the system's lists, and no whitelisting of our own 127.0.0.1 after
                # a few passed mails: every greylisted recipient is greylisted.
                f"--whitelist-clients={empty}",
                f"--whitelist-recipients={empty}",
                "--auto-whitelist-clients=0",
                f"--hostname={RELAY_HOSTNAME}",
            ],
            stdout=self._postgrey_log,
            stderr=subprocess.STDOUT,
        )

    def _postgrey_listening(self) -> bool:
        assert self._postgrey is not None
        if self._postgrey.poll() is not None:
            raise RuntimeError(
                f"postgrey exited early:\n{self.postgrey_log_path.read_text(errors='replace')}"
            )
        return _port_open(self.policy_port)


@pytest.fixture(scope="session")
def postfix_relay() -> Iterator[PostfixRelay]:
    """A private Postfix with STARTTLS (``relay.ca``), AUTH `RELAY_USER`/`RELAY_PASSWORD`,
    the `RELAY_KNOWN` users of `RELAY_DOMAIN`, greylisting of `RELAY_GREYLISTED` and a
    `RELAY_SIZE_LIMIT`; once per session. Skips when Debian's packages are missing."""
    reason = missing_programs()
    if reason:
        pytest.skip(reason)
    relay = PostfixRelay(
        users={RELAY_USER: RELAY_PASSWORD},
        known=RELAY_KNOWN,
        greylisted=RELAY_GREYLISTED,
        size_limit=RELAY_SIZE_LIMIT,
    )
    try:
        relay.start()
    except BaseException:
        relay.cleanup()
        raise
    yield relay
    relay.cleanup()
