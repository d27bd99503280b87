"""Holds expire by time (HOLD_TTL_SECONDS=2): never reported active afterwards, units come back."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.harness import Api, assert_problem, parse_timestamp

pytestmark = pytest.mark.e2e


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()) + 0.01)


async def test_expired_hold_is_expired_releases_its_units_and_cannot_be_ordered(
    short_ttl_api: Api,
) -> None:
    api = short_ttl_api
    ttl = api.service.setting("HOLD_TTL_SECONDS")
    pid = (await api.create_product(stock=5))["id"]
    before = (await api.wait_product(pid, available=5))["available"]

    sent = time.time()
    reply = await api.settle(await api.hold(pid, 2))
    received = time.time()
    assert reply.status == 201, reply
    hold = reply.body
    assert hold["status"] == "active", hold
    expires = parse_timestamp(hold["expires_at"])
    assert sent + ttl - 1 <= expires <= received + ttl + 1, (sent, hold["expires_at"], received)

    current = await api.get(f"/api/holds/{hold['hold_id']}")
    assert current.status == 200, current
    if time.time() < expires:  # the server looked before expires_at
        assert current.body["status"] == "active", current

    await sleep_until(expires)
    expired = await api.get(f"/api/holds/{hold['hold_id']}")
    assert expired.status == 200, expired
    assert expired.body["status"] == "expired", expired.body
    assert expired.body["hold_id"] == hold["hold_id"] and expired.body["qty"] == 2, expired.body

    # API.md invariant 3: the units are available again within HOLD_TTL_SECONDS + 5 s.
    await api.wait_product(pid, timeout=received + ttl + 5 - time.time(), available=before)

    order = await api.settle(await api.order(hold["hold_id"]))
    assert_problem(order, 409, "Hold has expired")
    after = await api.get(f"/api/holds/{hold['hold_id']}")
    assert after.body["status"] == "expired", after.body
    product = await api.product(pid)
    assert (product["stock"], product["available"]) == (5, before), product


async def test_sold_out_product_sells_again_once_holds_expire(short_ttl_api: Api) -> None:
    api = short_ttl_api
    ttl = api.service.setting("HOLD_TTL_SECONDS")
    pid = (await api.create_product(stock=2))["id"]

    hold = await api.new_hold(pid, 2)
    received = time.time()
    refused = await api.settle(await api.hold(pid, 1))
    assert_problem(refused, 409, "Insufficient stock")

    await sleep_until(parse_timestamp(hold["expires_at"]))
    await api.wait_product(pid, timeout=received + ttl + 5 - time.time(), available=2)
    again = await api.settle(await api.hold(pid, 1))
    assert again.status == 201, again
