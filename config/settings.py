"""Outbox's settings: read from the environment in one place, validated when built.

Every other module receives a `Settings` (or the values it needs); nothing else reads
`os.environ`. A wrong value fails at start with a sentence naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

#: Where the embedded defaults keep their files (SQLite database, broker, dev key).
DEFAULT_VAR_DIR = Path("var")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class SettingsError(ValueError):
    """A configuration variable is missing or malformed; the message names it."""


def parse_duration(value: str, *, name: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h`` or ``7d``."""
    match = _DURATION.match(value)
    if not match:
        raise SettingsError(
            f"{name}={value!r} is not a duration: use seconds (90) or a number with "
            "a unit (90s, 15m, 24h, 7d)."
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise SettingsError(f"{name}={value!r} must be greater than zero.")
    return seconds


def default_concurrency() -> int:
    """Two worker processes per core (bench/README.md: one per core left the cores idle
    while each process waited on the database and the SMTP server)."""
    return 2 * (os.cpu_count() or 1)


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number.") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}.")
    return value


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return parse_duration(raw, name=name)


def _bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a yes/no value: use 1 or 0.")


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    raw = (env.get(name) or "").strip() or default
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if not scheme or not any(scheme == s or scheme.startswith(s + "+") for s in schemes):
        raise SettingsError(
            f"{name}={raw!r} is not a supported URL: expected one of "
            + ", ".join(f"{s}://..." for s in schemes)
            + "."
        )
    return raw


BACKUP_PROVIDERS = ("sendgrid", "postmark", "mailgun")


@dataclass(frozen=True)
class Settings:
    """Everything Outbox can be configured with. Durations are seconds."""

    database_url: str
    broker_url: str
    result_backend: str
    #: Fernet keys, newest first; the first encrypts, all decrypt (rotation).
    secret_keys: tuple[str, ...] = field(repr=False)
    secret_key_is_generated: bool
    retry_window_s: float = 24 * 3600.0
    retry_base_s: float = 60.0
    retry_max_s: float = 2 * 3600.0
    #: Waits up to this long ride on a Celery countdown; longer ones are parked in the
    #: database and woken by the sweeper (Redis redelivers ETA tasks past its visibility
    #: timeout, and every ETA task sits in worker memory).
    countdown_max_s: float = 300.0
    sweep_interval_s: float = 15.0
    #: After a wake-up is sent, how long before the sweeper assumes it was lost.
    wake_grace_s: float = 60.0
    smtp_timeout_s: float = 30.0
    #: How long a drain's claim on its mail and connection slot lasts without renewal;
    #: its worker renews it every third of this while it works (worker.lease), so a dead
    #: worker's mail is freed by the sweeper soon after.
    lease_s: float = 30.0
    max_message_bytes: int = 25 * 1024 * 1024
    max_recipients: int = 100
    smtp_max_per_connection: int = 100
    #: A drain sends at most this many messages of one account, then yields its worker.
    drain_batch: int = 50
    #: ... and starts no new message after this many seconds.
    drain_seconds: float = 2.0
    #: How far ahead `send_at` may lie.
    send_at_horizon_s: float = 30 * 86400.0
    default_max_connections: int = 2
    #: Worker processes per `outbox worker` / `celery worker`: a send spends most of its
    #: time waiting on PostgreSQL and on the SMTP server, so more than one per core.
    concurrency: int = field(default_factory=default_concurrency)
    #: First pause for an account whose server answered 421 / 4.7.x; doubles per repeat.
    throttle_base_s: float = 30.0
    backup_provider: str | None = None
    backup_api_key: str | None = field(default=None, repr=False)
    backup_api_url: str | None = None
    backup_from: str | None = None
    backup_mailgun_domain: str | None = None
    backup_retry_window_s: float = 3600.0
    #: First backoff cap of the provider's 429/5xx retries; it doubles per retry.
    backup_retry_base_s: float = 30.0
    #: Largest backoff cap of the provider's retries.
    backup_retry_max_s: float = 600.0
    backup_timeout_s: float = 15.0
    log_json: bool = False
    var_dir: Path = DEFAULT_VAR_DIR
    #: The exporter (`outbox metrics`) names at most this many accounts per metric; the
    #: rest are summed up as `account="_other"` (Prometheus' cost grows with every series).
    metrics_max_accounts: int = 200
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9464
    #: Global events URL: accounts without their own webhook post their events here.
    events_webhook: str | None = None
    #: Webhook secrets (`whsec_...`); all of them sign (rotation).
    events_secrets: tuple[str, ...] = field(default=(), repr=False)
    #: Allow webhook hosts on private/loopback/link-local addresses and plain http.
    events_allow_private: bool = False
    #: A failing destination is retried with backoff this long, then marked failing.
    events_retry_window_s: float = 24 * 3600.0
    #: Events per webhook POST.
    events_batch: int = 100
    #: How often beat runs the webhook dispatcher.
    events_interval_s: float = 5.0
    #: HTTP timeout of one webhook POST.
    events_timeout_s: float = 15.0

    @property
    def secret_key_warning(self) -> str | None:
        """What to warn of when a stored password is encrypted or decrypted with the
        generated development key; None with OUTBOX_SECRET_KEY set. Said there, not
        here: most commands never touch a password."""
        if not self.secret_key_is_generated:
            return None
        return (
            f"OUTBOX_SECRET_KEY is not set: using the development key in "
            f"{self.var_dir / 'secret.key'}. Set OUTBOX_SECRET_KEY in production."
        )

    @property
    def is_embedded(self) -> bool:
        """True when running on the no-server defaults (SQLite database and broker)."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("sqla+")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        var_dir = Path(env.get("OUTBOX_VAR_DIR") or DEFAULT_VAR_DIR)
        database_url = _url(
            env,
            "OUTBOX_DATABASE_URL",
            f"sqlite:///{var_dir / 'outbox.sqlite3'}",
            ("sqlite", "postgresql", "postgres"),
        )
        if database_url.startswith("postgres://") or database_url.startswith("postgresql://"):
            # SQLAlchemy needs the driver named; psycopg 3 is the one we ship.
            database_url = "postgresql+psycopg://" + database_url.split("://", 1)[1]
        broker_url = _url(
            env,
            "OUTBOX_BROKER_URL",
            f"sqla+sqlite:///{var_dir / 'broker.sqlite3'}",
            ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqla", "memory"),
        )
        default_backend = (
            broker_url
            if broker_url.startswith(("redis", "rediss"))
            else f"db+sqlite:///{var_dir / 'results.sqlite3'}"
        )
        result_backend = (env.get("OUTBOX_RESULT_BACKEND") or "").strip() or default_backend

        keys_raw = (env.get("OUTBOX_SECRET_KEY") or "").strip()
        generated = False
        if keys_raw:
            keys = tuple(k.strip() for k in keys_raw.split(",") if k.strip())
        else:
            keys = (_development_key(var_dir),)
            generated = True
        for index, key in enumerate(keys):
            _check_fernet_key(key, index)

        provider = (env.get("OUTBOX_BACKUP_PROVIDER") or "").strip().lower() or None
        if provider is not None and provider not in BACKUP_PROVIDERS:
            raise SettingsError(
                f"OUTBOX_BACKUP_PROVIDER={provider!r} is not supported: use "
                + ", ".join(BACKUP_PROVIDERS)
                + " or leave it empty."
            )
        api_key = (env.get("OUTBOX_BACKUP_API_KEY") or "").strip() or None
        backup_from = (env.get("OUTBOX_BACKUP_FROM") or "").strip() or None
        mailgun_domain = (env.get("OUTBOX_BACKUP_MAILGUN_DOMAIN") or "").strip() or None
        if provider and not api_key:
            raise SettingsError(
                f"OUTBOX_BACKUP_API_KEY is required when OUTBOX_BACKUP_PROVIDER={provider}."
            )
        if provider and not backup_from:
            raise SettingsError(
                "OUTBOX_BACKUP_FROM is required when a backup provider is set: the address "
                "verified at the provider that fallback mail is sent from."
            )
        if provider == "mailgun" and not mailgun_domain:
            raise SettingsError(
                "OUTBOX_BACKUP_MAILGUN_DOMAIN is required for the mailgun provider."
            )

        settings = cls(
            database_url=database_url,
            broker_url=broker_url,
            result_backend=result_backend,
            secret_keys=keys,
            secret_key_is_generated=generated,
            retry_window_s=_duration(env, "OUTBOX_RETRY_WINDOW", 24 * 3600.0),
            retry_base_s=_duration(env, "OUTBOX_RETRY_BASE", 60.0),
            retry_max_s=_duration(env, "OUTBOX_RETRY_MAX", 2 * 3600.0),
            countdown_max_s=_duration(env, "OUTBOX_COUNTDOWN_MAX", 300.0),
            sweep_interval_s=_duration(env, "OUTBOX_SWEEP_INTERVAL", 15.0),
            wake_grace_s=_duration(env, "OUTBOX_WAKE_GRACE", 60.0),
            smtp_timeout_s=_duration(env, "OUTBOX_SMTP_TIMEOUT", 30.0),
            lease_s=_duration(env, "OUTBOX_LEASE", 30.0),
            max_message_bytes=_int(env, "OUTBOX_MAX_MESSAGE_BYTES", 25 * 1024 * 1024, minimum=1024),
            max_recipients=_int(env, "OUTBOX_MAX_RECIPIENTS", 100),
            smtp_max_per_connection=_int(env, "OUTBOX_SMTP_MAX_PER_CONNECTION", 100),
            drain_batch=_int(env, "OUTBOX_DRAIN_BATCH", 50),
            drain_seconds=_duration(env, "OUTBOX_DRAIN_SECONDS", 2.0),
            send_at_horizon_s=_duration(env, "OUTBOX_SEND_AT_HORIZON", 30 * 86400.0),
            default_max_connections=_int(env, "OUTBOX_DEFAULT_MAX_CONNECTIONS", 2),
            concurrency=_int(env, "OUTBOX_CONCURRENCY", default_concurrency()),
            throttle_base_s=_duration(env, "OUTBOX_THROTTLE_BASE", 30.0),
            backup_provider=provider,
            backup_api_key=api_key,
            backup_api_url=(env.get("OUTBOX_BACKUP_API_URL") or "").strip() or None,
            backup_from=backup_from,
            backup_mailgun_domain=mailgun_domain,
            backup_retry_window_s=_duration(env, "OUTBOX_BACKUP_RETRY_WINDOW", 3600.0),
            # Defaults follow the SMTP retry settings when those are shorter (compressed
            # windows in tests and the demo): never a backup backoff longer than SMTP's.
            backup_retry_base_s=_duration(
                env,
                "OUTBOX_BACKUP_RETRY_BASE",
                min(30.0, _duration(env, "OUTBOX_RETRY_BASE", 60.0)),
            ),
            backup_retry_max_s=_duration(
                env,
                "OUTBOX_BACKUP_RETRY_MAX",
                min(600.0, _duration(env, "OUTBOX_RETRY_MAX", 7200.0)),
            ),
            backup_timeout_s=_duration(env, "OUTBOX_BACKUP_TIMEOUT", 15.0),
            log_json=_bool(env, "OUTBOX_LOG_JSON"),
            var_dir=var_dir,
            metrics_max_accounts=_int(env, "OUTBOX_METRICS_MAX_ACCOUNTS", 200, minimum=0),
            metrics_address=(env.get("OUTBOX_METRICS_ADDRESS") or "").strip() or "127.0.0.1",
            metrics_port=_int(env, "OUTBOX_METRICS_PORT", 9464, minimum=0),
            **cls._events(env),  # type: ignore[arg-type]
        )
        settings._check_consistency()
        return settings

    @staticmethod
    def _events(env: Mapping[str, str]) -> dict[str, object]:
        from worker.webhook_signing import secret_problem, url_problem

        allow_private = _bool(env, "OUTBOX_EVENTS_ALLOW_PRIVATE")
        url = (env.get("OUTBOX_EVENTS_WEBHOOK") or "").strip() or None
        if url is not None:
            problem = url_problem(url, allow_private=allow_private)
            if problem:
                raise SettingsError(f"OUTBOX_EVENTS_WEBHOOK={url!r} {problem}.")
        secrets = tuple(
            s.strip() for s in (env.get("OUTBOX_EVENTS_SECRET") or "").split(",") if s.strip()
        )
        for index, secret in enumerate(secrets):
            problem = secret_problem(secret)
            if problem:
                where = "OUTBOX_EVENTS_SECRET" + (f" (secret #{index + 1})" if index else "")
                raise SettingsError(f"{where} is not a valid webhook secret: it {problem}.")
        window = _duration(env, "OUTBOX_EVENTS_RETRY_WINDOW", 24 * 3600.0)
        if window < 24 * 3600.0:
            raise SettingsError(
                f"OUTBOX_EVENTS_RETRY_WINDOW ({window:g}s) must be at least 24h (86400): "
                "a receiver that is down for a day must still get its events."
            )
        batch = _int(env, "OUTBOX_EVENTS_BATCH", 100)
        if batch > 1000:
            raise SettingsError(f"OUTBOX_EVENTS_BATCH ({batch}) must be at most 1000.")
        return {
            "events_webhook": url,
            "events_secrets": secrets,
            "events_allow_private": allow_private,
            "events_retry_window_s": window,
            "events_batch": batch,
            "events_interval_s": _duration(env, "OUTBOX_EVENTS_INTERVAL", 5.0),
            "events_timeout_s": _duration(env, "OUTBOX_EVENTS_TIMEOUT", 15.0),
        }

    def _check_consistency(self) -> None:
        if self.retry_base_s > self.retry_max_s:
            raise SettingsError(
                f"OUTBOX_RETRY_BASE ({self.retry_base_s:g}s) is larger than "
                f"OUTBOX_RETRY_MAX ({self.retry_max_s:g}s)."
            )
        if self.lease_s < 3.0:
            raise SettingsError(
                f"OUTBOX_LEASE ({self.lease_s:g}s) must be at least 3s: a drain renews its "
                "lease every third of it, and a renewal is a database round trip."
            )
        if self.broker_url.startswith(("amqp", "pyamqp")) and self.countdown_max_s >= 1800:
            raise SettingsError(
                f"OUTBOX_COUNTDOWN_MAX ({self.countdown_max_s:g}s) must stay under RabbitMQ's "
                "consumer_timeout (30 min by default): a worker holds a countdown unacked "
                "until it is due, and RabbitMQ closes the channel of a delivery held longer."
            )
        if self.metrics_port > 65535:
            raise SettingsError(f"OUTBOX_METRICS_PORT ({self.metrics_port}) is not a port.")
        if self.drain_batch > 1000:
            raise SettingsError(
                f"OUTBOX_DRAIN_BATCH ({self.drain_batch}) must be at most 1000: a drain "
                "holds its whole batch under one lease."
            )


def _check_fernet_key(key: str, index: int) -> None:
    from cryptography.fernet import Fernet

    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        where = "OUTBOX_SECRET_KEY" if index == 0 else f"OUTBOX_SECRET_KEY (key #{index + 1})"
        raise SettingsError(
            f"{where} is not a valid key: it must be 32 url-safe base64-encoded bytes "
            "(make one with `outbox secret-key`)."
        ) from None


def _development_key(var_dir: Path) -> str:
    """A key kept under var/ so a developer's stored passwords survive restarts."""
    from cryptography.fernet import Fernet

    path = var_dir / "secret.key"
    if path.exists():
        key = path.read_text().strip()
    else:
        var_dir.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key().decode()
        path.touch(mode=0o600)
        path.write_text(key + "\n")
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once from the environment."""
    return Settings.from_env()
