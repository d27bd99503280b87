"""Payment webhooks: one effect per idempotency key, final orders never change, signatures."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

from tests.e2e.harness import (
    Api,
    Reply,
    assert_errors_name,
    assert_problem,
    parse_timestamp,
    sign_webhook,
)
from tests.random_refs import random_event_id

pytestmark = pytest.mark.e2e

SETTLE_TIMEOUT = 10.0  # a pending webhook applied once its order exists (scheduler retries)


def assert_outcome(reply: Reply, status: int, key: str, order_id: str, **members: str) -> None:
    assert reply.status == status, reply
    assert reply.media_type == "application/json", reply.headers.get("Content-Type")
    expected = {"idempotency_key": key, "order_id": order_id, **members}
    assert {k: reply.body.get(k) for k in expected} == expected, reply.body


async def order_status(api: Api, order_id: str) -> str:
    reply = await api.get(f"/api/orders/{order_id}")
    assert reply.status == 200, reply
    status: str = reply.body["status"]
    return status


async def wait_order_status(api: Api, order_id: str, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (current := await order_status(api, order_id)) != status:
        assert time.monotonic() < deadline, f"order {order_id} still {current}, want {status}"
        await asyncio.sleep(0.1)


async def test_paid_webhook_sells_the_units_once(api: Api) -> None:
    pid = (await api.create_product(stock=10))["id"]
    order = await api.new_order(pid, 2)
    oid, key = order["order_id"], random_event_id()
    extra: dict[str, Any] = {"provider": "acme", "amount": 3998}  # extra fields are ignored

    first = await api.webhook(oid, "paid", key=key, extra=extra)
    assert_outcome(first, 200, key, oid, outcome="applied", order_status="paid")
    assert await order_status(api, oid) == "paid"
    await api.wait_product(pid, stock=8, available=8)

    again = await api.webhook(oid, "paid", key=key, extra=extra)
    assert (again.status, again.body) == (first.status, first.body)

    assert_problem(await api.webhook(oid, "failed", key=key, extra=extra), 422)

    late_key = random_event_id()
    late = await api.webhook(oid, "failed", key=late_key)
    assert_outcome(late, 200, late_key, oid, outcome="ignored", order_status="paid")
    assert await order_status(api, oid) == "paid"
    await api.wait_product(pid, stock=8, available=8)
    hold = await api.get(f"/api/holds/{order['hold_id']}")
    assert hold.body["status"] == "converted", hold.body


async def test_failed_webhook_cancels_the_order_and_releases_the_units(api: Api) -> None:
    pid = (await api.create_product(stock=10))["id"]
    order = await api.new_order(pid, 2)
    oid, key = order["order_id"], random_event_id()
    await api.wait_product(pid, stock=10, available=8)

    reply = await api.webhook(oid, "failed", key=key)
    assert_outcome(reply, 200, key, oid, outcome="applied", order_status="cancelled")
    assert await order_status(api, oid) == "cancelled"
    await api.wait_product(pid, stock=10, available=10)

    late_key = random_event_id()
    late = await api.webhook(oid, "paid", key=late_key)
    assert_outcome(late, 200, late_key, oid, outcome="ignored", order_status="cancelled")
    assert await order_status(api, oid) == "cancelled"
    await api.wait_product(pid, stock=10, available=10)
    hold = await api.get(f"/api/holds/{order['hold_id']}")
    assert hold.body["status"] == "converted", hold.body


async def test_webhook_for_unknown_order_is_stored_pending(api: Api) -> None:
    oid, key = f"ord-unknown-{uuid.uuid4().hex}", random_event_id()
    first = await api.webhook(oid, "paid", key=key)
    assert_outcome(first, 202, key, oid, outcome="pending")
    again = await api.webhook(oid, "paid", key=key)
    assert (again.status, again.body) == (first.status, first.body)


async def test_webhook_that_arrives_before_its_order_is_applied_when_the_order_exists(
    api: Api,
) -> None:
    pid = (await api.create_product(stock=5))["id"]
    hold = await api.new_hold(pid, 1)
    accepted = await api.order(hold["hold_id"], prefer="respond-async")
    assert accepted.status == 202, accepted
    oid, key = accepted.body["order_id"], random_event_id()

    early = await api.webhook(oid, "paid", key=key)
    if early.status == 202:
        assert_outcome(early, 202, key, oid, outcome="pending")
    else:  # the order was already created: applied directly
        assert_outcome(early, 200, key, oid, outcome="applied", order_status="paid")

    created = await api.settle(accepted)
    assert created.status == 201 and created.body["order_id"] == oid, created
    await wait_order_status(api, oid, "paid", SETTLE_TIMEOUT)
    await api.wait_product(pid, stock=4, available=4)

    replay = await api.webhook(oid, "paid", key=key)
    assert_outcome(replay, 200, key, oid, outcome="applied", order_status="paid")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"idempotency_key": "evt_invalid", "order_id": "o", "status": "refunded"}, "status"),
        ({"idempotency_key": "evt_invalid", "status": "paid"}, "order_id"),
        ({"order_id": "o", "status": "paid"}, "idempotency_key"),
        ({"idempotency_key": 7, "order_id": "o", "status": "paid"}, "idempotency_key"),
    ],
    ids=["bad-status", "no-order", "no-key", "key-not-string"],
)
async def test_invalid_webhook_body_is_422(api: Api, body: dict[str, Any], field: str) -> None:
    problem = assert_problem(await api.post("/api/payments/webhook", body, prefer=None), 422)
    assert_errors_name(problem, field)


async def test_order_not_paid_in_time_is_cancelled_and_a_late_payment_ignored(
    short_ttl_api: Api,
) -> None:
    api = short_ttl_api
    ttl = api.service.setting("ORDER_PAYMENT_TTL_SECONDS")
    pid = (await api.create_product(stock=5))["id"]
    order = await api.new_order(pid, 2)
    received = time.time()
    pay_by = parse_timestamp(order["pay_by"])

    await asyncio.sleep(max(0.0, pay_by - time.time()) + 0.01)
    assert await order_status(api, order["order_id"]) == "cancelled"
    # API.md: past pay_by, the units return to available within 5 seconds.
    await api.wait_product(pid, timeout=received + ttl + 5 - time.time(), stock=5, available=5)

    key = random_event_id()
    late = await api.webhook(order["order_id"], "paid", key=key)
    assert_outcome(late, 200, key, order["order_id"], outcome="ignored", order_status="cancelled")
    assert await order_status(api, order["order_id"]) == "cancelled"
    await api.wait_product(pid, stock=5, available=5)
    hold = await api.get(f"/api/holds/{order['hold_id']}")
    assert hold.body["status"] == "converted", hold.body

    # API.md: that payment is listed for refund by the operator command.
    refunds = await asyncio.to_thread(api.service.run_command, "flashsale refunds")
    assert refunds.returncode == 0, refunds.stderr
    assert order["order_id"] in refunds.stdout and key in refunds.stdout, refunds.stdout


# --- signatures (WEBHOOK_SECRET set) ------------------------------------------------------


def raw_webhook(key: str, order_id: str, status: str) -> bytes:
    return json.dumps({"idempotency_key": key, "order_id": order_id, "status": status}).encode()


async def test_signed_webhooks_reject_bad_signatures_and_store_nothing(signed_api: Api) -> None:
    api = signed_api
    secret = api.service.webhook_secret
    assert secret
    pid = (await api.create_product(stock=3))["id"]
    order = await api.new_order(pid, 1)
    oid, key = order["order_id"], random_event_id()
    now = int(time.time())
    raw = raw_webhook(key, oid, "failed")

    bad_signatures: dict[str, str | None] = {
        "missing": None,
        "garbage": "not a signature",
        "wrong-secret": sign_webhook(secret + "x", raw, now),
        "other-body": sign_webhook(secret, raw_webhook(key, oid, "paid"), now),
        "stale": sign_webhook(secret, raw, now - 400),
        "future": sign_webhook(secret, raw, now + 400),
    }
    for case, signature in bad_signatures.items():
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-Webhook-Signature"] = signature
        reply = await api.request("POST", "/api/payments/webhook", data=raw, headers=headers)
        assert reply.status == 401, f"{case}: {reply}"
        assert_problem(reply, 401)

    assert await order_status(api, oid) == "pending_payment"
    # Nothing was stored under the key: a different body with it is a first request.
    good = await api.webhook(oid, "paid", key=key)
    assert_outcome(good, 200, key, oid, outcome="applied", order_status="paid")
    await api.wait_product(pid, stock=2, available=2)
