"""pytest fixtures for the scripted SMTP server (`standins.smtp`).

Not a conftest: load with ``pytest_plugins = ["tests.support.fixtures_smtp"]`` (or
import the fixtures) where needed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from standins.smtp import ScriptedSMTPServer, TestCA, make_test_ca

#: The account the `smtp_server` fixture accepts.
SMTP_USER = "acct"
SMTP_PASSWORD = "s3cret"


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A test CA and a server certificate for localhost / 127.0.0.1, once per session."""
    return make_test_ca(tmp_path_factory.mktemp("smtp-ca"))


@pytest.fixture
def smtp_server(test_ca: TestCA) -> Iterator[ScriptedSMTPServer]:
    """STARTTLS (certificate from `test_ca`) and AUTH required: user "acct", "s3cret"."""
    with ScriptedSMTPServer(
        tls="starttls", auth={SMTP_USER: SMTP_PASSWORD}, certs=test_ca
    ) as server:
        yield server


@pytest.fixture
def plain_smtp_server() -> Iterator[ScriptedSMTPServer]:
    """No TLS, no AUTH: accepts mail from anyone."""
    with ScriptedSMTPServer(tls="none") as server:
        yield server
