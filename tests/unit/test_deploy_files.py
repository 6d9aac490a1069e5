"""The deployment files say what the code needs: every queue consumed, one beat, Redis
that neither forgets nor evicts, Flower behind a password, configuration from the
environment only, an exporter whose alert rules and dashboard name only what it serves."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from worker.contract import QUEUES
from worker.metrics import SERVED

REPO = Path(__file__).resolve().parents[2]
APP_SERVICES = ("migrate", "worker", "beat", "flower", "metrics")
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


def test_procfile_has_release_worker_beat_flower_and_metrics() -> None:
    processes = procfile()
    assert set(processes) == {"release", "worker", "beat", "flower", "metrics"}
    assert processes["release"] == ["outbox", "db", "upgrade"]
    assert processes["flower"][:2] == ["outbox", "flower"]
    assert _option(processes["flower"], "--address") == "0.0.0.0"
    assert _option(processes["flower"], "--port") == "$PORT"
    assert processes["metrics"][:2] == ["outbox", "metrics"]
    assert _option(processes["metrics"], "--host") == "0.0.0.0"
    assert _option(processes["metrics"], "--port") == "9464"


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


def test_metrics_exporter_listens_on_its_port_after_the_migration(compose: dict[str, Any]) -> None:
    metrics = compose["services"]["metrics"]
    argv = _argv(metrics)
    assert argv[:2] == ["outbox", "metrics"]
    assert _option(argv, "--host") == "0.0.0.0"
    assert _option(argv, "--port") == "9464"
    assert any(str(port).endswith(":9464") for port in metrics["ports"])
    assert "/metrics" in " ".join(metrics["healthcheck"]["test"])
    assert metrics["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert metrics["environment"]["OUTBOX_METRICS_MAX_ACCOUNTS"].startswith(
        "${OUTBOX_METRICS_MAX_ACCOUNTS:-"
    )


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
    for name in ("migrate", "worker", "beat", "flower"):  # the exporter needs no broker
        env = services[name]["environment"]
        assert env["OUTBOX_BROKER_URL"].startswith("amqp://"), name
        assert "${RABBITMQ_PASSWORD" in env["OUTBOX_BROKER_URL"]
        # Results stay on Redis: the embedded SQLite default is per container.
        assert env["OUTBOX_RESULT_BACKEND"].startswith("redis://"), name
    for name in ("worker", "beat", "flower"):
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


# -- deploy/: Prometheus alert rules, Grafana dashboard -----------------------------------

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "outbox.json"
#: What the issue asks the rules to watch, by alert name.
REQUIRED_ALERTS = {
    "OutboxOldestPendingTooOld",
    "OutboxBackupShareHigh",
    "OutboxIncidentOpenTooLong",
    "OutboxSweeperNotRunning",
}
METRIC_NAME = re.compile(r"\boutbox_[a-z0-9_]+\b")


def _metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_watch_what_the_issue_asks(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names)), "an alert name appears twice"
    assert set(names) >= REQUIRED_ALERTS
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_alert_rules_name_only_metrics_the_exporter_serves(
    alert_rules: list[dict[str, Any]],
) -> None:
    for rule in alert_rules:
        names = _metric_names(rule["expr"])
        assert names, f"{rule['alert']} watches no Outbox metric"
        assert names <= SERVED, f"{rule['alert']}: {names - SERVED} are not served"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed: scripts/install-promtool.sh (Debian's prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing one is a broken set-up
        pytest.skip(message)
    return found


def test_alert_rules_load_in_promtool() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_rules_fire_when_they_should_and_only_then() -> None:
    """deploy/prometheus/alerts.test.yml: series over time, and the alerts expected."""
    done = subprocess.run(
        [_promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    yaml = pytest.importorskip("yaml")
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert tested == {rule["alert"] for group in groups for rule in group["rules"]}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def test_dashboard_is_valid_json_naming_only_served_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "two panels share an id"
    named: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} shows nothing"
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: {target['expr']!r}"
            assert names <= SERVED, f"panel {panel['title']!r}: {names - SERVED} are not served"
            named |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert _metric_names(variable["definition"]) <= SERVED
    # Every metric the exporter serves is on the dashboard somewhere.
    assert named == SERVED, f"not on the dashboard: {SERVED - named}"
