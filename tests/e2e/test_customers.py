"""Customers and fairness (API.md): tokens, ownership, the exact per-customer limit and
the rate limit, against the Procfile processes in both deployment styles."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import jwt
import pytest

from tests.e2e.harness import Api, Reply, ServiceFactory, ServiceInstance, assert_problem

pytestmark = pytest.mark.e2e

SECRET = secrets.token_hex(16)
LIMIT = 4
RATE = 30
TOKENS = {"CUSTOMER_JWT_SECRET": SECRET, "MAX_QTY_PER_CUSTOMER": str(LIMIT),
          "RATE_LIMIT_PER_MINUTE": str(RATE)}
BODY = {"MAX_QTY_PER_CUSTOMER": str(LIMIT), "RATE_LIMIT_PER_MINUTE": str(RATE),
        "HOLD_TTL_SECONDS": "2", "ORDER_PAYMENT_TTL_SECONDS": "3"}


def token(customer: str, *, secret: str = SECRET, expires_in: int = 300,
          **claims: Any) -> str:
    payload = {"sub": customer, "exp": int(time.time()) + expires_in, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret,
                      algorithm="HS256")


def customer() -> str:
    return f"cust-{uuid.uuid4().hex[:12]}"


class Customer:
    """An Api whose writes and reads carry one customer's bearer token."""

    def __init__(self, api: Api, name: str) -> None:
        self.api, self.name = api, name
        self.auth = {"Authorization": f"Bearer {token(name)}"}

    async def hold(self, product_id: int, qty: int = 1, *, key: str | None = None,
                   gateway: int | None = None, prefer: str = "wait=30") -> Reply:
        return await self.api.post("/api/holds", {"product_id": product_id, "qty": qty},
                                   key=key, headers=self.auth, gateway=gateway, prefer=prefer)

    async def order(self, hold_id: str) -> Reply:
        return await self.api.post("/api/orders", {"hold_id": hold_id}, headers=self.auth)

    async def get(self, path: str) -> Reply:
        return await self.api.request("GET", path, headers=self.auth)


@pytest.fixture(scope="module")
def token_service(service_factory: ServiceFactory) -> ServiceInstance:
    return service_factory.get("tokens", **TOKENS)


@pytest.fixture(scope="module")
def body_service(service_factory: ServiceFactory) -> ServiceInstance:
    return service_factory.get("customer-body", **BODY)


@pytest.fixture
def tapi(http: aiohttp.ClientSession, token_service: ServiceInstance) -> Api:
    return Api(http, token_service)


@pytest.fixture
def bapi(http: aiohttp.ClientSession, body_service: ServiceInstance) -> Api:
    return Api(http, body_service)


def assert_bearer_401(reply: Reply) -> None:
    assert_problem(reply, 401)
    assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer"), reply.headers


# --- tokens ----------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [
    None,
    "Bearer",
    "Basic dXNlcjpwYXNz",
    "Bearer not.a.jwt",
    "Bearer " + token("c1", secret="another-secret-" + "x" * 32),
    "Bearer " + token("c1", expires_in=-60),
    "Bearer " + token("c1", exp=None),
    "Bearer " + token("", ),
    "Bearer " + token("x" * 65),
    "Bearer " + token("caf\u00e9"),
])
async def test_holds_and_orders_need_a_valid_token(tapi: Api,
                                                   authorization: str | None) -> None:
    pid = (await tapi.create_product(stock=5))["id"]
    headers = {"Authorization": authorization} if authorization is not None else {}
    hold = await tapi.post("/api/holds", {"product_id": pid, "qty": 1}, headers=headers)
    order = await tapi.post("/api/orders", {"hold_id": f"hold_{pid}_0123456789abcdef"},
                            headers=headers)
    read = await tapi.request("GET", f"/api/holds/hold_{pid}_0123456789abcdef",
                              headers=headers)
    for reply in (hold, order, read):
        assert_bearer_401(reply)
    assert (await tapi.product(pid))["available"] == 5


async def test_with_tokens_customer_id_in_the_body_is_an_unknown_field(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=5))["id"]
    me = Customer(tapi, customer())
    reply = await tapi.post("/api/holds", {"product_id": pid, "qty": 1, "customer_id": "x"},
                            headers=me.auth)
    assert_problem(reply, 422)
    assert "customer_id" in reply.body["errors"], reply.body


async def test_holds_and_orders_belong_to_their_customer(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=10))["id"]
    alice, mallory = Customer(tapi, customer()), Customer(tapi, customer())
    hold = await alice.hold(pid, 2)
    assert hold.status == 201 and hold.body["customer_id"] == alice.name, hold
    hold_id = hold.body["hold_id"]

    assert_problem(await mallory.get(f"/api/holds/{hold_id}"), 404)
    stolen = await tapi.settle(await mallory.order(hold_id))
    assert_problem(stolen, 404)
    mine = await tapi.settle(await alice.order(hold_id))
    assert mine.status == 201 and mine.body["customer_id"] == alice.name, mine
    order_id = mine.body["order_id"]
    assert (await alice.get(f"/api/orders/{order_id}")).body["customer_id"] == alice.name
    assert_problem(await mallory.get(f"/api/orders/{order_id}"), 404)
    assert (await alice.get(f"/api/holds/{hold_id}")).body["status"] == "converted"


async def test_idempotency_keys_are_scoped_per_customer(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=10))["id"]
    one, two = Customer(tapi, customer()), Customer(tapi, customer())
    key = f"k-{uuid.uuid4().hex}"
    first, second = await one.hold(pid, 1, key=key), await two.hold(pid, 1, key=key)
    again = await one.hold(pid, 1, key=key)

    assert first.status == second.status == 201
    assert first.body["hold_id"] != second.body["hold_id"]
    assert again.body == first.body
    await tapi.wait_product(pid, available=8)


# --- the per-customer limit ------------------------------------------------------------

async def test_concurrent_holds_of_one_customer_grant_exactly_the_limit(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=100))["id"]
    me = Customer(tapi, customer())
    replies = await asyncio.gather(*[me.hold(pid, 1, gateway=n) for n in range(RATE)])

    granted = [r for r in replies if r.status == 201]
    refused = [r for r in replies if r.status == 409]
    assert len(granted) == LIMIT, [r.status for r in replies]
    assert len(refused) == RATE - LIMIT
    for reply in refused:
        assert_problem(reply, 409, "Customer limit reached")
        assert reply.body["limit"] == LIMIT and reply.body["held"] == LIMIT, reply.body
    await tapi.wait_product(pid, available=100 - LIMIT)
    # Another customer is not affected.
    assert (await Customer(tapi, customer()).hold(pid, LIMIT)).status == 201


async def test_a_cancelled_order_stops_counting(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=100))["id"]
    me = Customer(tapi, customer())
    hold = await me.hold(pid, LIMIT)
    order = await tapi.settle(await me.order(hold.body["hold_id"]))
    assert order.status == 201
    assert_problem(await me.hold(pid, 1), 409, "Customer limit reached")

    failed = await tapi.webhook(order.body["order_id"], "failed", key=f"e-{uuid.uuid4().hex}")
    assert failed.status == 200 and failed.body["order_status"] == "cancelled", failed
    assert (await me.hold(pid, LIMIT)).status == 201


async def test_paid_units_keep_counting(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=100))["id"]
    me = Customer(tapi, customer())
    hold = await me.hold(pid, 3)
    order = await tapi.settle(await me.order(hold.body["hold_id"]))
    paid = await tapi.webhook(order.body["order_id"], "paid", key=f"e-{uuid.uuid4().hex}")
    assert paid.body["order_status"] == "paid", paid

    refused = await me.hold(pid, 2)
    assert_problem(refused, 409, "Customer limit reached")
    assert refused.body["held"] == 3
    assert (await me.hold(pid, 1)).status == 201


# --- the rate limit --------------------------------------------------------------------

def rate_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    return headers.get("RateLimit-Policy", ""), headers.get("RateLimit", "")


async def test_the_rate_limit_counts_over_both_gateways_and_changes_nothing(tapi: Api) -> None:
    pid = (await tapi.create_product(stock=100))["id"]
    me = Customer(tapi, customer())
    replies = await asyncio.gather(*[me.hold(pid, 1, gateway=n) for n in range(RATE + 5)])

    limited = [r for r in replies if r.status == 429]
    assert len(limited) == 5, [r.status for r in replies]
    for reply in limited:
        assert_problem(reply, 429)
        assert int(reply.headers["Retry-After"]) >= 1
    for reply in replies:
        policy, state = rate_headers(reply.headers)
        assert policy == f'"minute";q={RATE};w=60', reply.headers
        assert state.startswith('"minute";r='), reply.headers
    assert rate_headers(limited[0].headers)[1].startswith('"minute";r=0;')
    # Only the admitted requests acted (the limit grants 4 of them).
    await tapi.wait_product(pid, available=100 - LIMIT)
    order = await tapi.post("/api/orders", {"hold_id": f"hold_{pid}_0123456789abcdef"},
                            headers=me.auth)
    assert_problem(order, 429)


async def test_rate_limited_clients_are_listed_for_the_operator(
    tapi: Api, token_service: ServiceInstance
) -> None:
    pid = (await tapi.create_product(stock=100))["id"]
    me = Customer(tapi, customer())
    await asyncio.gather(*[me.hold(pid, 1) for _ in range(RATE + 1)])
    listing = token_service.run_command("flashsale rate-limited --minutes 5")
    assert listing.returncode == 0, listing.stderr
    assert me.name in listing.stdout, listing.stdout
    top = token_service.run_command(f"flashsale customers {pid}")
    assert top.returncode == 0, top.stderr
    assert me.name in top.stdout and f" {LIMIT}" in top.stdout, top.stdout


# --- customers named by the shop's back end --------------------------------------------

async def test_without_tokens_a_limit_needs_a_customer_in_the_body(bapi: Api) -> None:
    pid = (await bapi.create_product(stock=10))["id"]
    reply = await bapi.hold(pid, 1)
    assert_problem(reply, 422)
    assert "customer_id" in reply.body["errors"], reply.body
    for bad in ("", "x" * 65, "caf\u00e9", "a b"):
        reply = await bapi.post("/api/holds", {"product_id": pid, "qty": 1, "customer_id": bad})
        assert_problem(reply, 422)


async def test_body_customers_get_the_exact_limit_and_expiry_releases_it(bapi: Api) -> None:
    pid = (await bapi.create_product(stock=100))["id"]
    who = customer()
    body = {"product_id": pid, "qty": 1, "customer_id": who}
    replies = await asyncio.gather(*[bapi.post("/api/holds", body, gateway=n)
                                     for n in range(12)])
    assert [r.status for r in replies].count(201) == LIMIT, [r.status for r in replies]
    assert all(r.body["customer_id"] == who for r in replies if r.status == 201)

    await asyncio.sleep(2.5)  # HOLD_TTL_SECONDS=2: expired holds stop counting
    again = await bapi.post("/api/holds", {**body, "qty": LIMIT})
    assert again.status == 201, again


async def test_without_a_customer_the_rate_limit_counts_the_address(bapi: Api) -> None:
    orders = [bapi.post("/api/orders", {"hold_id": f"hold_1_{n:016x}"})
              for n in range(RATE + 3)]
    replies = await asyncio.gather(*orders)
    statuses = [r.status for r in replies]
    assert statuses.count(429) >= 3, statuses
    assert all(s in (404, 429) for s in statuses), statuses


async def test_the_longest_customer_id_and_key_still_make_a_hold(bapi: Api) -> None:
    pid = (await bapi.create_product(stock=5))["id"]
    who, key = "c" * 64, "k" * 255
    body = {"product_id": pid, "qty": 1, "customer_id": who}
    first = await bapi.post("/api/holds", body, key=key)
    again = await bapi.post("/api/holds", body, key=key)
    assert first.status == 201, first
    assert again.body == first.body
