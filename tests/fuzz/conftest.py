"""Fixtures of the fuzz tier: real deployments, and schemathesis pointed at their documents.

Each deployment comes from the e2e harness (release, two webs, two workers and a scheduler
from the Procfile, a fresh MariaDB database, its own Redis database), with ``ADMIN_TOKEN``
(the harness makes one) and ``WEBHOOK_SECRET`` set, so admin operations and signed
webhooks are exercised too. ``shop`` runs with the other settings at their defaults;
``customers`` adds customer tokens, a per-customer limit and a rate limit (high enough
not to refuse the fuzzer). Schemathesis reads ``GET /api/openapi.json`` from the running
instance: the document under test is the one the service serves for that configuration.
One deployment runs at a time.

The run is bounded and reproducible: a fixed seed (``FUZZ_SEED``), deterministic
generation, no example database, at most ``FUZZ_MAX_EXAMPLES`` fuzzed cases per operation
besides the examples and coverage phases, and ``FUZZ_STATEFUL_SCENARIOS`` linked scenarios.
Set ``FUZZ_SEED`` to explore.

When MariaDB or Redis is missing the tier is skipped, and under CI it fails (``tests.services``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
import schemathesis

from tests.e2e.harness import ServiceFactory, ServiceInstance
from tests.random_refs import random_product_name
from tests.services import require_mysql, require_redis

SEED = int(os.environ.get("FUZZ_SEED") or 20261124)
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES") or 100)
WEBHOOK_SECRET = secrets.token_hex(16)
CUSTOMER_JWT_SECRET = secrets.token_hex(32)
CUSTOMER = "fuzz-customer"
WEBHOOK_PATH = "/api/payments/webhook"
REQUEST_TIMEOUT_S = 30
# Products that exist before fuzzing starts, so generated holds (ids 1, 2, ...) find them.
SEEDED_PRODUCTS = 2
SEEDED_STOCK = 1_000_000

DEPLOYMENTS: dict[str, dict[str, str]] = {
    "shop": {"WEBHOOK_SECRET": WEBHOOK_SECRET},
    "customers": {
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "CUSTOMER_JWT_SECRET": CUSTOMER_JWT_SECRET,
        "MAX_QTY_PER_CUSTOMER": "100",
        "RATE_LIMIT_PER_MINUTE": "1000000",
    },
}

# Every built-in check; `max_response_time` is left out (waits are the client's choice).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "object_level_authorization",
)


@pytest.fixture(scope="session")
def fuzz_seed() -> int:
    """The seed of every generator of the tier (``FUZZ_SEED``)."""
    return SEED


@pytest.fixture(scope="session")
def fuzz_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceFactory]:
    factory = ServiceFactory(
        mysql_url=require_mysql(),
        redis_url=require_redis(),
        log_root=tmp_path_factory.mktemp("fuzz-services"),
    )
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session", params=list(DEPLOYMENTS))
def fuzz_service(
    request: pytest.FixtureRequest, fuzz_factory: ServiceFactory
) -> Iterator[ServiceInstance]:
    """A running deployment of its own; stopped before the next one starts."""
    instance = fuzz_factory.get(f"fuzz-{request.param}", **DEPLOYMENTS[request.param])
    yield instance
    fuzz_factory.discard(instance)


def customer_token(instance: ServiceInstance) -> str | None:
    """A valid customer JWT for the deployment, when it uses them."""
    secret = instance.env.get("CUSTOMER_JWT_SECRET")
    if not secret:
        return None
    claims = {"sub": CUSTOMER, "exp": int(time.time()) + 24 * 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture(scope="session")
def served_document(fuzz_service: ServiceInstance) -> dict[str, Any]:
    """``GET /api/openapi.json`` of the running instance."""
    response = requests.get(f"{fuzz_service.web_urls[0]}/api/openapi.json",
                            timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"openapi.json: {response.status_code} {response.text}"
    document: dict[str, Any] = response.json()
    return document


def documented_pattern(document: dict[str, Any], parameter: str) -> re.Pattern[str]:
    """The ``pattern`` of a parameter component of the document."""
    return re.compile(document["components"]["parameters"][parameter]["schema"]["pattern"])


class SigningSession(requests.Session):
    """A session that signs webhooks the way a payment provider would.

    Schemathesis can't compute an HMAC, so a webhook without ``X-Webhook-Signature``, or
    with one that matches the documented pattern, is signed here for the bytes it sends:
    the body is fuzzed past the signature check. A malformed signature goes out as
    generated and must be answered 401 (a missing one is the e2e tier's business).
    """

    def __init__(self, secret: str, shape: re.Pattern[str]) -> None:
        super().__init__()
        self.secret = secret
        self.shape = shape

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        signature = request.headers.get("X-Webhook-Signature")
        body = request.body if request.body is not None else b""
        if (
            (signature is None or (isinstance(signature, str) and self.shape.fullmatch(signature)))
            and isinstance(body, (bytes, str))
            and request.path_url.split("?")[0] == WEBHOOK_PATH
        ):
            raw = body.encode() if isinstance(body, str) else body
            request.headers["X-Webhook-Signature"] = sign(self.secret, raw)
        return super().send(request, **kwargs)


def sign(secret: str, raw_body: bytes) -> str:
    """``t=<now>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`` (API.md)."""
    t = int(time.time())
    digest = hmac.new(secret.encode(), f"{t}.".encode() + raw_body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


@pytest.fixture(scope="session")
def fuzz_session(served_document: dict[str, Any]) -> Iterator[requests.Session]:
    shape = documented_pattern(served_document, "X-Webhook-Signature")
    with SigningSession(WEBHOOK_SECRET, shape) as session:
        yield session


@pytest.fixture(scope="session")
def seeded_products(fuzz_service: ServiceInstance, fuzz_session: requests.Session) -> list[int]:
    """Products created through the admin API before the fuzzer runs (ids 1, 2, ...)."""
    created = []
    for _ in range(SEEDED_PRODUCTS):
        response = fuzz_session.post(
            f"{fuzz_service.web_urls[0]}/api/admin/products",
            json={"name": random_product_name("fuzz"), "price_cents": 1999, "currency": "USD",
                  "stock": SEEDED_STOCK},
            headers={"Authorization": f"Bearer {fuzz_service.admin_token}", "Prefer": "wait=30"},
            timeout=REQUEST_TIMEOUT_S,
        )
        assert response.status_code == 201, f"seed product: {response.status_code} {response.text}"
        created.append(int(response.json()["id"]))
    return created


def fuzz_config(instance: ServiceInstance) -> schemathesis.Config:
    """Schemathesis' configuration for one deployment (the dict is schemathesis.toml's)."""
    auth = {"adminToken": {"bearer": instance.admin_token}}
    token = customer_token(instance)
    if token is not None:
        auth["customerToken"] = {"bearer": token}
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "base-url": instance.web_urls[0],
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {
            "mode": "all",  # positive and negative data
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "checks": {name: {"enabled": True} for name in CHECKS},
        # Failures print the whole request: the tokens and keys are this run's own.
        "output": {"sanitization": {"enabled": False}},
        "auth": {"openapi": auth},
    })


@pytest.fixture(scope="session")
def fuzz_schema(fuzz_service: ServiceInstance, seeded_products: list[int]) -> Any:
    """The service's own OpenAPI document, as served, loaded by schemathesis."""
    return schemathesis.openapi.from_url(
        f"{fuzz_service.web_urls[0]}/api/openapi.json",
        config=fuzz_config(fuzz_service),
        timeout=REQUEST_TIMEOUT_S,
    )


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4.32's lazy loader reads ``node._nodeid``, which pytest 9.2 renamed.

    It only uses it to name each operation's subtest and puts it back afterwards, so
    the public ``nodeid`` is a faithful stand-in. Remove once schemathesis reads ``nodeid``.
    """
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed fuzz test shows the tail of the service's process logs."""
    report = yield
    if report.when == "call" and report.failed:
        service = getattr(item, "funcargs", {}).get("fuzz_service")
        if isinstance(service, ServiceInstance):
            report.sections.append((f"service logs: {service.name}", service.diagnostics(40)))
    return report
