"""A drain's events reach the webhook right after it (the drain asks for a webhook run),
not at beat's next `outbox.deliver_webhooks`: a real worker, SMTP server and receivers."""

from __future__ import annotations

import base64
import time

import pytest

from standins.accounts import make_account
from standins.services import wait_until
from tests.support.signed_webhook import SignedReceiver
from worker.store.webhooks import set_account_webhook

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_a_drains_events_reach_the_webhook_within_seconds_not_at_the_next_beat(
    env, db, box, plain_smtp_server, start_worker
):
    with SignedReceiver(SECRET) as shared, SignedReceiver(SECRET) as own:
        env.values.update(
            {
                "OUTBOX_EVENTS_WEBHOOK": shared.url,
                "OUTBOX_EVENTS_SECRET": SECRET,
                "OUTBOX_EVENTS_ALLOW_PRIVATE": "1",
                # Beat posts once a minute: only the drains' own requests can be this fast.
                "OUTBOX_EVENTS_INTERVAL": "60",
            }
        )
        make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
        hooked = make_account(db, box, "hooked", port=plain_smtp_server.port, tls_mode="none")
        with db.session() as session:
            set_account_webhook(session, hooked, url=own.url, secret_encrypted=box.encrypt(SECRET))
        start_worker(beat=True)
        client = env.client(db)
        delays: dict[str, list[float]] = {"acme": [], "hooked": []}
        for n in range(3):
            for account, receiver in (("acme", shared), ("hooked", own)):
                asked = time.time()
                mid = client.enqueue(
                    account=account, to=["bob@x.example"], subject=f"m{n}", text="x"
                ).id

                def sent_posted(mid: int = mid, receiver: SignedReceiver = receiver) -> bool:
                    return any(
                        e["message_id"] == mid and e["type"] == "sent"
                        for e in receiver.accepted_events()
                    )

                wait_until(sent_posted, timeout=20, message=f"the sent event of {account}'s mail")
                answered = max(
                    p["answered_at"]
                    for p in receiver.posts
                    if any(e["message_id"] == mid for e in (p["body"] or {}).get("events", []))
                )
                delays[account].append(answered - asked)
        assert all(p["verified"] for p in shared.posts + own.posts)
        # Each account's events went to its own webhook only.
        assert {e["account"] for e in shared.accepted_events()} == {"acme"}
        assert {e["account"] for e in own.accepted_events()} == {"hooked"}
        # Enqueue, drain, record, request a run, post: seconds, where beat would take 60.
        assert max(delays["acme"] + delays["hooked"]) < 5.0, delays
