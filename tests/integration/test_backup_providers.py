"""The backup provider adapters against `ProviderStub`, a real HTTP server on loopback.

A test using `provider_stub` runs once per provider unless `only(...)` narrows it. The
stub's base URL is itself a base-URL override, so every send here also proves that the
override is honoured.
"""

from __future__ import annotations

import ast
import base64
import logging
import socket
import time
from contextlib import closing
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from standins.provider import ProviderStub
from worker.backup import (
    DEFAULT_BASE_URLS,
    EU_BASE_URLS,
    PROVIDERS,
    BackupOutcome,
    BackupProvider,
    BackupResult,
    backup_sender,
    make_provider,
)
from worker.message import Attachment, OutgoingEmail

if TYPE_CHECKING:
    from tests.support.fixtures_backup import AdapterFactory

pytest_plugins = ("tests.support.fixtures_backup",)

PDF = b"%PDF-1.7\r\n" + bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n%%EOF"
CSV = "name,amount\r\nÉlodie,12.50\r\n".encode()
MESSAGE_ID = "<0190c2d4-7e1f-7a3b-9c2d-5f6e7a8b9c0d@outbox.example>"
RELAY = "relay@outbox.example"


def full_email(**changes: object) -> OutgoingEmail:
    fields: dict[str, object] = {
        "message_id": MESSAGE_ID,
        "from_addr": "Acme Support <help@acme.test>",
        "to": ("Bob Example <bob@example.test>", "carol@example.test"),
        "cc": ("Dave <dave@example.test>",),
        "bcc": ("audit@acme.test",),
        "reply_to": "Billing <billing@acme.test>",
        "subject": "Your invoice №42",
        "text": "Hello Bob,\nyour invoice is attached.",
        "html": "<p>Hello Bob,<br>your invoice is attached.</p>",
        "headers": (("X-Account-Ref", "acct-7"), ("List-Unsubscribe", "<mailto:u@acme.test>")),
        "attachments": (
            Attachment("invoice-42.pdf", "application/pdf", PDF),
            Attachment("lines.csv", "text/csv", CSV),
        ),
    }
    fields.update(changes)
    return OutgoingEmail(**fields)  # type: ignore[arg-type]


def send(adapter: BackupProvider, email: OutgoingEmail | None = None) -> BackupResult:
    email = email or full_email()
    from_addr, reply_to = backup_sender(email, backup_from=RELAY, verified=False)
    return adapter.send(email, from_addr=from_addr, reply_to=reply_to)


def only(provider: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("provider_stub", [provider], indirect=True)


# --- a full message ----------------------------------------------------------------------


def test_full_email_is_sent_with_every_field(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    result = send(backup_adapter)

    assert result.outcome is BackupOutcome.SENT
    assert result.provider == provider_stub.provider
    assert result.http_status in (200, 202)
    [delivery] = provider_stub.deliveries()
    assert result.provider_message_id == delivery.provider_message_id is not None
    assert not result.alert_operator and not result.maybe_delivered

    mail = delivery.mail()
    assert mail.from_addr == ("Acme Support", RELAY)
    assert mail.reply_to == ("Billing", "billing@acme.test")
    assert mail.to == [("Bob Example", "bob@example.test"), ("", "carol@example.test")]
    assert mail.cc == [("Dave", "dave@example.test")]
    assert mail.bcc == [("", "audit@acme.test")]
    assert delivery.recipients() == [
        "bob@example.test",
        "carol@example.test",
        "dave@example.test",
        "audit@acme.test",
    ]
    assert mail.subject == "Your invoice №42"
    assert mail.text == "Hello Bob,\nyour invoice is attached."
    assert mail.html == "<p>Hello Bob,<br>your invoice is attached.</p>"
    assert delivery.message_id() == MESSAGE_ID
    assert mail.header("X-Account-Ref") == "acct-7"
    assert mail.header("List-Unsubscribe") == "<mailto:u@acme.test>"
    assert mail.attachments == [
        ("invoice-42.pdf", "application/pdf", PDF),
        ("lines.csv", "text/csv", CSV),
    ]


@only("sendgrid")
def test_sendgrid_request_shape(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    send(backup_adapter)

    [request] = provider_stub.requests
    assert (request.method, request.path) == ("POST", "/v3/mail/send")
    assert request.headers["authorization"] == f"Bearer {provider_stub.api_key}"
    assert request.headers["content-type"].startswith("application/json")
    body = request.json
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["from"] == {"email": RELAY, "name": "Acme Support"}
    assert body["reply_to"] == {"email": "billing@acme.test", "name": "Billing"}
    assert body["headers"]["Message-ID"] == MESSAGE_ID
    assert [a["disposition"] for a in body["attachments"]] == ["attachment", "attachment"]
    assert base64.b64decode(body["attachments"][0]["content"]) == PDF


@only("postmark")
def test_postmark_request_shape(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    send(backup_adapter)

    [request] = provider_stub.requests
    assert (request.method, request.path) == ("POST", "/email")
    assert request.headers["x-postmark-server-token"] == provider_stub.api_key
    assert request.headers["accept"] == "application/json"
    body = request.json
    assert body["To"] == "Bob Example <bob@example.test>, carol@example.test"
    assert body["From"] == f"Acme Support <{RELAY}>"
    assert body["MessageStream"] == "outbound"
    assert {"Name": "Message-ID", "Value": MESSAGE_ID} in body["Headers"]
    assert [a["Name"] for a in body["Attachments"]] == ["invoice-42.pdf", "lines.csv"]


@only("mailgun")
def test_mailgun_request_shape(provider_stub: ProviderStub, backup_adapter: BackupProvider) -> None:
    send(backup_adapter)

    [request] = provider_stub.requests
    assert (request.method, request.path) == (
        "POST",
        f"/v3/{provider_stub.mailgun_domain}/messages",
    )
    user, _, key = (
        base64.b64decode(request.headers["authorization"].split()[1]).decode().partition(":")
    )
    assert (user, key) == ("api", provider_stub.api_key)
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    form = request.form
    assert form is not None
    assert form["to"] == ["Bob Example <bob@example.test>", "carol@example.test"]  # one field each
    assert form["h:Message-Id"] == [MESSAGE_ID]
    assert form["h:Reply-To"] == ["Billing <billing@acme.test>"]
    assert form["h:X-Account-Ref"] == ["acct-7"]
    assert [(name, filename) for name, filename, _, _ in request.files] == [
        ("attachment", "invoice-42.pdf"),
        ("attachment", "lines.csv"),
    ]


@only("sendgrid")
def test_sendgrid_gets_each_address_once_across_to_cc_bcc(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    # SendGrid answers 400 for an address repeated across to/cc/bcc; SMTP does not care.
    email = full_email(
        cc=("BOB@example.test", "Dave <dave@example.test>"), bcc=("dave@example.test",)
    )

    result = send(backup_adapter, email)

    assert result.outcome is BackupOutcome.SENT, result.detail
    mail = provider_stub.deliveries()[0].mail()
    assert mail.recipients == ["bob@example.test", "carol@example.test", "dave@example.test"]


def test_message_without_body_is_still_accepted(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    result = send(backup_adapter, full_email(text=None, html=None, attachments=()))

    assert result.outcome is BackupOutcome.SENT, result.detail


def test_one_connection_is_reused_across_sends(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    first, second = send(backup_adapter), send(backup_adapter)

    assert first.outcome is second.outcome is BackupOutcome.SENT
    ports = {request.client_port for request in provider_stub.requests}
    assert len(ports) == 1, "each send opened a new connection"


# --- answers that are not a yes ----------------------------------------------------------


def test_wrong_key_fails_and_alerts_the_operator(
    provider_stub: ProviderStub, make_adapter: AdapterFactory
) -> None:
    adapter = make_adapter(api_key="not-the-key")
    result = send(adapter)

    assert result.outcome is BackupOutcome.FAILED
    assert result.http_status == 401
    assert result.alert_operator
    assert "OUTBOX_BACKUP_API_KEY" in result.explanation
    assert "API key" in result.explanation
    assert provider_stub.deliveries() == []


def test_provider_trouble_is_retried_then_sent(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [503]

    first = send(backup_adapter)
    second = send(backup_adapter)

    assert (first.outcome, first.http_status) == (BackupOutcome.RETRY, 503)
    assert not first.alert_operator
    assert "Service Unavailable" in first.detail  # read from the gateway's HTML page
    assert second.outcome is BackupOutcome.SENT
    assert len(provider_stub.requests) == 2
    assert len(provider_stub.deliveries()) == 1


def test_rate_limit_is_retried(provider_stub: ProviderStub, backup_adapter: BackupProvider) -> None:
    provider_stub.script = [429]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.RETRY, 429)
    assert "Retry-After: 1" in result.detail
    assert "rate-limiting" in result.explanation
    assert provider_stub.deliveries() == []


def test_timeout_is_retried_without_a_status(
    provider_stub: ProviderStub, make_adapter: AdapterFactory
) -> None:
    provider_stub.script = [("timeout", 2.0)]

    adapter = make_adapter(timeout_s=0.5)
    started = time.monotonic()
    result = send(adapter)
    elapsed = time.monotonic() - started

    assert result.outcome is BackupOutcome.RETRY
    assert result.http_status is None
    assert result.provider_message_id is None
    # The request went out whole: the provider may have taken it, the caller must know.
    assert result.maybe_delivered
    assert "0.5 s" in result.explanation
    assert elapsed < 1.5


@only("postmark")
def test_timed_out_send_may_still_be_delivered(
    provider_stub: ProviderStub, make_adapter: AdapterFactory
) -> None:
    # Why `maybe_delivered` exists: the provider finished after Outbox stopped waiting.
    provider_stub.script = [("timeout", 0.6)]

    result = send(make_adapter(timeout_s=0.2))

    assert (result.outcome, result.maybe_delivered) == (BackupOutcome.RETRY, True)
    provider_stub.wait_for_requests(1)
    assert len(provider_stub.deliveries()) == 1


def test_dropped_connection_is_retried(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = ["drop"]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.RETRY, None)
    assert result.maybe_delivered


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unreachable_provider_is_retried(provider: str) -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    adapter = make_provider(
        provider,
        api_key="k",
        base_url=f"http://127.0.0.1:{port}",
        mailgun_domain="mg.test",
        timeout_s=1,
    )
    with closing(adapter):
        result = send(adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.RETRY, None)
    assert not result.maybe_delivered
    assert "could not connect" in result.explanation


def test_unrecognisable_success_fails_and_alerts(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    # A 2xx without the provider's message id: most likely the URL points elsewhere.
    provider_stub.script = [(200, "<html><body>Welcome to nginx!</body></html>")]

    result = send(backup_adapter)

    assert result.outcome is BackupOutcome.FAILED
    assert result.alert_operator and result.maybe_delivered
    assert "OUTBOX_BACKUP_API_URL" in result.explanation


@only("postmark")
def test_postmark_inactive_recipient_fails(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [
        (
            422,
            {
                "ErrorCode": 406,
                "Message": "You tried to send to recipient(s) that have been marked as inactive.",
            },
        )
    ]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.FAILED, 422)
    assert result.detail.startswith("ErrorCode 406: ")
    assert "inactive recipient" in result.explanation
    assert not result.alert_operator  # the recipient's problem, not Outbox's setup


@only("postmark")
def test_postmark_invalid_request_fails_with_its_message(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [(422, {"ErrorCode": 300, "Message": "Invalid 'To' address."})]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.FAILED, 422)
    assert "Invalid 'To' address." in result.explanation
    assert not result.alert_operator


@only("postmark")
def test_postmark_unconfirmed_sender_signature_alerts(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [(422, {"ErrorCode": 400, "Message": "Sender signature not found."})]

    result = send(backup_adapter)

    assert result.outcome is BackupOutcome.FAILED
    assert result.alert_operator
    assert "OUTBOX_BACKUP_FROM" in result.explanation


@only("sendgrid")
def test_sendgrid_unverified_sender_alerts(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [403]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.FAILED, 403)
    assert result.alert_operator
    assert "verified Sender Identity" in result.detail
    assert "verified Sender Identity" in result.explanation
    assert "OUTBOX_BACKUP_FROM" in result.explanation


@only("sendgrid")
def test_sendgrid_too_large_fails_without_alert(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [413]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.FAILED, 413)
    assert "larger than SendGrid accepts" in result.explanation
    assert not result.alert_operator


@only("mailgun")
def test_mailgun_unknown_domain_points_at_the_region(make_adapter: AdapterFactory) -> None:
    adapter = make_adapter(mailgun_domain="mg.elsewhere.test")
    result = send(adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.FAILED, 404)
    assert result.detail == "Domain not found: mg.elsewhere.test"
    assert result.alert_operator
    assert "https://api.eu.mailgun.net" in result.explanation


@only("mailgun")
def test_mailgun_bad_request_fails_with_its_message(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    provider_stub.script = [(400, {"message": "'to' parameter is not a valid address."})]

    result = send(backup_adapter)

    assert (result.outcome, result.http_status) == (BackupOutcome.FAILED, 400)
    assert result.detail == "'to' parameter is not a valid address."
    assert not result.alert_operator


# --- the key stays secret ----------------------------------------------------------------


def test_api_key_never_appears(
    provider_stub: ProviderStub, make_adapter: AdapterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    key = provider_stub.api_key
    provider_stub.script = [
        200 if provider_stub.provider != "sendgrid" else 202,
        401,
        503,
        # A provider echoing the key back must not carry it into the result.
        (400, {"message": f"bad key {key}", "errors": [{"message": f"key {key} refused"}]}),
        (422, {"ErrorCode": 300, "Message": f"token {key} refused"}),
        ("timeout", 2.0),
    ]
    caplog.set_level(logging.DEBUG)

    adapter = make_adapter(timeout_s=0.5)
    results = [send(adapter) for _ in range(6)]
    shown = [repr(adapter), str(adapter)]

    assert {r.outcome for r in results} == {
        BackupOutcome.SENT,
        BackupOutcome.FAILED,
        BackupOutcome.RETRY,
    }
    for result in results:
        shown += [repr(result), result.detail, result.explanation, str(result.provider_message_id)]
    shown.append(caplog.text)
    assert not [text for text in shown if key in text]
    assert any("[redacted]" in r.detail for r in results)


def test_provider_repr_hides_the_key() -> None:
    for name in PROVIDERS:
        with closing(
            make_provider(name, api_key="SG.super-secret", mailgun_domain="mg.test")
        ) as adapter:
            assert "super-secret" not in repr(adapter)
            assert "super-secret" not in repr(vars(adapter))


# --- base URLs and clients ---------------------------------------------------------------


def _recording_client(seen: list[httpx.Request]) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500)

    return httpx.Client(transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    ("provider", "base_url", "expected"),
    [
        ("sendgrid", None, "https://api.sendgrid.com/v3/mail/send"),
        ("sendgrid", EU_BASE_URLS["sendgrid"], "https://api.eu.sendgrid.com/v3/mail/send"),
        ("postmark", None, "https://api.postmarkapp.com/email"),
        ("mailgun", None, "https://api.mailgun.net/v3/mg.acme.test/messages"),
        ("mailgun", EU_BASE_URLS["mailgun"], "https://api.eu.mailgun.net/v3/mg.acme.test/messages"),
        (
            "mailgun",
            "https://proxy.internal/mailgun/",
            "https://proxy.internal/mailgun/v3/mg.acme.test/messages",
        ),
    ],
)
def test_base_url_default_and_override(provider: str, base_url: str | None, expected: str) -> None:
    seen: list[httpx.Request] = []
    client = _recording_client(seen)
    adapter = make_provider(
        provider, api_key="k", base_url=base_url, mailgun_domain="mg.acme.test", client=client
    )

    result = send(adapter)
    adapter.close()

    assert result.outcome is BackupOutcome.RETRY
    assert [str(request.url) for request in seen] == [expected]
    assert not client.is_closed, "a client handed in belongs to the caller"
    client.close()


def test_default_base_urls_are_https() -> None:
    assert set(DEFAULT_BASE_URLS) == set(PROVIDERS)
    assert all(
        url.startswith("https://") for url in (*DEFAULT_BASE_URLS.values(), *EU_BASE_URLS.values())
    )


def test_own_client_is_closed_with_the_adapter() -> None:
    adapter = make_provider("postmark", api_key="k")
    client = adapter._client  # type: ignore[attr-defined]
    adapter.close()
    assert client.is_closed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sendmail", "api_key": "k"}, "Unknown backup provider"),
        ({"name": "mailgun", "api_key": "k"}, "OUTBOX_BACKUP_MAILGUN_DOMAIN"),
        ({"name": "sendgrid", "api_key": " "}, "OUTBOX_BACKUP_API_KEY"),
        (
            {"name": "postmark", "api_key": "k", "base_url": "api.postmarkapp.com"},
            "OUTBOX_BACKUP_API_URL",
        ),
        (
            {"name": "postmark", "api_key": "k", "base_url": "https://u:p@api.test"},
            "OUTBOX_BACKUP_API_URL",
        ),
    ],
)
def test_make_provider_rejects_bad_settings(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_provider(**kwargs)  # type: ignore[arg-type]


def test_provider_names_match_the_settings() -> None:
    # Read from the source: importing `config` would start the Celery app and the
    # settings (and write a development key under var/).
    source = (Path(__file__).resolve().parents[2] / "config" / "settings.py").read_text()
    [value] = [
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "BACKUP_PROVIDERS" for t in node.targets)
    ]
    assert ast.literal_eval(value) == PROVIDERS


# --- the stub itself checks like the provider --------------------------------------------


@only("sendgrid")
def test_stub_sendgrid_rejects_html_before_text(provider_stub: ProviderStub) -> None:
    body = {
        "personalizations": [{"to": [{"email": "bob@example.test"}]}],
        "from": {"email": RELAY},
        "subject": "s",
        "content": [
            {"type": "text/html", "value": "<p>x</p>"},
            {"type": "text/plain", "value": "x"},
        ],
    }
    answer = httpx.post(
        provider_stub.base_url + "/v3/mail/send",
        json=body,
        headers={"Authorization": f"Bearer {provider_stub.api_key}"},
    )
    assert answer.status_code == 400
    assert "text/plain content must be first" in answer.json()["errors"][0]["message"]


@only("postmark")
def test_stub_postmark_rejects_a_message_without_body(provider_stub: ProviderStub) -> None:
    answer = httpx.post(
        provider_stub.base_url + "/email",
        json={"From": RELAY, "To": "bob@example.test", "Subject": "s"},
        headers={"X-Postmark-Server-Token": provider_stub.api_key, "Accept": "application/json"},
    )
    assert answer.status_code == 422
    assert answer.json() == {
        "ErrorCode": 300,
        "Message": "Provide either email TextBody or HtmlBody or both.",
    }


@only("mailgun")
def test_stub_mailgun_rejects_missing_from_and_wrong_auth(provider_stub: ProviderStub) -> None:
    url = f"{provider_stub.base_url}/v3/{provider_stub.mailgun_domain}/messages"
    form = {"to": "bob@example.test", "subject": "s", "text": "x"}

    missing = httpx.post(url, data=form, auth=("api", provider_stub.api_key))
    wrong = httpx.post(url, data={**form, "from": RELAY}, auth=("api", "nope"))

    assert (missing.status_code, missing.json()) == (
        400,
        {"message": "'from' parameter is missing"},
    )
    assert (wrong.status_code, wrong.text) == (401, "Forbidden")
    assert provider_stub.deliveries() == []


def test_stub_parses_display_names_like_the_adapters_send_them(
    provider_stub: ProviderStub, backup_adapter: BackupProvider
) -> None:
    email = full_email(
        from_addr='"Acme, Inc." <help@acme.test>', to=('"Doe, Jane" <jane@example.test>',)
    )

    result = send(backup_adapter, email)

    assert result.outcome is BackupOutcome.SENT, result.detail
    mail = provider_stub.deliveries()[0].mail()
    assert mail.from_addr == ("Acme, Inc.", RELAY)
    assert mail.to == [("Doe, Jane", "jane@example.test")]
    assert parseaddr(email.from_addr)[1] == "help@acme.test"
