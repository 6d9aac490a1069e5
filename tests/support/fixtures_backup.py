"""pytest fixtures for the backup provider adapters: a provider stub and an adapter aimed at it.

A test module loads them with ``pytest_plugins = ("tests.support.fixtures_backup",)``.
`provider_stub` runs each test once per provider; narrow it with
``@pytest.mark.parametrize("provider_stub", ["postmark"], indirect=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from standins.provider import PROVIDERS, ProviderStub
from worker.backup import BackupProvider, make_provider

#: The adapter's timeout in these tests: short, so scripted timeouts stay quick.
ADAPTER_TIMEOUT_S = 2.0


@pytest.fixture(params=PROVIDERS)
def provider_stub(request: pytest.FixtureRequest) -> Iterator[ProviderStub]:
    """A running `ProviderStub` for the provider named by the parameter."""
    with ProviderStub(request.param) as stub:
        yield stub


def adapter_for(
    stub: ProviderStub,
    *,
    timeout_s: float = ADAPTER_TIMEOUT_S,
    api_key: str | None = None,
    base_url: str | None = None,
    mailgun_domain: str | None = None,
) -> BackupProvider:
    """An adapter for the stub's provider: the stub's key, base URL and domain by default."""
    return make_provider(
        stub.provider,
        api_key=stub.api_key if api_key is None else api_key,
        base_url=base_url or stub.base_url,
        mailgun_domain=mailgun_domain or stub.mailgun_domain,
        timeout_s=timeout_s,
    )


#: ``make_adapter(timeout_s=0.5, api_key="wrong")``: an adapter for `provider_stub` with
#: some settings changed, closed after the test.
AdapterFactory = Callable[..., BackupProvider]


@pytest.fixture
def make_adapter(provider_stub: ProviderStub) -> Iterator[AdapterFactory]:
    """A factory of adapters for `provider_stub`, each closed after the test."""
    made: list[BackupProvider] = []

    def make(**overrides: Any) -> BackupProvider:
        adapter = adapter_for(provider_stub, **overrides)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


@pytest.fixture
def backup_adapter(make_adapter: AdapterFactory) -> BackupProvider:
    """The adapter for `provider_stub`'s provider, closed after the test."""
    return make_adapter()
