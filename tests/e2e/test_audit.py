"""``flashsale audit`` against real deployments: 0 after a mixed workload, 1 naming the
product after the database, the cache or the queues were altered behind its back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pymysql
import pytest
import redis
from rq.registry import StartedJobRegistry

from tests.e2e.harness import Api, ServiceFactory, ServiceInstance
from tests.random_refs import random_event_id
from tests.services import mysql_connect_kwargs
from workers import keys
from workers.protocol import Envelope

pytestmark = pytest.mark.e2e

SHORT_TTL = {"HOLD_TTL_SECONDS": "2", "ORDER_PAYMENT_TTL_SECONDS": "3"}


@pytest.fixture(scope="module")
def healthy(service_factory: ServiceFactory) -> Iterator[ServiceInstance]:
    instance = service_factory.get("audit-healthy", **SHORT_TTL)
    yield instance
    service_factory.discard(instance)


@pytest.fixture(scope="module")
def damaged(service_factory: ServiceFactory) -> Iterator[ServiceInstance]:
    """Altered behind its back by the tests below, each on a product of its own."""
    instance = service_factory.get("audit-damaged")
    yield instance
    service_factory.discard(instance)


def audit(instance: ServiceInstance, *args: str | int) -> tuple[int, dict[str, Any]]:
    command = " ".join(["flashsale audit --json --grace 0.5", *map(str, args)])
    done = instance.run_command(command, timeout=120)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def checks_of(report: dict[str, Any], product_id: int) -> set[str]:
    return {f["check"] for f in report["findings"] if f["product_id"] == product_id}


def sql(instance: ServiceInstance, statement: str, *params: Any) -> int:
    connection = pymysql.connect(**mysql_connect_kwargs(instance.env["DATABASE_URL"]))
    try:
        with connection.cursor() as cursor:
            return cursor.execute(statement, params)
    finally:
        connection.close()


def redis_of(instance: ServiceInstance) -> redis.Redis:
    return instance.data_redis()


async def settled(conn: redis.Redis, instance: ServiceInstance, product_id: int) -> None:
    """Wait until no drainer holds the product: the one that answered the last request
    takes one more look at its queue before it lets go, and would apply what a test
    queues behind the service's back in that moment."""
    for _ in range(200):
        if not conn.exists(instance.key(keys.lease(product_id)),
                           instance.key(keys.wake(product_id))):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"product {product_id} still held by a drainer after 10 s")


async def no_sweep_to_come(instance: ServiceInstance) -> None:
    """With the scheduler paused: wait until no sweep it enqueued before waits for a
    worker or runs (a sweep wakes products whose queue has work but no drainer)."""
    control = redis.Redis.from_url(instance.env["REDIS_URL"])
    started = StartedJobRegistry(keys.MAINTENANCE_QUEUE, connection=control)
    try:
        for _ in range(200):
            if not control.llen(keys.MAINTENANCE_JOBS) and not started.count:
                return
            await asyncio.sleep(0.05)
    finally:
        control.close()
    raise AssertionError("a sweep still waits or runs after 10 s")


async def mixed_workload(api: Api) -> list[int]:
    """Holds granted, refused and expired; orders paid, failed and timed out; a webhook
    before its order; a restock."""
    a = (await api.create_product(stock=6))["id"]
    b = (await api.create_product(stock=3, price_cents=500))["id"]
    holds = [await api.new_hold(a, 1) for _ in range(4)]
    refused = await api.settle(await api.hold(a, 5))
    assert refused.status == 409, refused
    paid = await api.settle(await api.order(holds[0]["hold_id"]))
    failed = await api.settle(await api.order(holds[1]["hold_id"]))
    early_order = keys.order_id_for(holds[2]["hold_id"])
    early = await api.webhook(early_order, "paid", key=random_event_id())
    assert early.status == 202, early  # stored until its order exists
    late = await api.settle(await api.order(holds[2]["hold_id"]))
    assert late.status == 201, late
    for order, status in ((paid, "paid"), (failed, "failed")):
        reply = await api.webhook(order.body["order_id"], status, key=random_event_id())
        assert reply.status == 200, reply
    restock = await api.settle(await api.post(f"/api/admin/products/{b}/restock", {"qty": 4},
                                              headers=api.admin_headers()))
    assert restock.status == 200, restock
    await asyncio.gather(*(api.hold(b, 2) for _ in range(5)))
    unpaid = await api.new_order(b, 1)
    assert unpaid["status"] == "pending_payment"
    # holds[3] expires (2 s) and the unpaid order times out (3 s): the sweep releases them
    await api.wait_product(a, timeout=15, stock=4, available=4)
    await api.wait_product(b, timeout=15, stock=7, available=7)
    return [a, b]


async def test_audit_is_clean_after_a_mixed_workload(
        http: aiohttp.ClientSession, healthy: ServiceInstance) -> None:
    api = Api(http, healthy)
    products = await mixed_workload(api)
    code, report = audit(healthy)
    assert code == 0, report
    assert report["ok"] is True and report["findings"] == [], report
    assert report["products"] == len(products)


async def stocked_product(api: Api, stock: int = 10, holds: int = 3) -> tuple[int, list[str]]:
    pid = (await api.create_product(stock=stock))["id"]
    held = [(await api.new_hold(pid, 1))["hold_id"] for _ in range(holds)]
    code, report = audit(api.service, "--product", pid)
    assert code == 0, report
    return pid, held


@pytest.mark.parametrize("alteration", [
    "stock_raised", "reserved_lowered", "hold_qty_changed", "hold_deleted",
    "paid_order_cancelled",
])
async def test_audit_names_a_product_altered_in_the_database(
        http: aiohttp.ClientSession, damaged: ServiceInstance, alteration: str) -> None:
    api = Api(http, damaged)
    pid, held = await stocked_product(api)
    expected = {"stock_raised": {"stock", "cache"}, "reserved_lowered": {"reserved"},
                "hold_qty_changed": {"reserved"}, "hold_deleted": {"reserved", "acknowledged"},
                "paid_order_cancelled": {"stock"}}[alteration]
    if alteration == "stock_raised":
        assert sql(damaged, "UPDATE products SET stock = stock + 3 WHERE id = %s", pid) == 1
    elif alteration == "reserved_lowered":
        assert sql(damaged, "UPDATE products SET reserved = reserved - 1 WHERE id = %s",
                   pid) == 1
    elif alteration == "hold_qty_changed":
        assert sql(damaged, "UPDATE holds SET qty = 2 WHERE id = %s", held[0]) == 1
    elif alteration == "hold_deleted":
        assert sql(damaged, "DELETE FROM holds WHERE id = %s", held[0]) == 1
    else:
        order = await api.settle(await api.order(held[0]))
        paid = await api.webhook(order.body["order_id"], "paid", key=random_event_id())
        assert paid.body["outcome"] == "applied", paid
        assert sql(damaged, "UPDATE orders SET status = 'cancelled' WHERE id = %s",
                   order.body["order_id"]) == 1
    code, report = audit(damaged, "--product", pid)
    assert code == 1, report
    assert expected <= checks_of(report, pid), report
    assert all(f["product_id"] == pid for f in report["findings"]), report
    finding = next(f for f in report["findings"] if f["check"] in expected)
    assert finding["delta"] not in (None, 0) or alteration == "stock_raised", finding


async def test_audit_repairs_a_drifted_cache(http: aiohttp.ClientSession,
                                            damaged: ServiceInstance) -> None:
    api = Api(http, damaged)
    pid, _ = await stocked_product(api)
    conn = redis_of(damaged)
    conn.hset(damaged.key(keys.product(pid)), mapping={"available": 999, "queued": 4})
    code, report = audit(damaged, "--product", pid)
    assert code == 1 and {"cache", "admission"} <= checks_of(report, pid), report
    cache = next(f for f in report["findings"] if f["check"] == "cache")
    assert (cache["expected"], cache["actual"], cache["delta"]) == (7, 999, 992), cache
    assert all(f["repair"] == "cache" for f in report["findings"]), report

    code, repaired = audit(damaged, "--product", pid, "--repair")
    assert code == 0, repaired
    assert repaired["repaired"], repaired
    assert (await api.product(pid))["available"] == 7
    assert int(conn.hget(damaged.key(keys.product(pid)), "queued") or 0) == 0
    assert audit(damaged, "--product", pid)[0] == 0


async def test_audit_finds_a_lost_wake_up_and_an_applied_request_still_queued(
        http: aiohttp.ClientSession, damaged: ServiceInstance) -> None:
    api = Api(http, damaged)
    pid, _ = await stocked_product(api, holds=1)
    applied = await api.new_hold(pid, 1)
    conn = redis_of(damaged)
    job_id = next(k.decode().rsplit(":", 1)[-1] for k in
                  conn.scan_iter(match=damaged.key(keys.job_prefix(pid)) + "*", count=1000)
                  if json.loads(conn.get(k) or b"{}").get("body", {}).get("hold_id")
                  == applied["hold_id"])
    fresh = Envelope(id=keys.new_id("job", pid), op="hold",
                     args={"product_id": pid, "qty": 1, "hold_id": keys.new_id("hold", pid)})
    await settled(conn, damaged, pid)
    with damaged.paused("scheduler"):
        await no_sweep_to_come(damaged)
        # queued behind the service's back: no wake flag, no ready list, no drainer
        again = Envelope(id=job_id, op="hold", args={"product_id": pid, "qty": 1,
                                                      "hold_id": applied["hold_id"]})
        conn.rpush(damaged.key(keys.queue(pid)), again.encode(), fresh.encode())
        code, report = audit(damaged, "--product", pid)
        assert code == 1, report
        messages = " ".join(f["message"] for f in report["findings"])
        assert "lost wake-up" in messages and "applied and still queued" in messages, report
        assert job_id in messages, report

        code, repaired = audit(damaged, "--product", pid, "--repair")
        assert any("woke" in r for r in repaired["repaired"]), repaired
    await api.wait_product(pid, timeout=15, available=7)  # the fresh hold was applied
    assert conn.llen(damaged.key(keys.queue(pid))) == 0
    assert audit(damaged, "--product", pid)[0] == 0


async def test_audit_reports_dead_letters(http: aiohttp.ClientSession,
                                         damaged: ServiceInstance) -> None:
    api = Api(http, damaged)
    pid, _ = await stocked_product(api, holds=0)
    sql(damaged, "INSERT INTO dead_letters (request_id, product_id, op, envelope, error, "
        "status_code, created_at) VALUES (%s, %s, 'hold', '', 'boom', 500, 0)",
        keys.new_id("job", pid), pid)
    code, report = audit(damaged, "--product", pid)
    assert code == 1 and checks_of(report, pid) == {"dead letter"}, report
