"""Fixtures of the e2e tier: running service instances and HTTP clients for them.

- ``service_factory`` (session): starts instances on demand, one per configuration.
- ``service`` / ``api``: the default instance (HOLD_TTL_SECONDS=120).
- ``short_ttl_service`` / ``short_ttl_api``: HOLD_TTL_SECONDS=2, ORDER_PAYMENT_TTL_SECONDS=3.
- ``signed_service`` / ``signed_api``: WEBHOOK_SECRET set.
- ``http``: an aiohttp session with no connection limit (real concurrency).

When a test fails, the tail of its instance's process logs is added to the report.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.e2e.harness import Api, ServiceFactory, ServiceInstance
from tests.private_servers import PrivateRedisCluster
from tests.services import require_mysql, require_redis

SHORT_TTL = {"HOLD_TTL_SECONDS": "2", "ORDER_PAYMENT_TTL_SECONDS": "3"}
WEBHOOK_SECRET = secrets.token_hex(16)


def cluster_variant() -> bool:
    """``FLASHSALE_E2E_CLUSTER=1``: every instance's data plane on a private Redis Cluster."""
    return os.environ.get("FLASHSALE_E2E_CLUSTER", "").strip() not in ("", "0")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    """A local 3-primary Redis Cluster, started for the session and removed after it."""
    with PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def service_factory(tmp_path_factory: pytest.TempPathFactory,
                    request: pytest.FixtureRequest) -> Iterator[ServiceFactory]:
    cluster = request.getfixturevalue("redis_cluster") if cluster_variant() else None
    factory = ServiceFactory(
        mysql_url=require_mysql(),
        redis_url=require_redis(),
        log_root=tmp_path_factory.mktemp("e2e-services"),
        cluster_url=cluster.url if cluster is not None else None,
    )
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def service(service_factory: ServiceFactory) -> ServiceInstance:
    return service_factory.get()


@pytest.fixture(scope="session")
def short_ttl_service(service_factory: ServiceFactory) -> ServiceInstance:
    return service_factory.get(**SHORT_TTL)


@pytest.fixture(scope="session")
def signed_service(service_factory: ServiceFactory) -> ServiceInstance:
    return service_factory.get(WEBHOOK_SECRET=WEBHOOK_SECRET)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, service: ServiceInstance) -> Api:
    return Api(http, service)


@pytest.fixture
def short_ttl_api(http: aiohttp.ClientSession, short_ttl_service: ServiceInstance) -> Api:
    return Api(http, short_ttl_service)


@pytest.fixture
def signed_api(http: aiohttp.ClientSession, signed_service: ServiceInstance) -> Api:
    return Api(http, signed_service)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        for used in _instances_of(item):
            report.sections.append((f"service logs: {used.name}", used.diagnostics(40)))
    return report


def _instances_of(item: pytest.Item) -> list[ServiceInstance]:
    found: list[ServiceInstance] = []
    for value in getattr(item, "funcargs", {}).values():
        candidate = value.service if isinstance(value, Api) else value
        if isinstance(candidate, ServiceInstance) and all(candidate is not f for f in found):
            found.append(candidate)
    return found
