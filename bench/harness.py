"""What `bench.run` measures with: the processes it starts, their CPU and memory, and the
two helper processes it talks to (the SMTP sinks, the task counter).

Every process is started in its own process group and stopped, with its children, at the
end of the run, on an error or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
LOG_DIR = RESULTS_DIR / "logs"
PY = sys.executable

#: (phase, 1-minute load average when it started): printed with the results, because the
#: machine is shared and a busy neighbour lowers every rate.
LOADAVG: list[tuple[str, float]] = []


def log(msg: str) -> None:
    """A progress line; a line not indented starts a phase and notes the load average."""
    load = os.getloadavg()[0]
    if not msg.startswith(" "):
        LOADAVG.append((msg.split(":")[0], load))
    print(f"[{time.strftime('%H:%M:%S')} load {load:4.1f}] {msg}", flush=True)


class Processes:
    """Every process the benchmark starts, each in its own group; all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        if "stdout" not in kw:
            kw["stdout"] = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - closed on stop
            kw["stderr"] = subprocess.STDOUT
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True, **kw
        )
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children of a worker that outlived their parent (same group): make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=15.0)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [d for k in kids for d in descendants(k)]


def tree_rss_mb(pid: int) -> dict[str, Any]:
    kids = descendants(pid)
    main = rss_kb(pid)
    children = [rss_kb(k) for k in kids]
    return {
        "total_mb": round((main + sum(children)) / 1024, 1),
        "main_mb": round(main / 1024, 1),
        "children_mb": [round(c / 1024, 1) for c in children],
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy (all cores) and lost to steal (the
    hypervisor gave the time to another guest), from /proc/stat, since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class CpuMeter:
    """CPU used by groups of processes during a timed window, per message; and what the
    rest of the machine did meanwhile.

    Each group is a function listing its pids now; a process that appears during the
    window (a database connection opened lazily) counts from zero. This is what says
    where a message's cost goes: the worker, PostgreSQL, the SMTP sink, Redis, the caller.
    The machine's figures say how much of it other work took (other sessions' tests on a
    shared box, and steal on a virtual machine): the cores our processes did not get.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.before: dict[str, dict[int, float]] = {}
        self.machine: dict[str, float] = {}

    def start(self) -> None:
        self.before = {
            name: {pid: cpu_s(pid) for pid in pids()} for name, pids in self.groups.items()
        }
        self._machine_before = machine_cpu_s()
        self._started = time.monotonic()

    def used_s(self) -> dict[str, float]:
        """CPU seconds per group since `start`; also sets `machine` for the window."""
        used: dict[str, float] = {}
        for name, pids in self.groups.items():
            seen = self.before[name]
            now = {pid: cpu_s(pid) for pid in {*seen, *pids()}}
            used[name] = sum(now[pid] - seen.get(pid, 0.0) for pid in now)
        busy, steal = machine_cpu_s()
        window = max(1e-6, time.monotonic() - self._started)
        ours = sum(used.values())
        self.machine = {
            "window_s": round(window, 2),
            "cores": os.cpu_count() or 1,
            "ours_cores": round(ours / window, 2),
            "others_cores": round(max(0.0, busy - self._machine_before[0] - ours) / window, 2),
            "steal_cores": round((steal - self._machine_before[1]) / window, 2),
        }
        return used

    def per_message_ms(self, messages: int) -> dict[str, float]:
        used = self.used_s()
        out = {name: round(v / messages * 1000, 3) for name, v in used.items()}
        out["total"] = round(sum(used.values()) / messages * 1000, 3)
        return out


def _ask(port: int, command: str) -> dict[str, Any]:
    """One line to a helper's control port, one JSON line back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(json.loads(data))


def _ready_line(proc: subprocess.Popen[bytes], what: str) -> dict[str, str]:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        raise RuntimeError(f"{what} did not start: {line!r}")
    return dict(part.split("=") for part in line.split()[1:])


class Sink:
    """A `bench.sink` SMTP server in its own process; `delay_s`: a slow relay."""

    def __init__(self, procs: Processes, name: str = "sink", *, delay_s: float = 0.0) -> None:
        argv = [PY, "-m", "bench.sink"] + (["--delay", str(delay_s)] if delay_s else [])
        self.proc = procs.start(name, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        fields = _ready_line(self.proc, f"the SMTP sink {name}")
        self.port = int(fields["smtp"])
        self.control = int(fields["control"])
        self.delay_s = delay_s

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        return _ask(self.control, "RESET" if reset else "STATS")


class TaskCounter:
    """`bench.taskcount`: the Celery messages the worker took, by task name."""

    def __init__(self, procs: Processes, broker_url: str) -> None:
        self.proc = procs.start(
            "taskcount",
            [PY, "-m", "bench.taskcount", "--broker", broker_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.control = int(_ready_line(self.proc, "the task counter")["control"])
        self.broker_url = broker_url

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Send task events of our own until the counter sees one, then zero it."""
        from celery import Celery

        from standins.services import wait_until

        app = Celery("bench-probe", broker=self.broker_url, set_as_current=False)
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, enabled=True)

            def seen() -> bool:
                dispatcher.send("task-received", name="bench.probe", uuid="probe")
                return bool(self.stats()["received"].get("bench.probe"))

            wait_until(seen, timeout=timeout, interval=0.2, message="the task counter to listen")
            dispatcher.close()
        self.stats(reset=True)

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        return _ask(self.control, "RESET" if reset else "STATS")
