"""The deployment files say what the code needs: every queue consumed, one beat, Redis
that neither forgets nor evicts, Flower behind a password, configuration from the
environment only."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from worker.contract import QUEUES

REPO = Path(__file__).resolve().parents[2]
APP_SERVICES = ("migrate", "worker", "beat", "flower")
#: Variable names whose values are secrets: only ever `${...}` in the compose file.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEY|AUTH")


# -- Procfile ---------------------------------------------------------------------------


def procfile() -> dict[str, list[str]]:
    processes = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, command = line.partition(":")
        assert name not in processes, f"process type {name!r} appears twice"
        processes[name.strip()] = shlex.split(command)
    return processes


def _option(argv: list[str], *names: str) -> str:
    for index, arg in enumerate(argv):
        for name in names:
            if arg == name:
                return argv[index + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"none of {names} in {argv}")


def test_procfile_has_release_worker_beat_and_flower() -> None:
    processes = procfile()
    assert set(processes) == {"release", "worker", "beat", "flower"}
    assert processes["release"] == ["outbox", "db", "upgrade"]
    assert processes["flower"][:2] == ["outbox", "flower"]
    assert _option(processes["flower"], "--address") == "0.0.0.0"
    assert _option(processes["flower"], "--port") == "$PORT"


def test_procfile_worker_consumes_every_queue_with_events() -> None:
    worker = procfile()["worker"]
    assert worker[:4] == ["celery", "-A", "config", "worker"]
    assert set(_option(worker, "-Q", "--queues").split(",")) == set(QUEUES)
    assert "-E" in worker or "--task-events" in worker
    assert "beat" not in worker[4:] and "-B" not in worker and "--beat" not in worker


def test_procfile_runs_exactly_one_beat() -> None:
    processes = procfile()
    beats = [name for name, argv in processes.items() if "beat" in argv or "-B" in argv]
    assert beats == ["beat"]
    assert processes["beat"][:4] == ["celery", "-A", "config", "beat"]
    assert _option(processes["beat"], "--schedule", "-s").startswith("/tmp/")


# -- docker-compose.yml -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed: add pyyaml to the dev extras"
    )
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def test_redis_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    argv = _argv(redis)
    assert argv[0] == "redis-server"
    assert _option(argv, "--appendonly") == "yes"
    assert _option(argv, "--maxmemory-policy") == "noeviction"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_postgres_is_checked_and_kept(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["volumes"]


def test_exactly_one_beat(compose: dict[str, Any]) -> None:
    services = compose["services"]
    beats = [
        name
        for name, service in services.items()
        if "command" in service and ("beat" in _argv(service) or "-B" in _argv(service))
    ]
    assert beats == ["beat"]
    assert services["beat"]["deploy"]["replicas"] == 1
    assert _argv(services["beat"])[:4] == ["celery", "-A", "config", "beat"]


def test_worker_scales_and_consumes_every_queue(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    for fixed in ("container_name", "ports", "hostname"):
        assert fixed not in worker, f"worker sets {fixed}: --scale worker=N would clash"
    argv = _argv(worker)
    assert argv[:4] == ["celery", "-A", "config", "worker"]
    assert set(_option(argv, "-Q", "--queues").split(",")) == set(QUEUES)
    assert "-E" in argv
    assert worker["stop_grace_period"] == "30s"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_migrate_runs_once_before_the_workers(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert _argv(migrate) == ["outbox", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_flower_requires_its_password(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["environment"]["OUTBOX_FLOWER_BASIC_AUTH"].startswith(
        "${OUTBOX_FLOWER_BASIC_AUTH:?"
    )
    assert _argv(flower)[:2] == ["outbox", "flower"]
    assert _option(_argv(flower), "--port") == "5555"
    assert any(str(port).endswith(":5555") for port in flower["ports"])
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_everything_is_configured_from_the_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        for required in ("OUTBOX_DATABASE_URL", "OUTBOX_BROKER_URL", "OUTBOX_SECRET_KEY"):
            assert required in env, f"{name} lacks {required}"
        assert env["OUTBOX_SECRET_KEY"].startswith("${OUTBOX_SECRET_KEY:?")
        backup = [key for key in env if key.startswith("OUTBOX_BACKUP_")]
        assert backup, f"{name} gets no backup provider settings"
        for key in backup:
            assert env[key].startswith(f"${{{key}:-"), f"{key} must be optional: ${{{key}:-}}"
        assert services[name]["image"] == services["worker"]["image"]
    for name, service in services.items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping, please"
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"


def test_dockerfile_runs_as_a_user_and_starts_a_worker() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert 'CMD ["outbox", "worker"]' in text
    assert "COPY . " not in text  # never .venv, .git or var/secret.key


# -- docker-compose.rabbitmq.yml --------------------------------------------------------


def test_the_rabbitmq_variant_moves_every_process_to_one_durable_rabbitmq() -> None:
    yaml = pytest.importorskip("yaml")
    override = yaml.safe_load((REPO / "docker-compose.rabbitmq.yml").read_text())
    services = override["services"]
    rabbit = services["rabbitmq"]
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    assert rabbit["hostname"]  # a fixed node name keeps the same data directory
    assert "${RABBITMQ_PASSWORD" in rabbit["environment"]["RABBITMQ_DEFAULT_PASS"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["OUTBOX_BROKER_URL"].startswith("amqp://"), name
        assert "${RABBITMQ_PASSWORD" in env["OUTBOX_BROKER_URL"]
        # Results stay on Redis: the embedded SQLite default is per container.
        assert env["OUTBOX_RESULT_BACKEND"].startswith("redis://"), name
    for name in ("worker", "beat", "flower"):
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
