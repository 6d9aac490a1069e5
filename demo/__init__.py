"""`make demo`: Outbox's whole story, end to end, in about a minute and a half.

Everything runs on this machine, on the embedded defaults (a SQLite database and the
SQLAlchemy broker in a fresh temporary directory; ``./var`` is never touched):

- a scripted SMTP server for the account ``acme`` that answers per recipient the way
  real servers do: greylisting, a full mailbox, an unknown user, a healthy mailbox;
- a second SMTP server, requiring AUTH, for the account ``globex``, whose stored
  password is mistyped (``535 5.7.8``);
- a local stand-in for the backup provider (SendGrid's API);
- a real ``outbox worker --beat`` process, with the 24-hour retry window compressed
  to one minute.

The accounts are created with the ``outbox`` CLI, the emails with the Python client,
and the messages are watched in a live table until each one has ended (or a hard cap
passes). Then every process is stopped and each message's story is told. The exit
status is 0 only if every message ended the way its script says it must.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from standins.provider import ProviderStub
from standins.smtp import ScriptedSMTPServer
from worker.cli import tables
from worker.cli.tables import Column

REPO = Path(__file__).resolve().parents[1]

#: The 24-hour window, compressed to a minute (the rest scaled to match).
WINDOW_S = 60
COMPRESSED = {
    "OUTBOX_RETRY_WINDOW": str(WINDOW_S),
    "OUTBOX_RETRY_BASE": "2",
    "OUTBOX_RETRY_MAX": "8",
    "OUTBOX_SWEEP_INTERVAL": "2",
    "OUTBOX_WAKE_GRACE": "5",
    "OUTBOX_SMTP_TIMEOUT": "2",
    "OUTBOX_LEASE": "15",
    "OUTBOX_BACKUP_TIMEOUT": "5",
}
#: The demo gives up this long after it started, whatever is still pending.
CAP_S = 100.0
REFRESH_S = 0.5
#: Without a terminal (CI), a progress line this often instead of the live table.
PROGRESS_EVERY_S = 5.0
WORKER_START_TIMEOUT_S = 45.0
STOP_GRACE_S = 12.0

GREYLISTED = "451 4.7.1 Greylisted, try again later"
MAILBOX_FULL = "452 4.2.2 Mailbox full"
USER_UNKNOWN = "550 5.1.1 User unknown"

GLOBEX_USER = "globex"
GLOBEX_PASSWORD = "correct-horse-battery-staple"
#: What the account has stored: one letter short.
GLOBEX_TYPO = "correct-horse-battery-stapl"
BACKUP_FROM = "Outbox Relay <relay@outbox.example>"

FINAL = ("sent", "failed", "cancelled")


class DemoError(RuntimeError):
    """Setup failed: the message says where."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: stop everything and report."""


@dataclass(frozen=True)
class Scenario:
    """One email, what its recipient's server does with it, and how it must end."""

    account: str
    to: tuple[str, ...]
    subject: str
    #: The script, in a few words (shown as the story's heading).
    plot: str
    #: Scripted RCPT replies of the account's server, per recipient, in order.
    rcpt: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: How it must end: "Sent", "Sent via backup" or "Failed".
    expect: str = "Sent"
    #: Exactly this many SMTP attempts (None: any number).
    smtp_attempts: int | None = None
    #: Recipients the server must have refused for good.
    refused: tuple[str, ...] = ()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "acme",
        ("alice@example.org",),
        "Your order #1001 has shipped",
        "a healthy mailbox",
        expect="Sent",
        smtp_attempts=1,
    ),
    Scenario(
        "acme",
        ("bob@example.net",),
        "Welcome to Acme",
        "greylisted twice, then let through",
        rcpt={"bob@example.net": (GREYLISTED, GREYLISTED)},
        expect="Sent",
        smtp_attempts=3,
    ),
    Scenario(
        "acme",
        ("carol@example.com",),
        "Your invoice for March",
        "mailbox full three times, until carol makes room",
        rcpt={"carol@example.com": (MAILBOX_FULL,) * 3},
        expect="Sent",
        smtp_attempts=4,
    ),
    Scenario(
        "acme",
        ("dave@example.org",),
        "Reset your password",
        "an address that does not exist",
        rcpt={"dave@example.org": (USER_UNKNOWN,)},
        expect="Failed",
        smtp_attempts=1,
        refused=("dave@example.org",),
    ),
    Scenario(
        "acme",
        ("erin@example.com", "frank@example.com"),
        "Team lunch on Friday",
        "two recipients, one of them unknown",
        rcpt={"frank@example.com": (USER_UNKNOWN,)},
        expect="Sent",
        smtp_attempts=1,
        refused=("frank@example.com",),
    ),
    Scenario(
        "globex",
        ("grace@example.net",),
        "Invoice INV-2024-117",
        "the account's SMTP password is wrong",
        expect="Sent via backup",
    ),
    Scenario(
        "globex",
        ("heidi@example.org",),
        "Your weekly report",
        "same broken account, a second email",
        expect="Sent via backup",
    ),
)


# -- the worker process -----------------------------------------------------------------


class WorkerProcess:
    """``outbox worker --beat`` in its own session, its output in a log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> float:
        """Start it and wait until it is ready; returns how long that took."""
        began = time.monotonic()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--beat", "--concurrency", "2"],
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one
        )
        while " ready." not in self.log():
            if self.proc.poll() is not None:
                raise DemoError(f"the worker exited at start; see {self.log_path}")
            if time.monotonic() - began > WORKER_START_TIMEOUT_S:
                raise DemoError(
                    f"the worker was not ready after {WORKER_START_TIMEOUT_S:.0f}s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.1)
        return time.monotonic() - began

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> str:
        """SIGTERM (Celery's warm shutdown), then SIGKILL; says which it took.

        SIGTERM goes to the main process only: it stops its pool children itself. Sent
        to the whole group, it kills a child that may hold the pool's queue lock, and
        the main process then waits for that lock forever at exit.
        """
        how = "not running"
        if self.proc is not None and self.proc.poll() is None:
            how = "stopped (SIGTERM)"
            began = time.monotonic()
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=STOP_GRACE_S)
                how += f" in {time.monotonic() - began:.1f}s"
            except subprocess.TimeoutExpired:
                how = f"killed (still running {STOP_GRACE_S:.0f}s after SIGTERM)"
                self._kill_group()
                self.proc.wait(timeout=10)
        if self.proc is not None:
            self._kill_group()  # a pool child left behind, if any
        if self._log is not None:
            self._log.close()
            self._log = None
        return how

    def _kill_group(self) -> None:
        assert self.proc is not None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


# -- setup ------------------------------------------------------------------------------


def demo_env(var_dir: Path, stub: ProviderStub) -> dict[str, str]:
    """This process's environment, minus any OUTBOX_* of the caller, plus the demo's.

    OUTBOX_DATABASE_URL and OUTBOX_BROKER_URL stay unset: the embedded defaults under
    OUTBOX_VAR_DIR. The secret key is a throwaway one, gone with the directory.
    """
    from cryptography.fernet import Fernet

    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(COMPRESSED)
    env.update(
        {
            "OUTBOX_VAR_DIR": str(var_dir),
            "OUTBOX_SECRET_KEY": Fernet.generate_key().decode(),
            "OUTBOX_BACKUP_PROVIDER": stub.provider,
            "OUTBOX_BACKUP_API_KEY": stub.api_key,
            "OUTBOX_BACKUP_API_URL": stub.base_url,
            "OUTBOX_BACKUP_FROM": BACKUP_FROM,
        }
    )
    return env


def use_env(env: Mapping[str, str]) -> None:
    """Make this process see the demo's OUTBOX_* too.

    Importing `config` builds the settings from os.environ (the Celery app does it at
    import), so this must happen before anything of Outbox is imported here.
    """
    for key in [k for k in os.environ if k.startswith("OUTBOX_")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("OUTBOX_")})


def outbox_cli(
    env: Mapping[str, str], out: Printer, setup_log: TextIO, args: list[str], stdin: str = ""
) -> Any:
    """Run ``outbox ARGS --json`` and return its JSON answer."""
    shown = " ".join(shlex.quote(a) for a in args)
    out.say(f"  $ outbox {shown}" + ("   # password on stdin" if stdin else ""))
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args, "--json"],
        env=dict(env),
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    setup_log.write(f"$ outbox {shown} --json\n{done.stdout}{done.stderr}\n")
    setup_log.flush()
    if done.returncode != 0:
        raise DemoError(f"`outbox {shown}` failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout)


# -- reading what Outbox recorded -------------------------------------------------------


def status_label(story: Mapping[str, Any]) -> str:
    if story["status"] == "sent":
        return "Sent via backup" if story["sent_via"] == "backup" else "Sent"
    return str(story["status"]).capitalize()


STYLES = {
    "Sent": "green",
    "Sent via backup": "cyan",
    "Failed": "red",
    "Pending": "yellow",
    "Cancelled": "magenta",
}


def seconds_since(moment: datetime, start: datetime) -> float:
    return (moment - start).total_seconds()


def explanation(story: Mapping[str, Any]) -> str:
    """The last word on the message, in plain words: what the table shows."""
    if story["status"] == "sent":
        if story["sent_via"] == "backup":
            failed = [a for a in story["attempts"] if a["channel"] == "smtp"]
            why = "The account's own server never took it"
            if failed:
                from worker.store.reports import explain_stored

                last = failed[-1]
                meaning = explain_stored(last["code"], last["enhanced"], last["server_text"])
                why = meaning["meaning"].rstrip(".")
            return f"{why}. After the window, the backup provider delivered it."
        refused = story["refused"]
        if refused:
            return "; ".join(f"{addr}: {why['meaning']}" for addr, why in refused.items())
        return ""
    why = story["why"]
    if why and why.get("meaning"):
        return str(why["meaning"])
    if story["being_sent"]:
        return "Being sent right now."
    incident = story["account_incident"]
    if incident:
        return f"Held back: {story['account']}'s server is failing ({incident['reason']})"
    if story["last_error"]:
        return str(story["last_error"])
    return "Waiting for its first attempt."


def next_try(story: Mapping[str, Any], now: datetime) -> str:
    if story["status"] != "pending":
        return ""
    if story["being_sent"]:
        return "now"
    seconds = (story["deadline"] - now).total_seconds()
    if seconds <= 0:
        return "backup"
    at = story["next_attempt_at"]
    if at is None:
        return ""
    wait = (at - now).total_seconds()
    return f"in {wait:.0f}s" if wait >= 0.5 else "due"


#: The live table: at 80 columns the account gives way and the why gets what is left.
MESSAGE_COLUMNS = (
    Column("id", justify="right"),
    Column("account", drop=1),
    Column("to", min_width=14, max_width=34),
    Column("status"),
    Column("tries", justify="right"),
    Column("next"),
    Column("why (last failure, in plain words)", short="why", min_width=28),
)


def smtp_tries(story: Mapping[str, Any]) -> int:
    """SMTP attempts, as the story counts them (a backup delivery is not a try)."""
    return sum(1 for a in story["attempts"] if a["channel"] == "smtp")


def message_table(
    stories: Mapping[int, Mapping[str, Any]],
    now: datetime,
    *,
    width: int,
    title: str | None = None,
) -> Table:
    """One line per message, whatever the terminal's width (worker.cli.tables)."""
    rows = []
    for mid, story in stories.items():
        label = status_label(story)
        rows.append(
            [
                str(mid),
                story["account"],
                ", ".join(story["to"]),
                Text(label, style=STYLES.get(label, "")),
                str(smtp_tries(story)),
                next_try(story, now),
                explanation(story),
            ]
        )
    table, _ = tables.build(title, MESSAGE_COLUMNS, rows, width=width, cut_note=None)
    return table


def incidents(stories: Mapping[int, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {s["account"]: s["account_incident"] for s in stories.values() if s["account_incident"]}


# -- output -----------------------------------------------------------------------------


class Printer:
    """The live table on a terminal; progress lines and status changes otherwise."""

    def __init__(self) -> None:
        interactive = sys.stdout.isatty()
        self.console = Console(highlight=False, width=None if interactive else 132)
        self.interactive = interactive and self.console.is_terminal
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str = "", style: str | None = None) -> None:
        self.console.print(text, style=style, soft_wrap=True)

    def stamp(self, text: str) -> None:
        self.say(f"[{self.elapsed():5.1f}s] {text}")


def live_view(
    stories: Mapping[int, Mapping[str, Any]],
    *,
    width: int,
    elapsed: float,
    window_ends: datetime,
    smtp_received: int,
    backup_received: int,
) -> Group:
    now = datetime.now(UTC)
    left = (window_ends - now).total_seconds()
    counts = Counter(status_label(s) for s in stories.values())
    header = Text.assemble(
        ("Outbox demo", "bold"),
        f"  ·  {elapsed:4.0f}s elapsed  ·  24-hour retry window compressed to {WINDOW_S}s: ",
        (f"ends in {left:.0f}s" if left > 0 else "over: the backup's turn", "bold"),
        "\n",
        "  ".join(f"{label} {n}" for label, n in sorted(counts.items())),
    )
    lines: list[RenderableType] = [header, message_table(stories, now, width=width)]
    for account, incident in incidents(stories).items():
        lines.append(
            Text.assemble(
                (f"incident open on {account}", "bold red"),
                f" for {(now - incident['opened_at']).total_seconds():.0f}s: "
                f"{incident['reason']} "
                f"(last reply: {incident['last_reply']})",
            )
        )
    lines.append(
        Text(
            f"acme's SMTP server has accepted {smtp_received} message(s); "
            f"the backup provider {backup_received}. Ctrl-C stops the demo.",
            style="dim",
        )
    )
    return Group(*lines)


def progress_line(stories: Mapping[int, Mapping[str, Any]], window_ends: datetime) -> str:
    counts = Counter(status_label(s) for s in stories.values())
    left = (window_ends - datetime.now(UTC)).total_seconds()
    order = ("Pending", "Sent", "Sent via backup", "Failed", "Cancelled")
    parts = [f"{counts[k]} {k}" for k in order if counts[k]]
    window = f"window ends in {left:.0f}s" if left > 0 else "window over"
    return " · ".join(parts) + f"  ({window})"


# -- the stories ------------------------------------------------------------------------


def _reply(attempt: Mapping[str, Any]) -> str:
    parts = [str(attempt["code"] or ""), attempt["enhanced"] or "", attempt["server_text"] or ""]
    return " ".join(p for p in parts if p).strip()


def tell(story: Mapping[str, Any]) -> list[str]:
    """A few lines saying what happened to one message, from what Outbox recorded."""
    from worker.store.reports import explain_stored

    start = story["created_at"]
    attempts = story["attempts"]
    smtp = [a for a in attempts if a["channel"] == "smtp"]
    backup = [a for a in attempts if a["channel"] == "backup"]
    lines: list[str] = []

    def at(moment: datetime | None) -> str:
        return "" if moment is None else f"+{seconds_since(moment, start):.0f}s"

    deferred = [a for a in smtp if a["outcome"] == "deferred"]
    replies = Counter(_reply(a) for a in deferred)
    for reply, n in replies.items():
        sample = next(a for a in deferred if _reply(a) == reply)
        meaning = explain_stored(sample["code"], sample["enhanced"], sample["server_text"])
        times = "once" if n == 1 else "twice" if n == 2 else f"{n} times"
        lines.append(f"deferred {times}: “{reply}” — {meaning['meaning']}")
    label = status_label(story)
    if label == "Sent":
        last = smtp[-1] if smtp else None
        if len(smtp) == 1:
            lines.append(
                f"accepted by {story['account']}'s server at once: sent on attempt 1 "
                f"({at(story['finished_at'])})"
            )
        else:
            lines.append(
                f"sent on attempt {len(smtp)} ({at(last['finished_at'] if last else None)}), "
                "each retry after a growing, jittered pause"
            )
        for address, why in story["refused"].items():
            lines.append(
                f"{address} refused for good: {why['meaning']} What to do: {why['advice']}"
            )
    elif label == "Failed":
        why = story["why"] or {}
        reply = _reply(smtp[-1]) if smtp else story["last_error"] or ""
        when = "at once, without retrying" if len(smtp) == 1 else f"after {len(smtp)} attempts"
        lines.append(f"“{reply}”: failed {when} — {why.get('meaning') or story['last_error']}")
        if why.get("advice"):
            lines.append(f"What to do: {why['advice']}")
    elif label == "Sent via backup":
        if smtp:
            lines.append(
                f"pending for the whole {WINDOW_S}s window: {len(smtp)} SMTP attempt(s), "
                f"the last at {at(smtp[-1]['started_at'])}"
            )
            idle = seconds_since(story["deadline"], smtp[-1]["started_at"])
            if idle > 10:
                lines.append(
                    f"for its last {idle:.0f}s it was held back: while the account's incident "
                    "is open only one message at a time tests the broken server (circuit "
                    "breaker), the others wait instead of hammering it"
                )
        else:
            lines.append(
                f"pending for the whole {WINDOW_S}s window without a single SMTP attempt: "
                "another message of the account was testing the broken server (circuit "
                "breaker), so this one was not fired at it too"
            )
        incident = story["account_incident"]
        if incident:
            lines.append(
                f"{story['account']}'s incident opened at {at(incident['opened_at'])}: "
                f"{incident['reason']}"
            )
        sent = next((a for a in backup if a["outcome"] == "sent"), None)
        if sent is not None:
            lines.append(
                f"then sent via the backup provider at {at(sent['finished_at'])} "
                f"(provider message id {sent['provider_message_id']})"
            )
        if deferred:
            advice = explain_stored(
                deferred[-1]["code"], deferred[-1]["enhanced"], deferred[-1]["server_text"]
            )["advice"]
            if advice:
                lines.append(f"What to do: {advice}")
    else:
        lines.append(f"still {label.lower()} at the end: {explanation(story)}")
    return lines


def headline(mid: int, scenario: Scenario, story: Mapping[str, Any], off: str | None) -> Text:
    """A message's line in the report: how it ended, in its status's colour, and whether
    that is what its script says. The outcome alone carries a colour: a mail that failed
    as scripted gets no green check beside it."""
    label = status_label(story)
    return Text.assemble(
        ("✗ " if off is not None else "", "bold red"),
        f"#{mid} {scenario.account} → {', '.join(story['to'])} ",
        (f"({scenario.plot})", "dim"),
        ": ",
        (label, STYLES.get(label, "")),
        (", as scripted", "dim") if off is None else (", NOT as scripted", "bold red"),
    )


def check(scenario: Scenario, story: Mapping[str, Any]) -> str | None:
    """What is off with how the message ended, or None if it ended as scripted."""
    label = status_label(story)
    if label != scenario.expect:
        return f"ended {label}, expected {scenario.expect}"
    smtp = [a for a in story["attempts"] if a["channel"] == "smtp"]
    if scenario.smtp_attempts is not None and len(smtp) != scenario.smtp_attempts:
        return f"took {len(smtp)} SMTP attempt(s), expected {scenario.smtp_attempts}"
    if set(story["refused"]) != set(scenario.refused):
        return f"refused recipients {sorted(story['refused'])}, expected {list(scenario.refused)}"
    return None


def outside_checks(
    acme_server: ScriptedSMTPServer, globex_server: ScriptedSMTPServer, stub: ProviderStub
) -> list[str]:
    """What the SMTP servers and the provider actually received, against the scripts."""
    problems = []
    by_smtp = Counter(r for m in acme_server.messages for r in m.rcpt_tos)
    want_smtp = Counter(
        r for s in SCENARIOS if s.expect == "Sent" for r in s.to if r not in s.refused
    )
    if by_smtp != want_smtp:
        problems.append(
            f"acme's SMTP server received mail for {dict(by_smtp)}, expected {dict(want_smtp)}"
        )
    if globex_server.messages:
        problems.append("globex's SMTP server accepted mail despite the wrong password")
    by_backup = Counter(r for d in stub.deliveries() for r in d.recipients())
    want_backup = Counter(r for s in SCENARIOS if s.expect == "Sent via backup" for r in s.to)
    if by_backup != want_backup:
        problems.append(
            f"the backup provider accepted mail for {dict(by_backup)}, expected {dict(want_backup)}"
        )
    return problems


def logged_notices(worker_log: Path) -> list[str]:
    """The incident notices the worker logged (accounts here have nowhere to send them)."""
    marker = "outbox.notify: notice for "
    try:
        lines = worker_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [
        line.split(marker, 1)[1].replace(" (no webhook or email configured)", "", 1)
        for line in lines
        if marker in line
    ]


# -- the demo ---------------------------------------------------------------------------


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    out = Printer()
    keep = bool(os.environ.get("OUTBOX_DEMO_KEEP"))  # read now: run() resets OUTBOX_*
    tmp = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    logging.basicConfig(
        filename=tmp / "demo.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    worker_log = tmp / "worker.log"
    ok = False
    try:
        with sigterm_interrupts():
            ok = run(out, tmp, worker_log)
    except DemoError as exc:
        out.say(f"demo setup failed: {exc}", style="bold red")
    except (Interrupted, KeyboardInterrupt):
        out.say("interrupted: everything was stopped.", style="bold red")
    if ok and not keep:
        shutil.rmtree(tmp, ignore_errors=True)
        out.say(
            f"Temporary files removed (OUTBOX_DEMO_KEEP=1 keeps them). Total {out.elapsed():.0f}s.",
            style="dim",
        )
    else:
        out.say(f"worker log: {worker_log}   (everything else: {tmp})")
    return 0 if ok else 1


def run(out: Printer, tmp: Path, worker_log: Path) -> bool:
    var_dir = tmp / "var"
    with ExitStack() as stack:
        # Two scripted SMTP servers on loopback, and the backup provider's stand-in.
        acme_server = stack.enter_context(ScriptedSMTPServer(tls="none"))
        globex_server = stack.enter_context(
            ScriptedSMTPServer(tls="none", auth={GLOBEX_USER: GLOBEX_PASSWORD})
        )
        stub = stack.enter_context(ProviderStub("sendgrid"))
        for scenario in SCENARIOS:
            if scenario.account == "acme":
                for address, replies in scenario.rcpt.items():
                    acme_server.script.rcpt[address] = list(replies)

        env = demo_env(var_dir, stub)
        use_env(env)
        out.say(
            f"Outbox demo: {len(SCENARIOS)} emails, two accounts, the 24-hour retry window "
            f"compressed to {WINDOW_S}s.",
            style="bold",
        )
        out.say(f"  embedded defaults in {var_dir}: SQLite database, SQLite broker")
        out.say(
            f"  acme's SMTP server    127.0.0.1:{acme_server.port}  no TLS, no AUTH; "
            "scripted per recipient"
        )
        out.say(
            f"  globex's SMTP server  127.0.0.1:{globex_server.port}  AUTH required; "
            "globex's stored password has a typo"
        )
        out.say(f"  backup provider       {stub.base_url}  (a local stand-in for SendGrid)")

        with open(tmp / "setup.log", "w") as setup_log:
            outbox_cli(
                env,
                out,
                setup_log,
                [
                    *("account", "set", "acme", "--host", "127.0.0.1"),
                    *("--port", str(acme_server.port), "--tls", "none"),
                    *("--from", "Acme Shop <shop@acme.example>"),
                ],
            )
            outbox_cli(
                env,
                out,
                setup_log,
                [
                    *("account", "set", "globex", "--host", "127.0.0.1"),
                    *("--port", str(globex_server.port), "--tls", "none"),
                    *("--from", "Globex Billing <billing@globex.example>"),
                    *("--username", GLOBEX_USER, "--password-stdin"),
                ],
                stdin=GLOBEX_TYPO + "\n",
            )

        out.say(f"  $ outbox worker --beat   # log: {worker_log}")
        worker = WorkerProcess(env, worker_log)
        stack.callback(lambda: out.say(f"worker {worker.stop()}.", style="dim"))
        took = worker.start()
        out.say(f"  worker ready after {took:.1f}s; enqueuing with the Python client:")

        from config.settings import Settings
        from worker.client import IntakeClient

        client = IntakeClient.from_settings(Settings.from_env(env))
        ids: dict[int, Scenario] = {}
        for scenario in SCENARIOS:
            accepted = client.enqueue(
                account=scenario.account,
                to=list(scenario.to),
                subject=scenario.subject,
                text=f"Hello,\n\n{scenario.subject}.\n\n-- sent by the Outbox demo\n",
            )
            ids[accepted.id] = scenario
            out.say(
                f"    #{accepted.id} {scenario.account} → {', '.join(scenario.to)}: {scenario.plot}"
            )
        stories, finished = watch(out, client.db, ids, worker, acme_server, stub)
        client.db.dispose()
        stack.close()  # the worker first (callbacks run last in, first out), then the servers

    return report(out, ids, stories, finished, acme_server, globex_server, stub, worker_log)


def snapshot(db: Any, ids: Mapping[int, Scenario]) -> dict[int, dict[str, Any]]:
    from worker.store.reports import message_story

    now = datetime.now(UTC)
    stories = {}
    with db.session() as session:
        for mid in ids:
            story = message_story(session, mid, now=now)
            if story is None:
                raise DemoError(f"message {mid} is gone from the database")
            stories[mid] = story
    return stories


def watch(
    out: Printer,
    db: Any,
    ids: Mapping[int, Scenario],
    worker: WorkerProcess,
    acme_server: ScriptedSMTPServer,
    stub: ProviderStub,
) -> tuple[dict[int, dict[str, Any]], str]:
    """Refresh until every message is final, the worker dies or the cap passes."""
    stories = snapshot(db, ids)
    window_ends = max(s["deadline"] for s in stories.values())
    seen: dict[int, tuple[str, int]] = {}
    seen_incidents: set[str] = set()
    last_progress = 0.0

    def view() -> Group:
        return live_view(
            stories,
            width=out.console.width,
            elapsed=out.elapsed(),
            window_ends=window_ends,
            smtp_received=len(acme_server.messages),
            backup_received=len(stub.deliveries()),
        )

    def events() -> None:
        # Without a terminal: one line per change of status, and per incident.
        for mid, story in stories.items():
            state = (status_label(story), smtp_tries(story))
            if seen.get(mid, ("Pending", 0))[0] != state[0]:
                out.stamp(
                    f"#{mid} {', '.join(story['to'])}: {state[0]} after {state[1]} "
                    f"SMTP attempt(s). {explanation(story)}".rstrip()
                )
            seen[mid] = state
        for account, incident in incidents(stories).items():
            if account not in seen_incidents:
                seen_incidents.add(account)
                out.stamp(f"incident opened on {account}: {incident['reason']}")

    finished = "all final"
    with ExitStack() as stack:
        live = None
        if out.interactive:
            live = stack.enter_context(
                Live(view(), console=out.console, auto_refresh=False, transient=True)
            )
        else:
            out.say("Watching (a line per change, progress every few seconds):")
        while True:
            if live is not None:
                live.update(view(), refresh=True)
            else:
                events()
                if out.elapsed() - last_progress >= PROGRESS_EVERY_S:
                    last_progress = out.elapsed()
                    out.stamp(progress_line(stories, window_ends))
            if all(s["status"] in FINAL for s in stories.values()):
                break
            if not worker.alive:
                finished = "the worker exited"
                break
            if out.elapsed() >= CAP_S:
                finished = f"the {CAP_S:.0f}s cap passed"
                break
            time.sleep(REFRESH_S)
            stories = snapshot(db, ids)
    return stories, finished


def report(
    out: Printer,
    ids: Mapping[int, Scenario],
    stories: Mapping[int, Mapping[str, Any]],
    finished: str,
    acme_server: ScriptedSMTPServer,
    globex_server: ScriptedSMTPServer,
    stub: ProviderStub,
    worker_log: Path,
) -> bool:
    out.say()
    out.console.print(
        message_table(
            stories,
            datetime.now(UTC),
            width=out.console.width,
            title=f"Final state ({finished})",
        )
    )
    out.say()
    out.say("What happened:", style="bold")
    problems: list[str] = []
    for mid, scenario in ids.items():
        story = stories[mid]
        off = check(scenario, story)
        out.console.print(headline(mid, scenario, story, off), soft_wrap=True)
        for line in tell(story):
            out.say(f"     {line}")
        if off is not None:
            problems.append(f"#{mid} ({scenario.plot}): {off}")
            out.say(f"     NOT AS SCRIPTED: {off}", style="bold red")
    notices = logged_notices(worker_log)
    if notices:
        out.say()
        out.say(
            "Notices to the accounts (one when the incident opened, one when the backup took "
            "over; not one per message). No webhook or email is configured here, so the "
            "worker logged them:"
        )
        for notice in notices:
            out.say(f"  - {notice}")
    problems += outside_checks(acme_server, globex_server, stub)
    out.say()
    out.say(
        f"Outside Outbox: acme's SMTP server accepted {len(acme_server.messages)} message(s), "
        f"globex's {len(globex_server.messages)}, the backup provider "
        f"{len(stub.deliveries())}."
    )
    if problems:
        out.say(f"The demo did not go as scripted ({finished}):", style="bold red")
        for problem in problems:
            out.say(f"  - {problem}", style="red")
        out.say(f"See the worker log: {worker_log}")
        return False
    out.say(
        f"Every message ended as its script says: each one reached its recipient or ended "
        f"with an honest reason, in {out.elapsed():.0f}s.",
        style="bold green",
    )
    return True
