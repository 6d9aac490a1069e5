"""Flower, the Celery monitor, as Outbox runs it: always behind a password.

`outbox flower` validates the variables below and replaces itself with
``python -m celery -A config.flower flower ...`` (so SIGTERM reaches Flower directly):

==================================  =========================================================
``OUTBOX_FLOWER_BASIC_AUTH``        ``user:password``, several separated by commas (so no
                                    comma in a password). Required: without it Flower
                                    refuses to start (exit 2), except on loopback with
                                    ``OUTBOX_FLOWER_ALLOW_NO_AUTH=1``.
``OUTBOX_FLOWER_ADDRESS``           Address to listen on; default ``127.0.0.1``
                                    (``outbox flower --address`` wins).
``OUTBOX_FLOWER_PORT``              Port; default ``5555`` (``outbox flower --port`` wins).
``OUTBOX_FLOWER_ALLOW_NO_AUTH``     ``1`` to run without a password on a loopback address
                                    (a developer's machine). Flower's ``/api/*`` still
                                    answers 401 then; the web pages are open.
``OUTBOX_FLOWER_MAX_TASKS``         Tasks Flower keeps in memory; default ``10000``.
==================================  =========================================================

The credentials never appear on a command line (``ps`` shows every process's argv to
every local user): they reach Flower as ``FLOWER_BASIC_AUTH`` in its environment, which
Flower reads like its ``--basic-auth`` option. Nothing here prints or logs them.

What Flower 2.2 serves without authentication even when basic auth is on:
``/healthcheck`` ("OK") and ``/metrics`` (Prometheus: worker host names, task names,
counts and runtimes; no arguments). Every page and every ``/api/*`` call needs the
password. Flower keeps no state across restarts (``--persistent=False``).

``-A config.flower`` is the same Celery app as ``-A config``, with two differences for
the Flower process only: tasks it sends by name (``POST /api/task/send-task/outbox.enqueue``)
emit a `task-sent` event, and carry a masked ``kwargsrepr`` (`tasks.masking`), so that
event does not publish the email it was given.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from config.settings import SettingsError, _bool, _int

ENV_BASIC_AUTH = "OUTBOX_FLOWER_BASIC_AUTH"
ENV_ADDRESS = "OUTBOX_FLOWER_ADDRESS"
ENV_PORT = "OUTBOX_FLOWER_PORT"
ENV_ALLOW_NO_AUTH = "OUTBOX_FLOWER_ALLOW_NO_AUTH"
ENV_MAX_TASKS = "OUTBOX_FLOWER_MAX_TASKS"

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 5555
#: Flower's own default is 100,000; each task costs memory in the Flower process.
DEFAULT_MAX_TASKS = 10_000

#: Flower variables the child must not inherit: we set the first; the others would open
#: the API without a password or listen somewhere other than the validated address.
_FLOWER_ENV_OWNED = ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API", "FLOWER_UNIX_SOCKET")

_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")


class FlowerConfigError(SettingsError):
    """Flower's variables are missing or wrong; the message names the variable."""


@dataclass(frozen=True)
class FlowerConfig:
    address: str
    port: int
    max_tasks: int
    #: ``user:password`` entries; kept out of repr().
    credentials: tuple[str, ...] = field(default=(), repr=False)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(entry.split(":", 1)[0] for entry in self.credentials)

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.address)


def is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _credentials(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get(ENV_BASIC_AUTH) or ""
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    for number, entry in enumerate(entries, start=1):
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            # Never echo the value: it is (or holds) a password.
            raise FlowerConfigError(
                f"{ENV_BASIC_AUTH} entry #{number} is not user:password (a user name, a "
                "colon, a password; several entries separated by commas)."
            )
    return tuple(entries)


def _address(env: Mapping[str, str]) -> str:
    address = (env.get(ENV_ADDRESS) or "").strip() or DEFAULT_ADDRESS
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if not _HOSTNAME.match(address):
            raise FlowerConfigError(
                f"{ENV_ADDRESS}={address!r} is not an IP address or host name."
            ) from None
    return address


def flower_config(env: Mapping[str, str]) -> FlowerConfig:
    """Validated Flower settings; raises `FlowerConfigError` naming the variable."""
    address = _address(env)
    port = _int(env, ENV_PORT, DEFAULT_PORT, minimum=1)
    if port > 65535:
        raise FlowerConfigError(f"{ENV_PORT}={port} is not a TCP port (1-65535).")
    config = FlowerConfig(
        address=address,
        port=port,
        max_tasks=_int(env, ENV_MAX_TASKS, DEFAULT_MAX_TASKS, minimum=1),
        credentials=_credentials(env),
    )
    if not config.credentials:
        if not config.is_loopback:
            raise FlowerConfigError(
                f"Refusing to start Flower on {address} without authentication: set "
                f"{ENV_BASIC_AUTH}=user:password (several separated by commas). "
                f"{ENV_ALLOW_NO_AUTH} only applies on a loopback address."
            )
        if not _bool(env, ENV_ALLOW_NO_AUTH):
            raise FlowerConfigError(
                f"Refusing to start Flower without authentication: set "
                f"{ENV_BASIC_AUTH}=user:password (several separated by commas), or "
                f"{ENV_ALLOW_NO_AUTH}=1 to run it open on {address} (loopback only; its "
                "/api/ still answers 401 without authentication)."
            )
    return config


def flower_argv(settings_env: Mapping[str, str]) -> list[str]:
    """The command that runs Flower; no secret in it (see `flower_env`).

    Raises `FlowerConfigError` when Flower must not start (no password, bad values).
    """
    config = flower_config(settings_env)
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "config.flower",
        "flower",
        f"--address={config.address}",
        f"--port={config.port}",
        f"--max_tasks={config.max_tasks}",
        "--persistent=False",
    ]


def flower_env(settings_env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the Flower process: ``settings_env`` with the credentials
    moved from ``OUTBOX_FLOWER_BASIC_AUTH`` to Flower's ``FLOWER_BASIC_AUTH``."""
    config = flower_config(settings_env)
    child = {
        name: value
        for name, value in settings_env.items()
        if name not in _FLOWER_ENV_OWNED and name != ENV_BASIC_AUTH
    }
    if config.credentials:
        child["FLOWER_BASIC_AUTH"] = ",".join(config.credentials)
    return child


def __getattr__(name: str) -> Any:
    """``celery -A config.flower``: the app, set up for the Flower process (lazily, so
    importing `flower_argv` changes nothing)."""
    if name == "app":
        from config.celery import app
        from tasks.masking import install_send_masking

        # What Flower sends by name shows in its task list from the start (the worker
        # itself sends no task-sent events: config/celery.py).
        app.conf.task_send_sent_event = True
        return install_send_masking(app)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
