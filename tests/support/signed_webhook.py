"""A real HTTPS-less webhook receiver on loopback that checks every Standard Webhooks
signature with its own code, written from the spec (not worker.webhook_signing), so a
wrong signer fails the tests. Answers from a script of statuses, then `status`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def spec_verify(secret: str, headers: dict[str, str], body: bytes, *, now: float) -> bool:
    """https://www.standardwebhooks.com, "Verifying webhook signatures"."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(now - int(stamp)) > 300:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for part in headers.get("webhook-signature", "").split():
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return True
    return False


class SignedReceiver:
    """Records each POST: headers, body, whether the signature of `secret` checked out."""

    def __init__(self, secret: str, *, status: int = 200, delay_s: float = 0.0) -> None:
        self.secret = secret
        #: A slow receiver: each answer takes this long (a kill lands mid-delivery).
        self.delay_s = delay_s
        self.status = status
        #: Statuses to answer first, one per POST, before `status`.
        self.script: list[int] = []
        self.posts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = spec_verify(receiver.secret, headers, body, now=time.time())
                if receiver.delay_s:
                    threading.Event().wait(receiver.delay_s)
                with receiver._lock:
                    answer = receiver.script.pop(0) if receiver.script else receiver.status
                    if not ok:
                        answer = 401
                    receiver.posts.append(
                        {
                            "headers": headers,
                            "body": json.loads(body or b"null") if ok else None,
                            "raw": body,
                            "verified": ok,
                            "answer": answer,
                            "answered_at": time.time(),
                        }
                    )
                self.send_response(answer)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/events"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SignedReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def accepted_events(self) -> list[dict[str, Any]]:
        """Events of the POSTs answered 2xx, in arrival order (duplicates kept)."""
        with self._lock:
            return [
                e
                for p in self.posts
                if 200 <= p["answer"] < 300 and p["body"]
                for e in p["body"].get("events", [])
            ]
