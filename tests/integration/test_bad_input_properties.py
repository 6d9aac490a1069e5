"""Hostile input at every door: refused, naming the field, nothing stored, nothing down.

Property-based (Hypothesis, `tests.support.hostile`): a valid request with one to three
fields broken — CR/LF/NUL injected anywhere in a header field or address, lone
surrogates, lines over 998 characters, addresses that fail RFC syntax, thousands of
recipients, bodies and attachments over `OUTBOX_MAX_MESSAGE_BYTES` (4096 here), wrong
JSON types, missing required fields, unknown fields, unknown accounts — must be refused
with an error naming a field that really was broken, and leave no row behind:

* the Python door (`Outbox.enqueue`): 12 examples for each of the 17 ways of breaking a
  request (`hostile.SLOTS`), 204 in all, against real PostgreSQL; the refusal must name
  a broken field and no field that was fine;
* the task door (`outbox.enqueue` by name from a bare Celery client to a real worker):
  2 examples per way, 34 in all; then malformed task payloads (positional arguments,
  junk ids, unknown task names, pickles); the worker keeps running and delivers;
* the CLI door (`python -m worker.cli send`): hostile arguments, invalid UTF-8 on argv
  and in files: 6 processes, 12 different fields named;
* the Flower door (`POST /api/task/send-task/outbox.enqueue` with basic auth).

Inputs that once slipped through the intake (`hostile.FIXED_BUGS`) are part of the
properties, and each also has its own regression test at the end.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from sqlalchemy import func, select

from standins.accounts import make_account
from standins.services import REPO, wait_until
from tests.support.cli_runs import outbox_cli_many
from tests.support.flower_proc import running_flower
from tests.support.hostile import (
    ACCOUNT,
    MAX_MESSAGE_BYTES,
    SLOTS,
    Hostile,
    good_requests,
    hostile_requests,
    names_a_field,
    root,
)
from tests.support.outbox import wait_for_status
from worker.intake import InvalidRequest, Limits, validate_request
from worker.store.db import Database
from worker.store.models import AttachmentRow, Message

pytestmark = pytest.mark.integration

GOOD = {"account": ACCOUNT, "to": ["bob@example.com"], "subject": "Hi", "text": "Hello"}


def rows(db: Database) -> tuple[int, int]:
    """(messages, attachments) in the database."""
    with db.session() as session:
        return (
            session.scalar(select(func.count()).select_from(Message)) or 0,
            session.scalar(select(func.count()).select_from(AttachmentRow)) or 0,
        )


@pytest.fixture
def intake(env, db, box):
    """The Python door with a 4 KB size limit, and the one account requests may name."""
    env.values["OUTBOX_MAX_MESSAGE_BYTES"] = str(MAX_MESSAGE_BYTES)
    make_account(db, box, ACCOUNT, port=2525, tls_mode="none")
    return env.client(db)


def producer_for(env) -> Celery:
    """A caller with none of Outbox's code: a bare Celery app on the same broker."""
    app = Celery(
        broker=env.values["OUTBOX_BROKER_URL"],
        backend=env.values["OUTBOX_RESULT_BACKEND"],
        set_as_current=False,
    )
    app.conf.task_send_sent_event = False
    return app


# -- the Python door -------------------------------------------------------------------


def test_the_requests_the_properties_start_from_are_accepted(intake, db):
    """So a refusal below is the mutation's doing, not the base request's."""

    @settings(max_examples=200, deadline=None)
    @given(good_requests())
    def accepted(request):
        validate_request(request, limits=Limits(max_message_bytes=MAX_MESSAGE_BYTES))

    accepted()
    # ...and the door really stores what it accepts: "nothing stored" below means something.
    before = rows(db)
    files = [{"filename": "a.txt", "content_type": "text/plain", "content": "aGk="}]
    assert intake.enqueue(**GOOD, attachments=files).created
    assert rows(db) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("slot", SLOTS)
def test_python_door_refuses_every_hostile_request_naming_the_field(intake, db, slot):
    """12 examples for each of the 17 ways of breaking a request: 204 in all."""

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(hostile=hostile_requests(first=slot))
    def refused_naming_the_field(hostile):
        assert_refused(intake, db, hostile)

    refused_naming_the_field()


def assert_refused(intake, db, hostile: Hostile) -> None:
    before = rows(db)
    with pytest.raises(InvalidRequest) as refused:
        intake.enqueue(**hostile.request)
    named = {root(error.field) for error in refused.value.errors}
    assert named & hostile.broken, f"{refused.value} names none of {sorted(hostile.broken)}"
    assert named <= hostile.broken, f"{refused.value} blames a field that was fine"
    assert all(error.reason for error in refused.value.errors)
    assert str(refused.value).startswith(refused.value.errors[0].field)
    assert rows(db) == before


# -- the task door ---------------------------------------------------------------------


def test_task_door_refuses_hostile_requests_and_the_worker_keeps_delivering(
    env, db, box, plain_smtp_server, start_worker
):
    env.values["OUTBOX_MAX_MESSAGE_BYTES"] = str(MAX_MESSAGE_BYTES)
    make_account(db, box, ACCOUNT, port=plain_smtp_server.port, tls_mode="none")
    worker = start_worker()
    producer = producer_for(env)
    refusals: list[str] = []

    def refused_by_the_worker(hostile: Hostile) -> None:
        before = rows(db)
        result = producer.send_task("outbox.enqueue", kwargs=hostile.request)
        with pytest.raises(Exception) as caught:
            result.get(timeout=20)
        assert type(caught.value).__name__ == "EnqueueRefused", repr(caught.value)
        message = str(caught.value)
        assert names_a_field(message, hostile.broken), (message, sorted(hostile.broken))
        assert rows(db) == before
        refusals.append(message)

    for slot in SLOTS:  # 2 examples of each way of breaking a request: 34 in all
        strategy = hostile_requests(json_only=True, large=False, first=slot)

        @settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(hostile=strategy)
        def refused(hostile: Hostile) -> None:
            refused_by_the_worker(hostile)

        refused()
    assert len(refusals) >= 2 * len(SLOTS)
    assert worker.proc.poll() is None, "the worker died"

    accepted = producer.send_task("outbox.enqueue", kwargs={**GOOD, "subject": "after"})
    message_id = accepted.get(timeout=20)["id"]
    wait_for_status(db, message_id, "sent")
    assert [str(m.message["Subject"]) for m in plain_smtp_server.messages] == ["after"]
    assert rows(db)[0] == 1


class _Unpickle:
    """Unpickling this creates `marker`: proof that a pickle was opened."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


JUNK_IDS = ["abc", None, [1], -5, 0, True, {"id": 1}, "1; DROP TABLE messages", 1.5, "1.5"]


def test_task_door_drops_malformed_payloads_and_keeps_running(
    env, db, box, plain_smtp_server, start_worker
):
    make_account(db, box, ACCOUNT, port=plain_smtp_server.port, tls_mode="none")
    worker = start_worker()
    producer = producer_for(env)

    # outbox.enqueue takes keyword arguments only.
    for args in (["acme", "bob@example.com", "Hi", "Hello"], [GOOD]):
        with pytest.raises(Exception) as caught:
            producer.send_task("outbox.enqueue", args=args).get(timeout=20)
        assert type(caught.value).__name__ == "EnqueueRefused"
        assert str(caught.value).startswith("request: ")
    # A body that is no object at all, and kwargs beside positional arguments.
    with pytest.raises(Exception, match="request: "):
        producer.send_task("outbox.enqueue", args=[1], kwargs=GOOD).get(timeout=20)

    # outbox.send / deliver_via_backup carry one positive id; anything else is dropped.
    for junk in JUNK_IDS:
        producer.send_task("outbox.send", args=(junk,), queue="outbox.send")
        producer.send_task("outbox.deliver_via_backup", args=(junk,), queue="outbox.backup")
    producer.send_task("outbox.send", kwargs={"message_id": "x"}, queue="outbox.send")
    producer.send_task("outbox.send", args=(), queue="outbox.send")  # TypeError in the task
    producer.send_task("outbox.send", args=(1, 2), queue="outbox.send")
    producer.send_task("outbox.send", args=(424242,), queue="outbox.send")  # no such message
    producer.send_task("outbox.nope", args=(1,), queue="outbox.send")  # unregistered

    # A pickle is never opened: the workers accept JSON only (unpickling it would run
    # `open(marker, "w")`).
    marker = env.tmp / "unpickled"
    pickler = producer_for(env)
    pickler.conf.task_serializer = "pickle"
    pickler.send_task("outbox.enqueue", kwargs={**GOOD, "text": _Unpickle(marker)})
    pickler.send_task("outbox.send", args=(_Unpickle(marker),), queue="outbox.send")

    expected = 2 * len(JUNK_IDS) + 1
    wait_until(
        lambda: worker.log().count("refused a malformed message id") >= expected,
        timeout=20,
        message=f"{expected} malformed wake-ups to be refused",
    )
    wait_until(
        lambda: (
            "unregistered task of type 'outbox.nope'" in worker.log()
            and worker.log().count("raised unexpected: TypeError") >= 2
        ),
        timeout=20,
        message="the unregistered task and the bad arity to be logged",
    )
    wait_until(
        lambda: worker.log().count("untrusted content of type pickle") >= 2,
        timeout=20,
        message="both pickles to be refused",
    )
    assert not marker.exists(), "a pickle was unpickled"
    assert worker.proc.poll() is None, "the worker died"
    assert rows(db) == (0, 0)

    message_id = env.client(db).enqueue(**GOOD).id
    wait_for_status(db, message_id, "sent")
    assert len(plain_smtp_server.messages) == 1
    assert worker.proc.poll() is None


# -- the CLI door ----------------------------------------------------------------------


def test_cli_door_refuses_hostile_arguments_naming_the_field(env, db, box, tmp_path):
    env.values["OUTBOX_MAX_MESSAGE_BYTES"] = str(MAX_MESSAGE_BYTES)
    make_account(db, box, ACCOUNT, port=2525, tls_mode="none")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"\xff\xfe caf\xe9")
    not_utf8_html = tmp_path / "page.html"
    not_utf8_html.write_bytes(b"<p>caf\xe9</p>")
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (MAX_MESSAGE_BYTES + 1))
    crlf_name = tmp_path / "a\r\nBcc: victim@example.org.txt"
    crlf_name.write_text("attached")

    base = ["send", "--account", ACCOUNT, "--to", "bob@example.com", "--subject", "Hi"]
    # One process per case (each costs a second); a refusal names every bad field at
    # once, so most cases break several. Later options win over `base` (click keeps the
    # last --account/--subject; --to adds up, so a bad --to sits beside a good one).
    cases = [
        (
            {"subject", "headers", "cc", "bcc", "reply_to", "from_addr", "idempotency_key"}
            | {"attachments"},
            [
                *("--subject", "Hi\r\nBcc: victim@example.org", "--text", "x"),
                *("--header", "X-Tag: a\r\nBcc: victim@example.org"),
                *("--cc", "carol@example.com\nX-Injected: 1", "--bcc", "carol@exa mple.com"),
                *("--reply-to", "reply@@example.com", "--from", "Eve\r\n <eve@example.com>"),
                *("--idempotency-key", "order\n77", "--attach", str(crlf_name)),
            ],
        ),
        (
            {"subject", "text", "headers", "to"},
            [
                *("--subject", b"Hi \xff\xfe", "--text", b"caf\xe9"),  # not UTF-8 on argv
                *("--header", "Bcc: victim@example.org"),
                *("--to", "bob@example.com\r\nBcc: victim@example.org"),
            ],
        ),
        (
            {"subject", "headers", "to", "text"},
            [
                *("--subject", "S" * 999, "--text-file", str(huge)),
                *("--header", "X Tag: spaces", "--to", "not an address"),
            ],
        ),
        ({"account"}, ["--account", "ghost", "--text", "x"]),
        ({"text"}, ["--text-file", str(not_utf8)]),
        ({"html"}, ["--html-file", str(not_utf8_html), "--text", "x"]),
    ]
    results = outbox_cli_many([[*base, *extra] for _, extra in cases], env=env.values)
    for (fields, _), result in zip(cases, results, strict=True):
        assert result.returncode == 1, (fields, result)
        assert "Traceback" not in result.stderr, (fields, result.stderr[-2000:])
        refusal = result.said.removeprefix("error: ")
        for name in fields:
            assert names_a_field(refusal, frozenset({name})), (name, result.said)
    assert rows(db) == (0, 0)


# -- the Flower door -------------------------------------------------------------------


def test_flower_door_refuses_hostile_requests_naming_the_field(
    env, db, box, plain_smtp_server, start_worker
):
    make_account(db, box, ACCOUNT, port=plain_smtp_server.port, tls_mode="none")
    start_worker()
    hostile = {
        **GOOD,
        "subject": "Hi\r\nBcc: victim@example.org",
        "cc": ["carol@example.com", 42],
        "priority": "urgent",
    }
    with running_flower(env.values, env.tmp / "flower.log") as flower, flower.client() as api:
        sent = api.post("/api/task/send-task/outbox.enqueue", json={"kwargs": hostile})
        assert sent.status_code == 200, sent.text
        positional = api.post("/api/task/send-task/outbox.enqueue", json={"args": [GOOD]})
        assert positional.status_code == 200, positional.text

        def failed(task_id: str) -> dict | None:
            answer = api.get(f"/api/task/result/{task_id}").raise_for_status().json()
            return answer if answer["state"] == "FAILURE" else None

        first = wait_until(lambda: failed(sent.json()["task-id"]), timeout=20, message="FAILURE")
        second = wait_until(
            lambda: failed(positional.json()["task-id"]), timeout=20, message="FAILURE"
        )
    assert "EnqueueRefused" in first["result"]
    for name in ("subject", "cc", "priority"):
        assert names_a_field(first["result"], frozenset({name})), (name, first["result"])
    assert "EnqueueRefused" in second["result"] and "request: " in second["result"]
    assert rows(db) == (0, 0)
    assert plain_smtp_server.messages == []


# -- known bugs: each input below is accepted (or crashes) although it must be refused --


def _refusal(intake, request: dict) -> InvalidRequest | None:
    try:
        intake.enqueue(**request)
    except InvalidRequest as exc:
        return exc
    return None


@pytest.mark.parametrize("name", ["X-Tag\n", "Bcc\n"])
def test_header_name_ending_in_lf_is_refused(intake, db, name):
    refused = _refusal(intake, {**GOOD, "headers": {name: "victim@example.org"}})
    assert refused is not None, f"header name {name!r} was accepted"
    assert {root(e.field) for e in refused.errors} == {"headers"}
    assert rows(db) == (0, 0)


def test_content_type_ending_in_lf_is_refused(intake, db):
    files = [{"filename": "a.txt", "content_type": "text/plain\n", "content": "aGk="}]
    refused = _refusal(intake, {**GOOD, "attachments": files})
    assert refused is not None, "content_type 'text/plain\\n' was accepted"
    assert rows(db) == (0, 0)


def test_account_with_a_lone_surrogate_is_refused(intake, db):
    refused = _refusal(intake, {**GOOD, "account": "ac\ud800me"})
    assert refused is not None and {e.field for e in refused.errors} == {"account"}
    assert rows(db) == (0, 0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subject": "Invoice\u2028Bcc: victim@example.org"}, "subject"),
        ({"headers": {"X-Tag": "a\x0bb"}}, "headers"),
        (
            {"attachments": [{"filename": "a\x0cb.txt", "content": "aGk="}]},
            "attachments",
        ),
    ],
    ids=["subject-u2028", "header-value-vt", "filename-ff"],
)
def test_other_line_separators_are_refused(intake, db, change, field):
    refused = _refusal(intake, {**GOOD, **change})
    assert refused is not None, f"{change!r} was accepted"
    assert {root(e.field) for e in refused.errors} == {field}
    assert rows(db) == (0, 0)


@pytest.mark.parametrize("name", ["Content-ID", "Content-Language", "Content-Length"])
def test_content_headers_are_refused_as_the_readme_says(intake, db, name):
    refused = _refusal(intake, {**GOOD, "headers": {name: "x"}})
    assert refused is not None, f"{name} was accepted (and would be dropped at compose)"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text": None, "html": "<p>" + "x" * MAX_MESSAGE_BYTES + "</p>"}, "html"),
        (
            {
                "text": "x" * MAX_MESSAGE_BYTES,
                "attachments": [{"filename": "a.txt", "content": "aGk="}],
            },
            "text",
        ),
    ],
    ids=["html-blamed-on-text", "text-blamed-on-attachments"],
)
def test_size_refusal_names_the_oversized_part(intake, db, change, field):
    refused = _refusal(intake, {**GOOD, **change})
    assert refused is not None
    assert {root(e.field) for e in refused.errors} == {field}, str(refused)


def test_a_flood_of_recipients_gets_a_short_refusal(intake, db):
    refused = _refusal(intake, {**GOOD, "to": ["not-an-address"] * 10_000})
    assert refused is not None
    assert len(str(refused)) < 10_000, f"{len(str(refused)):,} characters"
    assert len(refused.errors) <= 100


def test_a_refused_request_cannot_forge_log_lines(env, db, box, start_worker):
    make_account(db, box, ACCOUNT, port=2525, tls_mode="none")
    worker = start_worker()
    forged = "FORGED 2000-01-01 00:00:00,000 INFO outbox.intake: all good"
    with pytest.raises(Exception, match="is not a field"):
        producer_for(env).send_task("outbox.enqueue", kwargs={**GOOD, f"x\n{forged}\n": 1}).get(
            timeout=20
        )
    wait_until(lambda: "enqueue refused" in worker.log(), timeout=10, message="the log line")
    lines = worker.log().splitlines()
    assert not any(line.startswith("FORGED") for line in lines), "a log line was forged"


def test_a_wake_up_with_an_id_beyond_bigint_is_dropped_as_malformed(env):
    script = textwrap.dedent("""
        from tasks.delivery import id_arg
        print(id_arg("99999999999999999999999"), id_arg(2**63))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**env.values, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None"], done.stdout


def test_cli_refusal_echoing_brackets_is_printed_as_is(env, db, box):
    make_account(db, box, ACCOUNT, port=2525, tls_mode="none")
    argv = ["send", "--account", ACCOUNT, "--to", "a@example.com", "--subject", "x", "--text", "y"]
    cases = [("--to", "[/]@example.com", "to"), ("--account", "[/red]", "account")]
    results = outbox_cli_many(
        [[*argv, option, value] for option, value, _ in cases], env=env.values
    )
    for (_, value, field), result in zip(cases, results, strict=True):
        assert result.returncode == 1
        assert "Traceback" not in result.stderr, result.stderr[-600:]
        assert value in result.said
        assert names_a_field(result.said.removeprefix("error: "), frozenset({field}))
