"""Unit tests for config.settings: defaults, parsing, and refusals that name the variable."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from config.settings import Settings, SettingsError, parse_duration

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose generated files (the dev key, SQLite files) live in tmp."""
    return {"OUTBOX_VAR_DIR": str(tmp_path)}


def _settings(base_env: dict[str, str], **values: str) -> Settings:
    return Settings.from_env({**base_env, **values})


def _refusal(base_env: dict[str, str], **values: str) -> str:
    with pytest.raises(SettingsError) as info:
        _settings(base_env, **values)
    return str(info.value)


# --- Defaults ---------------------------------------------------------------------------


def test_defaults_with_an_empty_environment(base_env, tmp_path):
    settings = Settings.from_env(base_env)
    assert settings.database_url == f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"
    assert settings.result_backend == f"db+sqlite:///{tmp_path / 'results.sqlite3'}"
    assert settings.is_embedded is True
    assert settings.retry_window_s == 24 * 3600
    assert settings.retry_base_s == 60
    assert settings.retry_max_s == 2 * 3600
    assert settings.smtp_timeout_s == 30
    assert settings.lease_s == 30
    assert settings.drain_batch == 50
    assert settings.drain_seconds == 2
    assert settings.send_at_horizon_s == 30 * 86400
    assert settings.max_message_bytes == 25 * 1024 * 1024
    assert settings.max_recipients == 100
    assert settings.backup_provider is None
    assert settings.log_json is False
    assert settings.var_dir == tmp_path


def test_missing_secret_key_generates_a_private_development_key(base_env, tmp_path):
    settings = Settings.from_env(base_env)
    key_file = tmp_path / "secret.key"
    assert settings.secret_key_is_generated is True
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == settings.secret_keys[0]
    Fernet(settings.secret_keys[0].encode())  # a usable key

    again = Settings.from_env(base_env)
    assert again.secret_keys == settings.secret_keys


def test_development_key_directory_is_created(tmp_path):
    var_dir = tmp_path / "nested" / "var"
    settings = Settings.from_env({"OUTBOX_VAR_DIR": str(var_dir)})
    assert (var_dir / "secret.key").exists()
    assert settings.secret_key_is_generated is True


def test_configured_secret_key_is_used_and_no_file_written(base_env, tmp_path):
    settings = _settings(base_env, OUTBOX_SECRET_KEY=KEY_A)
    assert settings.secret_keys == (KEY_A,)
    assert settings.secret_key_is_generated is False
    assert not (tmp_path / "secret.key").exists()


def test_several_comma_separated_keys_are_accepted_newest_first(base_env):
    settings = _settings(base_env, OUTBOX_SECRET_KEY=f" {KEY_B} , {KEY_A},")
    assert settings.secret_keys == (KEY_B, KEY_A)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("not-a-key", "OUTBOX_SECRET_KEY is not a valid key"),
        (f"{KEY_A},short", "OUTBOX_SECRET_KEY (key #2) is not a valid key"),
    ],
)
def test_invalid_secret_key_names_the_variable(base_env, value, where):
    message = _refusal(base_env, OUTBOX_SECRET_KEY=value)
    assert where in message
    assert "outbox secret-key" in message


# --- Durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        (" 90s ", 90),
        ("15m", 900),
        ("24h", 86_400),
        ("7d", 604_800),
        ("1.5h", 5_400),
        ("500ms", 0.5),
    ],
)
def test_parse_duration_accepts_seconds_and_units(text, seconds):
    assert parse_duration(text, name="OUTBOX_RETRY_WINDOW") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "-5", "0", "0s", "5x", "h", "1 h 30 m", ""])
def test_parse_duration_refuses_bad_values_naming_the_variable(text):
    with pytest.raises(SettingsError) as info:
        parse_duration(text, name="OUTBOX_RETRY_WINDOW")
    assert f"OUTBOX_RETRY_WINDOW={text!r}" in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "OUTBOX_RETRY_WINDOW",
        "OUTBOX_SWEEP_INTERVAL",
        "OUTBOX_BACKUP_TIMEOUT",
        "OUTBOX_DRAIN_SECONDS",
        "OUTBOX_SEND_AT_HORIZON",
    ],
)
def test_bad_duration_in_the_environment_names_the_variable(base_env, name):
    message = _refusal(base_env, **{name: "soon"})
    assert message.startswith(f"{name}='soon'")


def test_durations_from_the_environment_are_read(base_env):
    settings = _settings(
        base_env,
        OUTBOX_RETRY_WINDOW="10s",
        OUTBOX_RETRY_BASE="1",
        OUTBOX_RETRY_MAX="4s",
        OUTBOX_SMTP_TIMEOUT="5",
        OUTBOX_LEASE="30",
    )
    assert (settings.retry_window_s, settings.retry_base_s, settings.retry_max_s) == (10, 1, 4)
    assert (settings.smtp_timeout_s, settings.lease_s) == (5, 30)


def test_empty_value_means_the_default(base_env):
    assert _settings(base_env, OUTBOX_RETRY_WINDOW="  ").retry_window_s == 24 * 3600


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("OUTBOX_MAX_RECIPIENTS", "many", "not a whole number"),
        ("OUTBOX_MAX_RECIPIENTS", "0", "at least 1"),
        ("OUTBOX_MAX_MESSAGE_BYTES", "100", "at least 1024"),
        ("OUTBOX_LOG_JSON", "maybe", "yes/no"),
        ("OUTBOX_CONCURRENCY", "0", "at least 1"),
        ("OUTBOX_CONCURRENCY", "four", "not a whole number"),
    ],
)
def test_bad_numbers_and_flags_name_the_variable(base_env, name, value, words):
    message = _refusal(base_env, **{name: value})
    assert message.startswith(f"{name}={value!r}")
    assert words in message


def test_concurrency_defaults_to_two_processes_per_core(base_env, monkeypatch):
    monkeypatch.setattr("config.settings.os.cpu_count", lambda: 3)
    assert Settings.from_env(base_env).concurrency == 6
    assert _settings(base_env, OUTBOX_CONCURRENCY="5").concurrency == 5


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OUTBOX_DATABASE_URL", "mysql://db/outbox"),
        ("OUTBOX_DATABASE_URL", "outbox.sqlite3"),
        ("OUTBOX_DATABASE_URL", "postgresqlx://db/outbox"),
        ("OUTBOX_BROKER_URL", "kafka://broker:9092"),
        ("OUTBOX_BROKER_URL", "localhost:6379"),
    ],
)
def test_unsupported_url_schemes_name_the_variable(base_env, name, value):
    message = _refusal(base_env, **{name: value})
    assert message.startswith(f"{name}={value!r} is not a supported URL")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgres://u:p@db:5432/outbox", "postgresql+psycopg://u:p@db:5432/outbox"),
        ("postgresql://u:p@db/outbox", "postgresql+psycopg://u:p@db/outbox"),
        ("postgresql+psycopg://u@db/outbox", "postgresql+psycopg://u@db/outbox"),
    ],
)
def test_postgres_urls_get_the_psycopg_driver(base_env, value, expected):
    assert _settings(base_env, OUTBOX_DATABASE_URL=value).database_url == expected


def test_redis_broker_is_also_the_result_backend_by_default(base_env):
    settings = _settings(base_env, OUTBOX_BROKER_URL="redis://127.0.0.1:6379/3")
    assert settings.broker_url == "redis://127.0.0.1:6379/3"
    assert settings.result_backend == "redis://127.0.0.1:6379/3"
    assert settings.is_embedded is False


# --- Backup provider --------------------------------------------------------------------

BACKUP = {
    "OUTBOX_BACKUP_PROVIDER": "sendgrid",
    "OUTBOX_BACKUP_API_KEY": "SG.secret-api-key",
    "OUTBOX_BACKUP_FROM": "fallback@example.com",
}


def test_complete_backup_provider_is_accepted(base_env):
    settings = _settings(base_env, **{**BACKUP, "OUTBOX_BACKUP_PROVIDER": " SendGrid "})
    assert settings.backup_provider == "sendgrid"
    assert settings.backup_api_key == "SG.secret-api-key"
    assert settings.backup_from == "fallback@example.com"


def test_mailgun_with_domain_is_accepted(base_env):
    settings = _settings(
        base_env,
        **{
            **BACKUP,
            "OUTBOX_BACKUP_PROVIDER": "mailgun",
            "OUTBOX_BACKUP_MAILGUN_DOMAIN": "mg.example.com",
        },
    )
    assert settings.backup_mailgun_domain == "mg.example.com"


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"OUTBOX_BACKUP_PROVIDER": "mailchimp"}, "OUTBOX_BACKUP_PROVIDER"),
        ({"OUTBOX_BACKUP_API_KEY": ""}, "OUTBOX_BACKUP_API_KEY"),
        ({"OUTBOX_BACKUP_FROM": "  "}, "OUTBOX_BACKUP_FROM"),
        ({"OUTBOX_BACKUP_PROVIDER": "mailgun"}, "OUTBOX_BACKUP_MAILGUN_DOMAIN"),
    ],
    ids=["unknown-provider", "no-api-key", "no-from", "mailgun-no-domain"],
)
def test_incomplete_backup_configuration_names_the_variable(base_env, changes, variable):
    message = _refusal(base_env, **{**BACKUP, **changes})
    assert message.startswith(variable)


def test_backup_api_key_is_not_in_the_repr(base_env):
    settings = _settings(base_env, **BACKUP)
    assert "SG.secret-api-key" not in repr(settings)
    assert "backup_api_key=" not in repr(settings)


def test_secret_keys_are_not_in_the_repr(base_env):
    settings = _settings(base_env, OUTBOX_SECRET_KEY=f"{KEY_B},{KEY_A}")
    assert KEY_A not in repr(settings)
    assert KEY_B not in repr(settings)


# --- Consistency ------------------------------------------------------------------------


def test_retry_base_larger_than_retry_max_is_refused(base_env):
    message = _refusal(base_env, OUTBOX_RETRY_BASE="3h", OUTBOX_RETRY_MAX="2h")
    assert "OUTBOX_RETRY_BASE" in message
    assert "OUTBOX_RETRY_MAX" in message


def test_lease_shorter_than_three_seconds_is_refused(base_env):
    message = _refusal(base_env, OUTBOX_LEASE="2s")
    assert "OUTBOX_LEASE" in message
    assert "renews" in message


def test_a_lease_shorter_than_the_smtp_timeout_is_fine_because_drains_renew_it(base_env):
    settings = _settings(base_env, OUTBOX_SMTP_TIMEOUT="60", OUTBOX_LEASE="3s")
    assert (settings.smtp_timeout_s, settings.lease_s) == (60, 3)


@pytest.mark.parametrize(("value", "words"), [("1001", "at most 1000"), ("0", "at least 1")])
def test_drain_batch_out_of_range_is_refused(base_env, value, words):
    message = _refusal(base_env, OUTBOX_DRAIN_BATCH=value)
    assert "OUTBOX_DRAIN_BATCH" in message
    assert words in message


def test_a_countdown_longer_than_rabbitmqs_consumer_timeout_is_refused(base_env):
    message = _refusal(
        base_env, OUTBOX_BROKER_URL="amqp://guest:guest@rabbit:5672//", OUTBOX_COUNTDOWN_MAX="45m"
    )
    assert "OUTBOX_COUNTDOWN_MAX" in message and "consumer_timeout" in message
    # On Redis the same wait is fine (its visibility timeout is an hour).
    assert _settings(base_env, OUTBOX_COUNTDOWN_MAX="45m").countdown_max_s == 2700


# --- The metrics exporter ---------------------------------------------------------------


def test_metrics_exporter_settings(base_env):
    settings = _settings(base_env)
    assert (settings.metrics_address, settings.metrics_port) == ("127.0.0.1", 9464)
    assert settings.metrics_max_accounts == 200
    # 0 names no account: every account-labelled metric is one `_other` series.
    assert _settings(base_env, OUTBOX_METRICS_MAX_ACCOUNTS="0").metrics_max_accounts == 0
    assert "OUTBOX_METRICS_MAX_ACCOUNTS" in _refusal(base_env, OUTBOX_METRICS_MAX_ACCOUNTS="-1")
    assert "OUTBOX_METRICS_PORT" in _refusal(base_env, OUTBOX_METRICS_PORT="70000")
    assert "OUTBOX_METRICS_PORT" in _refusal(base_env, OUTBOX_METRICS_PORT="http")
