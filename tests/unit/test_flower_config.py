"""`outbox flower`: refuses to run without a password, and never shows it; message
content masked from monitoring (`tasks.masking`)."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.contrib.testing.mocks import TaskMessage
from click.testing import CliRunner

from config.flower import FlowerConfigError, flower_argv, flower_config, flower_env
from tasks.masking import (
    MaskedRequest,
    install_send_masking,
    masked_argsrepr,
    masked_kwargsrepr,
)
from worker.cli import main

PASSWORD = "Tr0ub4dor-and-3"
MARKER = "confidential-marker-4711"


def _env(**values: str) -> dict[str, str]:
    return {"PATH": "/usr/bin", **values}


# -- refusing to start ------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.1.2.3", "flower.internal"])
def test_refuses_without_auth_on_a_non_loopback_address(address: str) -> None:
    for extra in ({}, {"OUTBOX_FLOWER_ALLOW_NO_AUTH": "1"}):
        with pytest.raises(FlowerConfigError, match="OUTBOX_FLOWER_BASIC_AUTH") as caught:
            flower_argv(_env(OUTBOX_FLOWER_ADDRESS=address, **extra))
        assert address in str(caught.value)


def test_refuses_without_auth_on_loopback_unless_allowed() -> None:
    with pytest.raises(FlowerConfigError) as caught:
        flower_argv(_env())
    assert "OUTBOX_FLOWER_BASIC_AUTH" in str(caught.value)
    assert "OUTBOX_FLOWER_ALLOW_NO_AUTH=1" in str(caught.value)

    for address in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        env = _env(OUTBOX_FLOWER_ADDRESS=address, OUTBOX_FLOWER_ALLOW_NO_AUTH="1")
        assert f"--address={address}" in flower_argv(env)
        assert "FLOWER_BASIC_AUTH" not in flower_env(env)


@pytest.mark.parametrize(
    "value", [PASSWORD, f":{PASSWORD}", "ops:", f"ops:{PASSWORD},{PASSWORD}", " : "]
)
def test_malformed_credentials_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(FlowerConfigError, match="OUTBOX_FLOWER_BASIC_AUTH entry #") as caught:
        flower_argv(_env(OUTBOX_FLOWER_BASIC_AUTH=value))
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OUTBOX_FLOWER_PORT", "0"),
        ("OUTBOX_FLOWER_PORT", "70000"),
        ("OUTBOX_FLOWER_PORT", "http"),
        ("OUTBOX_FLOWER_ADDRESS", "http://0.0.0.0"),
        ("OUTBOX_FLOWER_MAX_TASKS", "0"),
        ("OUTBOX_FLOWER_ALLOW_NO_AUTH", "maybe"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        flower_config(_env(**{name: value}))


# -- what runs --------------------------------------------------------------------------


def test_argv_and_environment_with_auth() -> None:
    env = _env(
        OUTBOX_FLOWER_BASIC_AUTH=f" ops:{PASSWORD} , ci:p:w ",
        OUTBOX_FLOWER_ADDRESS="0.0.0.0",
        OUTBOX_FLOWER_PORT="8080",
        OUTBOX_BROKER_URL="redis://redis:6379/0",
        FLOWER_UNAUTHENTICATED_API="true",
        FLOWER_BASIC_AUTH="stale:one",
    )
    argv = flower_argv(env)
    assert argv == [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "config.flower",
        "flower",
        "--address=0.0.0.0",
        "--port=8080",
        "--max_tasks=10000",
        "--persistent=False",
    ]
    assert not any(PASSWORD in part for part in argv)  # `ps` shows argv to everyone

    child = flower_env(env)
    assert child["FLOWER_BASIC_AUTH"] == f"ops:{PASSWORD},ci:p:w"
    assert child["OUTBOX_BROKER_URL"] == "redis://redis:6379/0"
    assert "OUTBOX_FLOWER_BASIC_AUTH" not in child
    assert "FLOWER_UNAUTHENTICATED_API" not in child

    config = flower_config(env)
    assert config.users == ("ops", "ci")
    assert PASSWORD not in repr(config)


def test_defaults_are_loopback_5555() -> None:
    argv = flower_argv(_env(OUTBOX_FLOWER_BASIC_AUTH=f"ops:{PASSWORD}"))
    assert "--address=127.0.0.1" in argv and "--port=5555" in argv


def test_cli_execs_flower_and_never_prints_the_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []
    monkeypatch.setattr("os.execve", lambda path, argv, env: calls.append((path, argv, env)))
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(
        main,
        ["flower", "--address", "0.0.0.0", "--port", "6001"],
        env={"OUTBOX_FLOWER_BASIC_AUTH": f"ops:{PASSWORD}", "OUTBOX_FLOWER_PORT": "7000"},
    )
    assert result.exit_code == 0, result.output
    [(path, argv, env)] = calls
    assert path == sys.executable and argv[0] == path
    assert "--address=0.0.0.0" in argv and "--port=6001" in argv  # options beat the env
    assert env["FLOWER_BASIC_AUTH"] == f"ops:{PASSWORD}"
    assert "http://0.0.0.0:6001/" in result.output and "ops" in result.output
    assert PASSWORD not in result.output
    assert PASSWORD not in " ".join(argv)
    assert PASSWORD not in caplog.text


def test_cli_refuses_with_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.execve", lambda *a: pytest.fail("must not start Flower"))
    monkeypatch.delenv("OUTBOX_FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("OUTBOX_FLOWER_ALLOW_NO_AUTH", raising=False)
    runner = CliRunner()
    result = runner.invoke(main, ["flower", "--address", "0.0.0.0"])
    assert result.exit_code == 2
    assert "OUTBOX_FLOWER_BASIC_AUTH" in " ".join(result.output.split())

    result = runner.invoke(main, ["flower"], env={"OUTBOX_FLOWER_BASIC_AUTH": PASSWORD})
    assert result.exit_code == 2 and PASSWORD not in result.output


# -- masking ----------------------------------------------------------------------------


def _email() -> dict:
    return {
        "account": "acme",
        "to": ["bob@example.com", "Dan <dan@example.com>"],
        "cc": "carol@example.org",
        "bcc": ["audit@example.net"],
        "reply_to": f"{MARKER}@example.com",
        "subject": f"Subject {MARKER}",
        "text": f"Hello {MARKER}",
        "html": f"<p>{MARKER}</p>",
        "headers": {"X-Ref": MARKER},
        "attachments": [{"filename": f"{MARKER}.pdf", "content": "aGVsbG8="}],
        "idempotency_key": "order-77",
    }


def test_masked_kwargsrepr_shows_who_and_how_many_never_content() -> None:
    text = masked_kwargsrepr(_email())
    assert text == (
        "{'account': 'acme', 'recipients': 4, 'idempotency_key': 'order-77', 'attachments': 1}"
    )
    for hidden in (MARKER, "bob@", "carol@", "audit@", "Subject", "Hello"):
        assert hidden not in text


def test_masked_kwargsrepr_copes_with_anything() -> None:
    assert masked_kwargsrepr({"account": "acme", "to": ["a@x.test"]}) == (
        "{'account': 'acme', 'recipients': 1, 'idempotency_key': None}"
    )
    assert masked_kwargsrepr({}) == ("{'account': None, 'recipients': 0, 'idempotency_key': None}")
    assert MARKER not in masked_kwargsrepr({"account": {"name": MARKER}, "to": 7})
    assert "'account': '" + "a" * 255 + "...'" in masked_kwargsrepr({"account": "a" * 10_000})
    assert masked_kwargsrepr([MARKER]) == "<hidden list>"
    assert masked_argsrepr(()) == "()" and masked_argsrepr([MARKER, 2]) == "(<2 hidden>)"


def test_masked_request_hides_what_the_sender_put_in_the_headers() -> None:
    app = Celery("masking-test", set_as_current=False)

    @app.task(name="outbox.enqueue", Request="tasks.masking:MaskedRequest", shared=False)
    def enqueue(**kwargs: object) -> None: ...

    email = _email()
    message = TaskMessage("outbox.enqueue", kwargs=email, argsrepr="()", kwargsrepr=repr(email))
    request = MaskedRequest(message, app=app, task=app.tasks["outbox.enqueue"])
    assert request.kwargs == email  # the task itself gets everything
    assert request.argsrepr == "()"
    assert request.kwargsrepr == masked_kwargsrepr(email)
    for shown in (repr(request), str(request.info()), str(request.info(safe=True))):
        assert MARKER not in shown
    assert "'account': 'acme'" in str(request.info())


def test_the_enqueue_task_runs_with_the_masked_request() -> None:
    from config.celery import app

    app.loader.import_default_modules()
    assert app.tasks["outbox.enqueue"].Request == "tasks.masking:MaskedRequest"


def test_send_masking_rewrites_reprs_of_enqueue_only() -> None:
    sent = []
    fake = SimpleNamespace(send_task=lambda name, args=None, kwargs=None, **o: sent.append(o))
    install_send_masking(install_send_masking(fake))  # idempotent
    fake.send_task("outbox.enqueue", kwargs=_email(), kwargsrepr=repr(_email()), queue="q")
    fake.send_task("outbox.send", args=(42,))
    assert sent[0] == {
        "argsrepr": "()",
        "kwargsrepr": masked_kwargsrepr(_email()),
        "queue": "q",
    }
    assert sent[1] == {}
