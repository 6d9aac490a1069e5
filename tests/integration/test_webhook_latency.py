"""A drain's events reach the webhook right after it (the drain asks for a webhook run),
not at beat's next `outbox.deliver_webhooks`: a real worker, SMTP server and receiver."""

from __future__ import annotations

import base64
import time

import pytest

from standins.accounts import make_account
from standins.services import wait_until
from tests.support.signed_webhook import SignedReceiver

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize("own", [False, True], ids=["global webhook", "account's own"])
def test_a_drains_events_reach_the_webhook_within_seconds_not_at_the_next_beat(
    env, db, box, plain_smtp_server, start_worker, own
):
    with SignedReceiver(SECRET) as receiver:
        env.values.update(
            {
                "OUTBOX_EVENTS_SECRET": SECRET,
                "OUTBOX_EVENTS_ALLOW_PRIVATE": "1",
                # Beat posts once a minute: only the drains' own kicks can be this fast.
                "OUTBOX_EVENTS_INTERVAL": "60",
            }
        )
        if not own:
            env.values["OUTBOX_EVENTS_WEBHOOK"] = receiver.url
        account_id = make_account(db, box, "acme", port=plain_smtp_server.port, tls_mode="none")
        if own:
            from worker.store.webhooks import set_account_webhook

            with db.session() as session:
                set_account_webhook(
                    session, account_id, url=receiver.url, secret_encrypted=box.encrypt(SECRET)
                )
        start_worker(beat=True)
        client = env.client(db)
        delays = []
        for n in range(3):
            asked = time.time()
            mid = client.enqueue(account="acme", to=["bob@x.example"], subject=f"m{n}", text="x").id

            def sent_posted(mid: int = mid) -> bool:
                return any(
                    e["message_id"] == mid and e["type"] == "sent"
                    for e in receiver.accepted_events()
                )

            wait_until(sent_posted, timeout=20, message=f"the sent event of mail {n}")
            answered = max(
                p["answered_at"]
                for p in receiver.posts
                if any(e["message_id"] == mid for e in (p["body"] or {}).get("events", []))
            )
            delays.append(answered - asked)
        assert all(p["verified"] for p in receiver.posts)
        # Enqueue, drain, record, kick, post: seconds, where beat alone would take 60.
        assert max(delays) < 5.0, delays
