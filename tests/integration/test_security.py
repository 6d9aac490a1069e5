"""Secrets stay secret: encrypted at rest, never logged, never on the broker; TLS verified;
monitoring behind a password; keys rotate.

Canaries (distinctive strings) are planted as SMTP passwords, as the backup provider's
API key and in message bodies, then looked for where they must not be: a `pg_dump` of
the whole database, every file the test's processes wrote (plain and JSON logs), the CLI's
output, and every key of the Redis database the broker and result backend use.

Covered elsewhere, not repeated here:

* a self-signed relay is refused with a clear explanation until its certificate is
  trusted: `test_core_delivery.py::test_self_signed_relay_is_refused_until_its_ca_is_trusted`;
* Flower answers 401 without the password (pages and API), never shows message content,
  and keeps its password off the command line: `test_flower.py`;
  `outbox flower` refusing to start without a password is unit-tested in
  `tests/unit/test_flower_config.py` (CliRunner, execve mocked) and here as a real process.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from cryptography.fernet import Fernet
from sqlalchemy import select

from standins.accounts import make_account
from standins.provider import ProviderStub
from standins.services import wait_until
from tests.support.cli_runs import outbox_cli, outbox_cli_many
from tests.support.outbox import COMPRESSED, message, wait_for_status
from worker.crypto import SecretBox
from worker.store.models import Account

pytestmark = pytest.mark.integration


def canary(kind: str) -> str:
    return f"{kind}-CANARY-{uuid.uuid4().hex}"


def pg_dump(database_url: str) -> str:
    """The whole database as SQL text (schema and data)."""
    binary = shutil.which("pg_dump")
    assert binary, "pg_dump (PostgreSQL client tools) is needed"
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    done = subprocess.run(
        [binary, "--no-owner", "--dbname", url], capture_output=True, timeout=60, check=True
    )
    dump = done.stdout.decode("utf-8", "replace")
    assert "COPY public.accounts" in dump  # a real dump, with the data
    return dump


def redis_contents(url: str) -> dict[str, list[bytes]]:
    """Every key of the broker's Redis db with every value it holds, whatever its type."""
    client = redis.Redis.from_url(url)
    contents: dict[str, list[bytes]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key)]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [part for pair in client.hgetall(key).items() for part in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = list(client.zrange(key, 0, -1))
        else:
            values = [repr(client.dump(key)).encode()]
        contents[key.decode()] = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return contents


def by_account(session, column) -> dict:
    """{account name: column value} for every account."""
    return {name: value for name, value in session.execute(select(Account.name, column))}


def files_under(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


def encodings(secret: str) -> set[bytes]:
    """The secret as bytes, and base64-encoded at any alignment: the middle of
    b64encode(prefix + secret) is the same whatever the prefix's length modulo 3 is
    (kombu carries message bodies base64-encoded; MIME attachments are too)."""
    raw = secret.encode()
    return {raw} | {base64.b64encode(b"\0" * shift + raw)[4:-4] for shift in range(3)}


def leaks(secrets: dict[str, str], places: dict) -> list[str]:
    """Which secret shows up where (as text, or base64-encoded)."""
    found = []
    for label, secret in secrets.items():
        forms = encodings(secret)
        for where, content in places.items():
            blobs = content if isinstance(content, list) else [content]
            blobs = [b if isinstance(b, bytes) else str(b).encode() for b in blobs]
            if any(form in blob for form in forms for blob in blobs):
                found.append(f"{label} in {where}")
    return found


# -- at rest ---------------------------------------------------------------------------


def test_smtp_passwords_are_encrypted_at_rest(env, db):
    passwords = {"acme": canary("pw"), "globex": canary("pw")}
    env.values["OUTBOX_BACKUP_API_KEY"] = api_key = canary("apikey")
    results = outbox_cli_many(
        [
            [
                *("account", "set", name, "--host", "127.0.0.1", "--port", "2525"),
                *("--tls", "none", "--username", f"{name}-mailer", "--password-stdin"),
            ]
            for name in passwords
        ],
        env=env.values,
        inputs=[password + "\n" for password in passwords.values()],
    )
    assert [r.returncode for r in results] == [0, 0], results

    dump = pg_dump(env.values["OUTBOX_DATABASE_URL"])
    assert leaks({**passwords, "api key": api_key}, {"pg_dump": dump}) == []
    # ...and yet each is there, encrypted under OUTBOX_SECRET_KEY.
    box = SecretBox([env.values["OUTBOX_SECRET_KEY"]])
    with db.session() as session:
        stored = by_account(session, Account.smtp_password_encrypted)
    assert {name: box.decrypt(token) for name, token in stored.items()} == passwords
    assert all(token in dump for token in stored.values())

    shown = outbox_cli_many(
        [["account", "show", "acme", "--json"], ["account", "list", "--json"]], env=env.values
    )
    assert json.loads(shown[0].stdout)["password"] == "set"
    assert leaks(passwords, {"account show": shown[0].said, "account list": shown[1].said}) == []


# -- never in logs ---------------------------------------------------------------------


def test_passwords_api_key_and_bodies_never_reach_a_log(
    env, db, box, smtp_server, plain_smtp_server, test_ca, start_worker
):
    """A whole day compressed into seconds, twice: plain log lines, then JSON lines.

    Account "broken" has the wrong password (535 at AUTH, every attempt) so its mail ends
    up sent through the backup provider; "healthy" delivers over SMTP. Every body holds
    the body canary (text, html, attachment).
    """
    password, api_key, body = canary("pw"), canary("apikey"), canary("body")
    with ProviderStub("sendgrid", api_key=api_key) as stub:
        env.values.update(COMPRESSED)
        env.values.update(
            {
                "OUTBOX_BACKUP_PROVIDER": "sendgrid",
                "OUTBOX_BACKUP_API_KEY": api_key,
                "OUTBOX_BACKUP_API_URL": stub.base_url,
                "OUTBOX_BACKUP_FROM": "Outbox Relay <relay@outbox.example.com>",
            }
        )
        ca_file = env.tmp / "relay-ca.pem"
        ca_file.write_text(test_ca.ca_pem)
        # The wrong password, set the way an operator does.
        created = outbox_cli(
            *("account", "set", "broken", "--host", "127.0.0.1", "--port", str(smtp_server.port)),
            *("--tls", "starttls", "--ca-file", str(ca_file), "--username", "acct"),
            *("--password-stdin", "--from", "Broken <noreply@broken.example.com>"),
            env=env.values,
            input=password + "\n",
        )
        assert created.returncode == 0, created.said
        make_account(db, box, "healthy", port=plain_smtp_server.port, tls_mode="none")
        secret_file = {
            "filename": "statement.txt",
            "content_type": "text/plain",
            "data": f"attachment {body}".encode(),
        }
        broken_ids = []
        for log_json in ("0", "1"):
            env.values["OUTBOX_LOG_JSON"] = log_json
            worker = start_worker(beat=True, name=f"worker-json{log_json}")
            client = env.client(db)
            ids = {
                name: client.enqueue(
                    account=name,
                    to=["customer@example.com"],
                    subject="Your statement",
                    text=f"Dear customer, {body}",
                    html=f"<p>{body}</p>",
                    attachments=[secret_file],
                ).id
                for name in ("broken", "healthy")
            }
            wait_for_status(db, ids["healthy"], "sent")
            assert message(db, ids["healthy"]).sent_via == "smtp"
            wait_for_status(db, ids["broken"], ("sent", "failed"), timeout=30)
            assert message(db, ids["broken"]).sent_via == "backup"
            broken_ids.append(ids["broken"])
            worker.stop()
        assert len(stub.deliveries()) == 2
        assert smtp_server.commands and not smtp_server.messages  # AUTH refused every time

        outputs = outbox_cli_many(
            [
                ["account", "show", "broken", "--json"],
                ["account", "test", "broken", "--json"],
                ["show", str(broken_ids[0]), "--json"],
            ],
            env=env.values,
        )

    assert json.loads(outputs[0].stdout)["password"] == "set"
    probe = json.loads(outputs[1].stdout)
    assert outputs[1].returncode == 1 and probe["code"] == 535
    logs = files_under(env.tmp)
    plain_log = logs[env.tmp / "worker-json0-0.log"]
    json_log = logs[env.tmp / "worker-json1-1.log"]
    for log in (plain_log, json_log):
        assert b"535" in log and b"backup" in log  # the failures and the fallback were logged
    json_lines = [line for line in json_log.splitlines() if line.startswith(b"{")]
    assert json_lines and all(isinstance(json.loads(line), dict) for line in json_lines)

    secrets = {"password": password, "api key": api_key}
    cli = {f"cli {r.args[:3]}": r.said for r in [created, *outputs]}
    assert leaks({**secrets, "body": body}, {**{str(p): c for p, c in logs.items()}, **cli}) == []
    # The database holds bodies by design, never the password or the key; nor does Redis.
    assert leaks(secrets, {"pg_dump": pg_dump(env.values["OUTBOX_DATABASE_URL"])}) == []
    assert leaks({**secrets, "body": body}, redis_contents(env.values["OUTBOX_BROKER_URL"])) == []


def test_a_mistyped_or_undecodable_enqueue_does_not_log_its_body(env, db, start_worker):
    body = canary("body")
    worker = start_worker()
    request = {"account": "acme", "to": ["bob@example.com"], "subject": "Hi", "text": body}
    typo = Celery(broker=env.values["OUTBOX_BROKER_URL"], set_as_current=False)
    typo.send_task("outbox.enqueue_v2", kwargs=request)  # lands on the `celery` queue
    pickled = Celery(broker=env.values["OUTBOX_BROKER_URL"], set_as_current=False)
    pickled.conf.task_serializer = "pickle"
    pickled.send_task("outbox.enqueue", kwargs=request, kwargsrepr="{}")
    wait_until(
        lambda: "outbox.enqueue_v2" in worker.log() and "type pickle" in worker.log(),
        timeout=20,
        message="both messages to be refused",
    )
    assert worker.proc.poll() is None
    assert leaks({"body": body}, {"worker log": worker.log()}) == []


# -- never on the broker ---------------------------------------------------------------


def test_the_broker_carries_only_account_ids(env, db):
    """While mail waits (no worker), nothing on Redis holds a password or a body: a wake-up
    names the account to drain, and only one waits per account."""
    passwords = [canary("pw"), canary("pw")]
    body = canary("body")
    created = outbox_cli(
        *("account", "set", "acme", "--host", "127.0.0.1", "--port", "2525", "--tls", "none"),
        *("--username", "mailer", "--password-stdin", "--from", "Acme <hi@acme.example.com>"),
        env=env.values,
        input=passwords[0] + "\n",
    )
    assert created.returncode == 0, created.said
    client = env.client(db)
    ids = [
        client.enqueue(account="acme", to=["bob@example.com"], subject="Hi", text=body).id
        for _ in range(2)
    ]
    sent = outbox_cli(
        *("send", "--account", "acme", "--to", "bob@example.com", "--subject", "Hi"),
        *("--text", body, "--json"),
        env=env.values,
    )
    assert sent.returncode == 0, sent.said
    ids.append(json.loads(sent.stdout)["id"])
    # A password change wakes the account's pending mail at once: more messages on Redis.
    changed = outbox_cli(
        "account", "set", "acme", "--password-stdin", env=env.values, input=passwords[1] + "\n"
    )
    assert changed.returncode == 0 and "3 pending" in changed.said, changed.said

    contents = redis_contents(env.values["OUTBOX_BROKER_URL"])
    assert (
        leaks({"password 1": passwords[0], "password 2": passwords[1], "body": body}, contents)
        == []
    )
    queued = [json.loads(raw) for raw in contents.get("outbox.send", [])]
    # Three enqueues and a password change, coalesced: the account already had a drain
    # waiting on the broker, so nothing more was published.
    assert len(queued) == 1, queued
    (envelope,) = queued
    assert envelope["headers"]["task"] == "outbox.drain"
    args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    assert kwargs == {} and len(args) == 1, (args, kwargs)
    assert {message(db, i).account_id for i in ids} == {args[0]}
    assert envelope["headers"]["argsrepr"] == repr((args[0],))

    # The scan does see a body that is on the broker: `outbox.enqueue` by name carries the
    # request itself (by design: the caller has no database), until a worker takes it.
    by_name = Celery(broker=env.values["OUTBOX_BROKER_URL"], set_as_current=False)
    by_name.send_task("outbox.enqueue", kwargs={"account": "acme", "text": f"x {body}"})
    contents = redis_contents(env.values["OUTBOX_BROKER_URL"])
    assert leaks({"body": body}, contents) == ["body in celery"]


# -- TLS by default --------------------------------------------------------------------


def test_plaintext_smtp_is_refused_off_loopback_unless_allowed(env, db):
    """(A relay whose certificate is not trusted is refused at connect time: see
    test_core_delivery.py::test_self_signed_relay_is_refused_until_its_ca_is_trusted.)"""
    remote = ["--host", "smtp.example.com", "--port", "25", "--tls", "none"]
    first = outbox_cli_many(
        [
            ["account", "set", "remote", *remote],
            ["account", "set", "lookalike", "--host", "127.0.0.1.nip.io", *remote[2:]],
            ["account", "set", "allowed", *remote, "--allow-plaintext"],
            ["account", "set", "loop4", "--host", "127.0.0.1", "--port", "2525", "--tls", "none"],
            ["account", "set", "loop6", "--host", "::1", "--port", "2525", "--tls", "none"],
            ["account", "set", "secure", "--host", "smtp.example.com", "--port", "587"],
        ],
        env=env.values,
    )
    for refused in first[:2]:
        assert refused.returncode == 1, refused
        assert "unencrypted" in refused.said and "--allow-plaintext" in refused.said, refused.said
        assert "Traceback" not in refused.stderr
    assert [r.returncode for r in first[2:]] == [0, 0, 0, 0], first[2:]

    # A plaintext loopback account cannot be pointed at a remote host without the flag.
    moved, shown = outbox_cli_many(
        [
            ["account", "set", "loop4", "--host", "smtp.example.com"],
            ["account", "show", "secure", "--json"],
        ],
        env=env.values,
    )
    assert moved.returncode == 1 and "--allow-plaintext" in moved.said, moved.said
    assert json.loads(shown.stdout)["tls"] == "starttls"  # the default for a new account
    with db.session() as session:
        hosts = by_account(session, Account.smtp_host)
    assert hosts == {
        "allowed": "smtp.example.com",
        "loop4": "127.0.0.1",
        "loop6": "::1",
        "secure": "smtp.example.com",
    }


# -- monitoring behind a password ------------------------------------------------------


def test_flower_refuses_to_start_without_a_password_on_a_public_address(env):
    """A real `outbox flower` process: exit 2, a sentence naming the variable, no port."""
    public = {**env.values, "OUTBOX_FLOWER_ADDRESS": "0.0.0.0", "OUTBOX_FLOWER_PORT": "5999"}
    variants = [
        {},
        {"OUTBOX_FLOWER_ALLOW_NO_AUTH": "1"},  # only ever applies on loopback
        {"FLOWER_BASIC_AUTH": "intruder:secret"},  # Flower's own variable is not ours
        {"FLOWER_UNAUTHENTICATED_API": "true"},
    ]
    results = outbox_cli_many([["flower"]] * len(variants), env=public, extra_envs=variants)
    for variant, result in zip(variants, results, strict=True):
        assert result.returncode == 2, (variant, result)
        assert "OUTBOX_FLOWER_BASIC_AUTH" in result.said and "0.0.0.0" in result.said
        assert "Traceback" not in result.stderr and "secret" not in result.said


# -- key rotation ----------------------------------------------------------------------


def test_rotated_passwords_decrypt_under_the_new_key_alone(env, db, smtp_server, test_ca):
    key_a, key_b = (Fernet.generate_key().decode() for _ in range(2))
    under_a = {**env.values, "OUTBOX_SECRET_KEY": key_a}
    ca_file = env.tmp / "relay-ca.pem"
    ca_file.write_text(test_ca.ca_pem)
    other = canary("pw")
    created = outbox_cli_many(
        [
            [
                *("account", "set", "rot", "--host", "127.0.0.1", "--port", str(smtp_server.port)),
                *("--tls", "starttls", "--ca-file", str(ca_file), "--username", "acct"),
                "--password-stdin",
            ],
            [
                *("account", "set", "other", "--host", "127.0.0.1", "--port", "2525"),
                *("--tls", "none", "--username", "u", "--password-stdin"),
            ],
            ["account", "set", "nopw", "--host", "127.0.0.1", "--port", "2525", "--tls", "none"],
        ],
        env=under_a,
        inputs=["s3cret\n", other + "\n", None],
    )
    assert [r.returncode for r in created] == [0, 0, 0], created
    with db.session() as session:
        before = by_account(session, Account.smtp_password_encrypted)

    rotated = outbox_cli(
        "rotate-key", "--json", env={**env.values, "OUTBOX_SECRET_KEY": f"{key_b},{key_a}"}
    )
    assert rotated.returncode == 0, rotated.said
    assert json.loads(rotated.stdout) == {"rotated": 2}

    with db.session() as session:
        after = by_account(session, Account.smtp_password_encrypted)
    assert after["nopw"] is None and before["nopw"] is None
    assert all(after[n] != before[n] for n in ("rot", "other"))
    only_b = SecretBox([key_b])
    assert (only_b.decrypt(after["rot"]), only_b.decrypt(after["other"])) == ("s3cret", other)

    tested = outbox_cli_many(
        [["account", "test", "rot", "--json"], ["account", "test", "rot", "--json"]],
        env={**env.values, "OUTBOX_SECRET_KEY": key_b},
        extra_envs=[{}, {"OUTBOX_SECRET_KEY": key_a}],
    )
    # Under B alone: the relay accepts the password (AUTH, no mail sent).
    assert tested[0].returncode == 0, tested[0].said
    assert json.loads(tested[0].stdout)["ok"] is True
    assert smtp_server.messages == []
    # Under A alone (the old key dropped too early): refused, naming the variable.
    assert tested[1].returncode == 1
    assert "OUTBOX_SECRET_KEY" in tested[1].said
    assert leaks({"password": other}, {"cli": [t.said for t in (*created, rotated, *tested)]}) == []


def test_a_key_that_cannot_decrypt_is_explained_in_one_sentence(env, db, smtp_server, test_ca):
    key_a, key_b, key_c = (Fernet.generate_key().decode() for _ in range(3))
    make_account(
        db,
        SecretBox([key_a]),
        "rot",
        port=smtp_server.port,
        tls_mode="starttls",
        ca_pem=test_ca.ca_pem,
        smtp_username="acct",
        password="s3cret",
    )
    with db.session() as session:
        before = session.scalar(select(Account.smtp_password_encrypted))
    tested, rotated = outbox_cli_many(
        [["account", "test", "rot"], ["rotate-key", "--json"]],
        env={**env.values, "OUTBOX_SECRET_KEY": f"{key_c},{key_b}"},  # A is missing
    )
    with db.session() as session:
        assert session.scalar(select(Account.smtp_password_encrypted)) == before
    for result in (tested, rotated):
        assert result.returncode == 1, result
        assert "OUTBOX_SECRET_KEY" in result.said or "key" in result.said
        assert "Traceback" not in result.stderr, result.stderr[-400:]
