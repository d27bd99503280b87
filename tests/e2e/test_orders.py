"""Orders: one per hold, priced from the product, the hold becomes converted."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.harness import (
    Api,
    assert_errors_name,
    assert_location,
    assert_problem,
    mutate_id,
    parse_timestamp,
)

pytestmark = pytest.mark.e2e


async def test_order_converts_the_hold_and_a_second_order_returns_the_first(api: Api) -> None:
    ttl = api.service.setting("ORDER_PAYMENT_TTL_SECONDS")
    pid = (await api.create_product(stock=10, price_cents=1999, currency="EUR"))["id"]
    hold = await api.new_hold(pid, 3)

    sent = time.time()
    reply = await api.order(hold["hold_id"])
    received = time.time()
    assert reply.status == 201, reply
    order = reply.body
    assert_location(reply, f"/api/orders/{order['order_id']}")
    assert isinstance(order["order_id"], str) and order["order_id"], order
    assert order["hold_id"] == hold["hold_id"], order
    assert order["product_id"] == pid and order["qty"] == 3, order
    assert order["amount_cents"] == 3 * 1999 and order["currency"] == "EUR", order
    assert order["status"] == "pending_payment", order
    pay_by = parse_timestamp(order["pay_by"])
    assert sent + ttl - 1 <= pay_by <= received + ttl + 1, order

    converted = await api.get(f"/api/holds/{hold['hold_id']}")
    assert converted.status == 200, converted
    assert converted.body["status"] == "converted", converted.body
    assert converted.body["order_id"] == order["order_id"], converted.body

    fetched = await api.get(f"/api/orders/{order['order_id']}")
    assert fetched.status == 200 and fetched.body == order, fetched

    second = await api.settle(await api.order(hold["hold_id"]))
    assert second.status == 200, second
    assert second.body == order, second

    # Units stay reserved by the unpaid order; nothing is sold yet.
    await api.wait_product(pid, stock=10, available=7)


async def test_order_for_unknown_hold_is_404(api: Api) -> None:
    pid = (await api.create_product(stock=1))["id"]
    hold = await api.new_hold(pid, 1)
    for hold_id in (mutate_id(hold["hold_id"]), f"no-such-hold-{uuid.uuid4().hex}"):
        reply = await api.settle(await api.order(hold_id))
        assert_problem(reply, 404)
    await api.wait_product(pid, stock=1, available=0)


async def test_unknown_order_is_404(api: Api) -> None:
    order = await api.new_order((await api.create_product(stock=1))["id"])
    for order_id in (mutate_id(order["order_id"]), f"no-such-order-{uuid.uuid4().hex}"):
        assert_problem(await api.get(f"/api/orders/{order_id}"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "hold_id"),
        ({"hold_id": 12}, "hold_id"),
        ({"hold_id": None}, "hold_id"),
        ({"hold_id": "h", "coupon": "FREE"}, "coupon"),
    ],
    ids=["missing", "wrong-type", "null", "unknown-field"],
)
async def test_invalid_order_body_is_422(api: Api, body: dict[str, object], field: str) -> None:
    problem = assert_problem(await api.post("/api/orders", body), 422)
    assert_errors_name(problem, field)
