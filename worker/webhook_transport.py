"""An HTTP client that connects only to addresses it has checked: no DNS rebinding.

`Poster.guard` resolves a webhook's host and refuses private addresses before a POST,
but the HTTP library resolves the name again when it connects, and a hostile DNS server
can answer with a public address the first time and 127.0.0.1 the second. This client's
network backend does the one resolution itself, checks every address it got, and
connects to a checked one, so the address checked is the address used. TLS still
verifies the certificate against the URL's host name (httpcore takes the SNI and the
name to check from the URL, not from the address it connects to). A kept-alive
connection was checked when it was opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

#: resolve(host, port) -> the addresses the host resolves to.
Resolve = Callable[[str, int], list[str]]
#: Why an address may not be connected to, or None.
Check = Callable[[str], str | None]


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's own sync backend, connecting only to addresses that pass ``check``."""

    def __init__(self, resolver: Resolve, check: Check) -> None:
        self.resolver = resolver
        self.check = check
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self.resolver(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"{host} does not resolve ({exc})") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            why = self.check(address)
            if why:
                raise httpcore.ConnectError(
                    f"refused: {host} resolves to {address} ({why}) at connect time; webhooks "
                    "go only to public addresses unless OUTBOX_EVENTS_ALLOW_PRIVATE=1"
                )
        failure: Exception | None = None
        for address in addresses:  # each one checked above; the first that answers
            try:
                return self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks do not go to unix sockets")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def guarded_client(*, timeout: float, resolver: Resolve, check: Check) -> httpx.Client:
    """An httpx client whose every new connection goes through `GuardedBackend`."""
    transport = httpx.HTTPTransport()
    # httpx's transport takes no network backend; its pool is httpcore's, which does.
    pool: Any = transport._pool
    pool._network_backend = GuardedBackend(resolver, check)
    return httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)


__all__ = ["GuardedBackend", "guarded_client"]
