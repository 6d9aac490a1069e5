"""worker.webhook_transport: the address checked is the address connected to (no DNS
rebinding between the guard and the connect), against a real HTTP receiver on loopback."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.support.signed_webhook import SignedReceiver
from worker.webhook_transport import guarded_client
from worker.webhooks import Poster, forbidden_address

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"t" * 32).decode()


@pytest.fixture
def receiver():
    with SignedReceiver(SECRET) as r:
        yield r


def test_a_name_that_rebinds_to_loopback_after_the_guard_is_refused_at_connect(receiver):
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # public for the guard, then loopback

    def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    client = guarded_client(timeout=5, resolver=rebinding, check=forbidden_address)
    # The guard sees the public answer and lets the POST go; the connect sees loopback.
    poster = Poster(http=client, secrets=[SECRET], allow_private=False, resolver=rebinding)
    url = f"https://hooks.example.test:{receiver.port}/hooks/events"
    result = poster.post(url, b'{"events":[]}', webhook_id="msg_1")
    assert not result.ok
    assert "127.0.0.1 (loopback) at connect time" in (result.error or "")
    assert receiver.posts == []


def test_every_address_of_the_name_is_checked(receiver):
    client = guarded_client(
        timeout=5,
        resolver=lambda host, port: ["127.0.0.1", "10.1.2.3"],
        check=lambda a: "private" if a.startswith("10.") else None,
    )
    with pytest.raises(httpx.ConnectError, match=r"10\.1\.2\.3 \(private\)"):
        client.post(f"http://hooks.example.test:{receiver.port}/hooks/events", content=b"{}")
    assert receiver.posts == []


def test_the_connection_goes_to_the_checked_address_with_the_names_host_header(receiver):
    seen = []

    def resolver(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["127.0.0.1"]

    # A name no real DNS knows: only the pinned address can reach the receiver.
    client = guarded_client(timeout=5, resolver=resolver, check=lambda a: None)
    poster = Poster(http=client, secrets=[SECRET], allow_private=True)
    url = f"http://hooks.example.test:{receiver.port}/hooks/events"
    result = poster.post(url, b'{"events":[]}', webhook_id="msg_2")
    assert result.ok, result.error
    assert seen == ["hooks.example.test"]
    post = receiver.posts[0]
    assert post["verified"]
    assert post["headers"]["host"] == f"hooks.example.test:{receiver.port}"


def test_an_address_that_does_not_answer_is_skipped_for_the_next_one(receiver):
    client = guarded_client(
        timeout=5,
        resolver=lambda host, port: ["127.0.0.2", "127.0.0.1"],
        check=lambda a: None,
    )
    # 127.0.0.2 refuses the receiver's port (it listens on 127.0.0.1 only).
    result = Poster(http=client, secrets=[SECRET], allow_private=True).post(
        f"http://hooks.example.test:{receiver.port}/hooks/events", b"{}", webhook_id="msg_3"
    )
    assert result.ok, result.error
    assert len(receiver.posts) == 1


def test_a_name_that_does_not_resolve_is_a_connect_error_naming_it():
    def broken(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    client = guarded_client(timeout=5, resolver=broken, check=forbidden_address)
    with pytest.raises(httpx.ConnectError, match=r"nowhere\.example\.test does not resolve"):
        client.post("https://nowhere.example.test/hooks", content=b"{}")
