"""A light SMTP sink for benchmarks: accepts everything, keeps only counts and timings.

    python -m bench.sink [--port 0] [--delay 0.05]

Runs aiosmtpd in its own process (so the sink never competes with the benchmark for a
GIL) on 127.0.0.1, no TLS, no AUTH. `--delay` makes it a slow relay: each message's DATA
reply comes that many seconds after the data arrived (each connection waits on its own,
as a real relay's queue-manager round trip would). Prints one line when ready:

    READY smtp=<port> control=<port>

The control port answers one line per connection: send ``STATS`` for a JSON object
(messages, connections, per-transaction timings) or ``RESET`` to zero the counters
(it answers with the stats before the reset).

Timings are taken inside the sink with `time.perf_counter`: a transaction is the span
from the MAIL command's arrival to the moment DATA's reply is pushed, i.e. the whole
MAIL/RCPT/DATA exchange minus the last half round trip, the same for every client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.connections = 0
        #: the most connections open at once since the reset (a relay's concurrency)
        self.max_open = OPEN[0]
        #: MAIL arrival -> DATA reply, seconds, one per message
        self.transactions: list[float] = []
        #: connection accepted -> first MAIL, seconds, one per connection that sent mail
        self.setups: list[float] = []

    def snapshot(self) -> dict[str, Any]:
        tx = self.transactions
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "connections": self.connections,
            "max_open_connections": self.max_open,
            "tx_median_ms": statistics.median(tx) * 1000 if tx else None,
            "tx_p90_ms": statistics.quantiles(tx, n=10)[-1] * 1000 if len(tx) >= 10 else None,
            "tx_mean_ms": statistics.fmean(tx) * 1000 if tx else None,
            "setup_median_ms": statistics.median(self.setups) * 1000 if self.setups else None,
        }


#: connections open right now (kept across resets)
OPEN = [0]
STATS = _Stats()


class _Handler:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        now = time.perf_counter()
        session.bench_mail_at = now  # type: ignore[attr-defined]
        connected = getattr(session, "bench_connected_at", None)
        if connected is not None:
            STATS.setups.append(now - connected)
            session.bench_connected_at = None  # type: ignore[attr-defined]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        STATS.messages += 1
        STATS.bytes += len(envelope.content or b"")
        started = getattr(session, "bench_mail_at", None)
        if started is not None:
            STATS.transactions.append(time.perf_counter() - started)
        return "250 2.0.0 OK queued"


class _CountingSMTP(SMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        STATS.connections += 1
        OPEN[0] += 1
        STATS.max_open = max(STATS.max_open, OPEN[0])
        self.session.bench_connected_at = time.perf_counter()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN[0] -= 1
        super().connection_lost(exc)


async def _control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = (await reader.readline()).decode().strip().upper()
        writer.write((json.dumps(STATS.snapshot()) + "\n").encode())
        if line == "RESET":
            STATS.reset()
        await writer.drain()
    finally:
        writer.close()


async def _serve(port: int, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    handler = _Handler(delay_s)
    server = await loop.create_server(
        # A fixed hostname: aiosmtpd would otherwise do a reverse DNS lookup per session.
        lambda: _CountingSMTP(handler, hostname="bench.sink", ident="bench-sink"),
        host="127.0.0.1",
        port=port,
    )
    control = await asyncio.start_server(_control, host="127.0.0.1", port=0)
    smtp_port = server.sockets[0].getsockname()[1]
    control_port = control.sockets[0].getsockname()[1]
    print(f"READY smtp={smtp_port} control={control_port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    control.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds before each DATA reply (a slow relay)"
    )
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.delay))


if __name__ == "__main__":
    main()
