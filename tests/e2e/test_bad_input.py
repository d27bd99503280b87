"""Bad input gets a 4xx problem document (never a 5xx) and changes nothing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.e2e.harness import Api, Reply, assert_errors_name, assert_problem

pytestmark = pytest.mark.e2e

LIMIT = 64 * 1024
WRITE_PATHS = ["/api/holds", "/api/orders", "/api/payments/webhook", "/api/admin/products"]
UNKNOWN_PRODUCT = 987_654_321


async def send(api: Api, path: str, data: bytes, content_type: str | None) -> Reply:
    headers = {**api.admin_headers(), "Prefer": "wait=30"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return await api.request("POST", path, data=data, headers=headers)


@pytest.mark.parametrize("path", WRITE_PATHS)
async def test_malformed_json_is_400(api: Api, path: str) -> None:
    assert_problem(await send(api, path, b'{"product_id": 1, "qty": ', "application/json"), 400)


@pytest.mark.parametrize("path", WRITE_PATHS)
@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"product_id=1&qty=1", "application/x-www-form-urlencoded"),
        (b'{"product_id": 1, "qty": 1}', "text/plain"),
        (b'{"product_id": 1, "qty": 1}', None),
    ],
    ids=["form", "text-plain", "no-content-type"],
)
async def test_body_that_is_not_json_is_415(
    api: Api, path: str, data: bytes, content_type: str | None
) -> None:
    assert_problem(await send(api, path, data, content_type), 415)


@pytest.mark.parametrize("path", WRITE_PATHS)
async def test_body_over_64_kib_is_413(api: Api, path: str) -> None:
    # Well-formed JSON padded with whitespace past the limit: the size alone must decide.
    data = b'{"hold_id": "h", "product_id": 1, "qty": 1}' + b" " * LIMIT
    assert_problem(await send(api, path, data, "application/json"), 413)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"qty": 1}, "product_id"),
        ({"product_id": "PID"}, "qty"),
        ({"product_id": "PID", "qty": 1, "color": "red"}, "color"),
        ({"product_id": "abc", "qty": 1}, "product_id"),
        ({"product_id": "PID", "qty": "two"}, "qty"),
        ({"product_id": "PID", "qty": 1.5}, "qty"),
        ({"product_id": "PID", "qty": None}, "qty"),
        ({"product_id": "PID", "qty": 0}, "qty"),
        ({"product_id": "PID", "qty": -1}, "qty"),
        ({"product_id": "PID", "qty": "MAX+1"}, "qty"),
    ],
    ids=[
        "no-product",
        "no-qty",
        "unknown-field",
        "product-not-int",
        "qty-string",
        "qty-float",
        "qty-null",
        "qty-0",
        "qty-negative",
        "qty-over-max",
    ],
)
async def test_invalid_hold_is_422_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    pid = (await api.create_product(stock=20))["id"]
    limit = api.service.setting("MAX_QTY_PER_HOLD")
    body = {k: pid if v == "PID" else limit + 1 if v == "MAX+1" else v for k, v in body.items()}
    problem = assert_problem(await api.settle(await api.post("/api/holds", body)), 422)
    assert_errors_name(problem, field)


@pytest.mark.parametrize(
    "body", [[1, 2], "hold", 42, None], ids=["array", "string", "number", "null"]
)
async def test_json_that_is_not_an_object_is_422(api: Api, body: Any) -> None:
    reply = await api.request(
        "POST",
        "/api/holds",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    problem = assert_problem(reply, 422)
    assert problem.get("errors"), problem


async def test_max_qty_is_allowed(api: Api) -> None:
    limit = api.service.setting("MAX_QTY_PER_HOLD")
    pid = (await api.create_product(stock=limit))["id"]
    assert (await api.settle(await api.hold(pid, limit))).status == 201


async def test_unknown_product_is_404(api: Api) -> None:
    assert_problem(await api.get(f"/api/products/{UNKNOWN_PRODUCT}"), 404)
    assert_problem(await api.settle(await api.hold(UNKNOWN_PRODUCT, 1)), 404)
    assert_problem(await api.get("/api/holds/no-such-hold"), 404)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/nope", 404),
        ("GET", "/no/such/page", 404),
        ("POST", "/api/products", 404),
        ("DELETE", "/api/holds", 405),
        ("GET", "/api/holds", 405),
        ("PUT", "/api/payments/webhook", 405),
        ("POST", "/api/products/1", 405),
    ],
)
async def test_unknown_route_and_wrong_method_are_problems(
    api: Api, method: str, path: str, status: int
) -> None:
    assert_problem(await api.request(method, path), status)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic YWRtaW46YWRtaW4=", "Bearer "],
    ids=["missing", "wrong-token", "wrong-scheme", "empty-token"],
)
async def test_admin_without_the_token_is_401(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    body = {"name": "x", "price_cents": 100, "currency": "USD", "stock": 1}
    assert_problem(await api.post("/api/admin/products", body, headers=headers), 401)
    product = await api.create_product(stock=3)
    restock = await api.post(
        f"/api/admin/products/{product['id']}/restock", {"qty": 5}, headers=headers
    )
    assert_problem(restock, 401)
    await api.wait_product(product["id"], stock=3, available=3)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "price_cents": 100, "currency": "USD", "stock": -1}, "stock"),
        ({"name": "x", "price_cents": "cheap", "currency": "USD", "stock": 1}, "price_cents"),
        ({"price_cents": 100, "currency": "USD", "stock": 1}, "name"),
        ({"name": "x", "price_cents": 100, "currency": "USD", "stock": 1, "x": 1}, "x"),
    ],
    ids=["negative-stock", "price-string", "no-name", "unknown-field"],
)
async def test_invalid_admin_body_is_422(api: Api, body: dict[str, Any], field: str) -> None:
    reply = await api.post("/api/admin/products", body, headers=api.admin_headers())
    assert_errors_name(assert_problem(reply, 422), field)


async def test_bad_requests_change_nothing(api: Api) -> None:
    """Every kind of bad request at one product, then its stock and holds are untouched."""
    limit = api.service.setting("MAX_QTY_PER_HOLD")
    product = await api.create_product(stock=5)
    pid = product["id"]
    hold = await api.new_hold(pid, 1)
    json_type = {"Content-Type": "application/json"}
    bad: list[Reply] = await asyncio.gather(
        api.request("POST", "/api/holds", data=b"{", headers=json_type),
        api.request("POST", "/api/holds", data=b"qty=1", headers={"Content-Type": "text/plain"}),
        api.request(
            "POST",
            "/api/holds",
            data=json.dumps({"product_id": pid, "qty": 1}).encode() + b" " * LIMIT,
            headers=json_type,
        ),
        *(api.post("/api/holds", {"product_id": pid, "qty": q}) for q in (0, -3, limit + 1)),
        api.post("/api/holds", {"product_id": pid, "qty": 1, "extra": True}),
        api.post("/api/holds", {"product_id": pid, "qty": 1}, key=""),
        api.post("/api/orders", {"hold_id": hold["hold_id"], "extra": 1}),
        api.request("POST", "/api/orders", data=b"{", headers=json_type),
        api.post(f"/api/admin/products/{pid}/restock", {"qty": 0}, headers=api.admin_headers()),
        api.post(f"/api/admin/products/{pid}/restock", {"qty": 5}),
        api.request("DELETE", f"/api/products/{pid}"),
    )
    for reply in bad:
        assert 400 <= reply.status < 500, reply
        assert_problem(reply, reply.status)
    await asyncio.sleep(1.0)  # API.md: the cache reflects any commit within 1 s
    after = await api.product(pid)
    assert (after["stock"], after["available"]) == (5, 4), after
    current = await api.get(f"/api/holds/{hold['hold_id']}")
    assert {k: current.body.get(k) for k in hold} == hold, current
