"""Idempotency-Key on holds and orders: one effect per key, replays answer the same."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.e2e.harness import Api, ServiceFactory, assert_problem
from tests.random_refs import random_idempotency_key

pytestmark = pytest.mark.e2e

REUSED = "Idempotency-Key reused with a different request"
CACHE_LAG = 1.0  # API.md: the product cache reflects a committed operation within 1 s
INVALID_KEYS = {"empty": "", "quoted-empty": '""', "256-chars": "k" * 256}


async def assert_available_stays(api: Api, pid: int, available: int) -> None:
    """``available`` reaches ``available`` and is still there once the cache caught up."""
    await api.wait_product(pid, available=available)
    await asyncio.sleep(CACHE_LAG)
    product = await api.product(pid)
    assert product["available"] == available, product


# --- holds ---


@pytest.mark.parametrize("quoted_first", [False, True], ids=["bare-first", "quoted-first"])
async def test_hold_replayed_with_the_same_key_creates_nothing(
    api: Api, quoted_first: bool
) -> None:
    pid = (await api.create_product(stock=10))["id"]
    key = random_idempotency_key("hold")
    bare, quoted = key, f'"{key}"'
    first = await api.settle(await api.hold(pid, 2, key=quoted if quoted_first else bare))
    assert first.status == 201, first

    for variant in (bare, quoted, bare):
        again = await api.settle(await api.hold(pid, 2, key=variant))
        assert (again.status, again.body) == (first.status, first.body), variant

    await assert_available_stays(api, pid, 8)


async def test_hold_key_reused_with_another_body_is_422(api: Api) -> None:
    pid = (await api.create_product(stock=10))["id"]
    key = random_idempotency_key("hold")
    first = await api.settle(await api.hold(pid, 2, key=key))
    assert first.status == 201, first

    assert_problem(await api.settle(await api.hold(pid, 3, key=key)), 422, REUSED)
    assert_problem(await api.settle(await api.hold(pid, 3, key=f'"{key}"')), 422, REUSED)
    await assert_available_stays(api, pid, 8)


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
async def test_invalid_hold_key_is_400_and_holds_nothing(api: Api, key: str) -> None:
    pid = (await api.create_product(stock=10))["id"]
    assert_problem(await api.hold(pid, 1, key=key), 400)
    await assert_available_stays(api, pid, 10)


async def test_255_character_key_is_accepted(api: Api) -> None:
    pid = (await api.create_product(stock=10))["id"]
    key = random_idempotency_key("long").ljust(255, "k")
    first = await api.settle(await api.hold(pid, 1, key=key))
    assert first.status == 201, first
    again = await api.settle(await api.hold(pid, 1, key=key))
    assert (again.status, again.body) == (first.status, first.body)


async def test_async_hold_replayed_while_queued_names_the_same_job(api: Api) -> None:
    pid = (await api.create_product(stock=5))["id"]
    key = random_idempotency_key("async")
    first = await api.hold(pid, 1, key=key, prefer="respond-async")
    assert first.status == 202, first
    again = await api.hold(pid, 1, key=key, prefer="respond-async")
    # Still queued: the same 202 (same job). Already done: API.md's "same result" could
    # also be read as the final 201 of that job; either way it is the same hold.
    if again.status == 202:
        assert again.body["job_id"] == first.body["job_id"], (first.body, again.body)
    else:
        assert again.status == 201 and again.body["hold_id"] == first.body["hold_id"], again

    done = await api.settle(first)
    assert done.status == 201 and done.body["hold_id"] == first.body["hold_id"], done
    await assert_available_stays(api, pid, 4)


# --- orders ---


async def test_order_replayed_with_the_same_key_answers_the_first_result(api: Api) -> None:
    pid = (await api.create_product(stock=10))["id"]
    hold = await api.new_hold(pid, 2)
    key = random_idempotency_key("order")
    first = await api.settle(await api.order(hold["hold_id"], key=key))
    assert first.status == 201, first

    for variant in (key, f'"{key}"'):
        again = await api.settle(await api.order(hold["hold_id"], key=variant))
        assert (again.status, again.body) == (first.status, first.body), variant

    # Without the key it is a new request: the hold's one order, 200.
    plain = await api.settle(await api.order(hold["hold_id"]))
    assert (plain.status, plain.body) == (200, first.body), plain
    await assert_available_stays(api, pid, 8)


async def test_order_key_reused_for_another_hold_is_422(api: Api) -> None:
    pid = (await api.create_product(stock=10))["id"]
    hold, other = await api.new_hold(pid, 1), await api.new_hold(pid, 1)
    key = random_idempotency_key("order")
    first = await api.settle(await api.order(hold["hold_id"], key=key))
    assert first.status == 201, first

    assert_problem(await api.settle(await api.order(other["hold_id"], key=key)), 422, REUSED)
    untouched = await api.get(f"/api/holds/{other['hold_id']}")
    assert untouched.body["status"] == "active", untouched.body


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
async def test_invalid_order_key_is_400_and_orders_nothing(api: Api, key: str) -> None:
    hold = await api.new_hold((await api.create_product(stock=10))["id"], 1)
    assert_problem(await api.order(hold["hold_id"], key=key), 400)
    unchanged = await api.get(f"/api/holds/{hold['hold_id']}")
    assert unchanged.body["status"] == "active", unchanged.body


# --- replays after the result left the Redis cache ---


async def test_replay_after_the_cached_result_expired_answers_from_the_database(
    http: aiohttp.ClientSession, service_factory: ServiceFactory
) -> None:
    """JOB_CACHE_SECONDS=1: the replay finds the result in the database, not by deciding
    again (which, the product being sold out by then, would refuse)."""
    api = Api(http, service_factory.get("short-job-cache", JOB_CACHE_SECONDS="1"))
    pid = (await api.create_product(stock=2))["id"]
    key = random_idempotency_key("hold")
    first = await api.settle(await api.hold(pid, 2, key=key))
    assert first.status == 201, first
    await asyncio.sleep(2.5)  # the job key has expired; the Idempotency-Key has not

    replay = await api.settle(await api.hold(pid, 2, key=key))
    assert (replay.status, replay.body) == (201, first.body), replay
    await assert_available_stays(api, pid, 0)
