"""Operations endpoints: health, metrics and the OpenAPI document, on every gateway."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Api

pytestmark = pytest.mark.e2e


async def test_healthz_is_200_on_every_gateway(api: Api) -> None:
    for gateway in range(len(api.service.web_urls)):
        reply = await api.get("/healthz", gateway=gateway)
        assert reply.status == 200, reply


async def test_metrics_is_prometheus_text(api: Api) -> None:
    await api.get("/healthz")  # at least one request counted somewhere
    reply = await api.get("/metrics")
    assert reply.status == 200, reply
    assert reply.media_type == "text/plain", reply.headers.get("Content-Type")
    assert "# TYPE " in reply.raw.decode(), reply.raw[:300]


async def test_openapi_document_describes_the_api(api: Api) -> None:
    reply = await api.get("/api/openapi.json")
    assert reply.status == 200, reply
    assert reply.media_type == "application/json", reply.headers.get("Content-Type")
    document = reply.body
    assert isinstance(document, dict), reply
    assert str(document.get("openapi", "")).startswith("3."), document.get("openapi")
    paths = document.get("paths", {})
    for path in ("/api/holds", "/api/orders", "/api/payments/webhook", "/api/admin/products"):
        assert path in paths, f"{path} missing from {sorted(paths)}"
