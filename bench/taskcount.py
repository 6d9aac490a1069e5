"""Counts the Celery messages a worker takes, by task name, from the worker's own events.

    python -m bench.taskcount --broker redis://127.0.0.1:6379/13

A worker started with `-E` (every Outbox worker is) sends a `task-received` event for each
message it takes off the broker; this process listens to them on the broker's event
exchange, in its own process so that listening costs the benchmark's processes nothing,
and answers on a control port like `bench.sink`: ``STATS`` for a JSON object
(``{"received": {task name: n}, "succeeded": {...}, "total": n, "last_at": t}``),
``RESET`` to zero the counts (answering with the counts before the reset).

Prints ``READY control=<port>`` once it listens. Whether it already receives is for the
caller to check (send an event and see it counted): a subscription on Redis takes effect
on the first poll.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import threading
import time
from collections import Counter
from typing import Any

from celery import Celery

_lock = threading.Lock()
_received: Counter[str] = Counter()
_succeeded: Counter[str] = Counter()
_last_at = [0.0]


def _snapshot() -> dict[str, Any]:
    return {
        "received": dict(_received),
        "succeeded": dict(_succeeded),
        "total": sum(_received.values()),
        "last_at": _last_at[0],
    }


class _Control(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline().decode().strip().upper()
        with _lock:
            answer = _snapshot()
            if line == "RESET":
                _received.clear()
                _succeeded.clear()
        self.wfile.write((json.dumps(answer) + "\n").encode())


def _on_received(event: dict[str, Any]) -> None:
    with _lock:
        _received[str(event.get("name"))] += 1
        _last_at[0] = time.time()


def _on_succeeded(event: dict[str, Any]) -> None:
    # task-succeeded carries no name; counted as a cross-check of the total only.
    with _lock:
        _succeeded["all"] += 1
        _last_at[0] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True)
    args = parser.parse_args()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Control)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY control={server.server_address[1]}", flush=True)

    app = Celery("bench-taskcount", broker=args.broker, set_as_current=False)
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(
            conn,
            handlers={
                "task-received": _on_received,
                "task-succeeded": _on_succeeded,
                "*": lambda event: None,
            },
        )
        receiver.capture(limit=None, timeout=None, wakeup=False)


if __name__ == "__main__":
    main()
