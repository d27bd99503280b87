"""A worker SIGKILLed in the middle of a rush: nothing acknowledged is lost, nothing oversold."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.e2e.harness import (
    Api,
    Process,
    Reply,
    ServiceFactory,
    ServiceInstance,
    assert_problem,
)

pytestmark = pytest.mark.e2e

STOCK = 6000  # more than the clients can take before the kill, on a fast machine too
CLIENTS = 100
MAX_REQUESTS_PER_CLIENT = 100  # qty 1..4; each client stops at its first refusal after the kill
KILL_AFTER = 100  # answers received before the operator's mistake
WAIT = "wait=5"  # short enough that requests stuck behind the dead worker come back 202
RECOVERY_TIMEOUT = 60.0  # lease expiry + scheduler re-wake + draining the backlog
CPU_SAMPLE = 0.1  # seconds of CPU accounting to tell the busy worker from the idle one


@pytest.fixture(scope="module")
def fault_service(service_factory: ServiceFactory) -> Iterator[ServiceInstance]:
    """An instance of its own: this test damages it, and it is stopped afterwards."""
    instance = service_factory.get("fault")
    yield instance
    service_factory.discard(instance)


@pytest.fixture
def fault_api(http: aiohttp.ClientSession, fault_service: ServiceInstance) -> Api:
    return Api(http, fault_service)


async def kill_the_busy_worker(service: ServiceInstance, workers: list[Process],
                               time_to_kill: asyncio.Event, killed: asyncio.Event) -> None:
    """The operator's mistake, once ``time_to_kill`` is set: SIGKILL the worker busy right
    now (the likeliest drainer of the hot products), then start the replacement."""
    await asyncio.wait_for(time_to_kill.wait(), timeout=RECOVERY_TIMEOUT)
    cpu_before = {w.name: w.cpu_seconds() for w in workers}
    await asyncio.sleep(CPU_SAMPLE)
    victim = max(workers, key=lambda w: w.cpu_seconds() - cpu_before[w.name])
    victim.signal(signal.SIGKILL)
    killed.set()  # what is sent from now on meets a dead worker (or its lease)
    assert victim.wait(5), f"{victim.name} survived SIGKILL"
    service.spawn("worker")  # the replacement an operator would start


@dataclass
class Attempt:
    qty: int
    after_kill: bool  # sent once the worker was already dead
    reply: Reply


async def test_worker_killed_mid_load_loses_nothing_and_oversells_nothing(
    fault_api: Api, fault_service: ServiceInstance
) -> None:
    api = fault_api
    pid = (await api.create_product(stock=STOCK))["id"]
    workers = fault_service.running("worker")
    attempts: list[Attempt] = []
    time_to_kill, killed = asyncio.Event(), asyncio.Event()
    sold_out_after_kill = 0

    async def client(number: int) -> None:
        nonlocal sold_out_after_kill
        for i in range(MAX_REQUESTS_PER_CLIENT):
            qty, after_kill = 1 + (number + i) % 4, killed.is_set()
            reply = await api.hold(pid, qty, prefer=WAIT)
            attempts.append(Attempt(qty, after_kill, reply))
            if len(attempts) >= KILL_AFTER:
                time_to_kill.set()
            if after_kill and reply.status == 409:  # the sale ran on to its end
                sold_out_after_kill += 1
                return

    outcomes = await asyncio.gather(
        kill_the_busy_worker(fault_service, workers, time_to_kill, killed),
        *(client(n) for n in range(CLIENTS)), return_exceptions=True
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} failed, first: {failures[0]!r}"
    assert sold_out_after_kill == CLIENTS, f"{sold_out_after_kill} clients saw the sale end"

    gate = asyncio.Semaphore(100)

    async def final(reply: Reply) -> Reply:
        async with gate:
            return await api.settle(reply, timeout=RECOVERY_TIMEOUT)

    finals = await asyncio.gather(*(final(a.reply) for a in attempts))
    server_errors = [a.reply for a in attempts if a.reply.status >= 500]
    server_errors += [r for r in finals if r.status >= 500]
    assert not server_errors, server_errors[:5]

    granted: dict[str, int] = {}
    for attempt, reply in zip(attempts, finals, strict=True):
        if reply.status == 409:
            assert_problem(reply, 409, "Insufficient stock")
            continue
        assert reply.status == 201, reply
        assert reply.body["qty"] == attempt.qty and reply.body["product_id"] == pid, reply
        assert reply.body["hold_id"] not in granted, f"hold id twice: {reply.body}"
        granted[reply.body["hold_id"]] = attempt.qty
    sold = sum(granted.values())
    assert sold <= STOCK
    assert any(a.after_kill and r.status == 201 for a, r in zip(attempts, finals, strict=True)), (
        "nothing was sold after the kill: the fault did not land mid-load"
    )

    # Every acknowledged hold exists; units granted + available == stock (no loss, no leak).
    async def lookup(hold_id: str) -> Reply:
        async with gate:
            return await api.get(f"/api/holds/{hold_id}")

    stored = await asyncio.gather(*(lookup(h) for h in granted))
    for hold_id, reply in zip(granted, stored, strict=True):
        assert reply.status == 200, f"hold {hold_id} lost: {reply}"
        assert reply.body["status"] == "active" and reply.body["qty"] == granted[hold_id], reply
    await api.wait_product(pid, stock=STOCK, available=STOCK - sold)

    # The product is still served by the surviving and replacement workers.
    assert len(fault_service.running("worker")) == len(workers)
    after = await api.settle(await api.hold(pid, 1, prefer="wait=30"))
    assert after.status == (201 if sold < STOCK else 409), after


MANY_PRODUCTS = 20
MANY_STOCK = 150  # per product: 3,000 units, more than are sold before the kill
MANY_CLIENTS = 100
MANY_MAX_REQUESTS = 200  # per client; a client stops once every product refused it
ROOM = "4"  # DRAIN_PRODUCTS: a drainer holds 4 of the 20, and hands them back each round


@pytest.fixture(scope="module")
def rotating_service(service_factory: ServiceFactory) -> Iterator[ServiceInstance]:
    """An instance of its own whose drainers hold few products, so that they hand them
    back (with the batches FINISH took still in flight) all the time."""
    instance = service_factory.get("fault-rotating", DRAIN_PRODUCTS=ROOM)
    yield instance
    service_factory.discard(instance)


async def test_worker_killed_mid_load_on_many_hot_products_loses_nothing(
    http: aiohttp.ClientSession, rotating_service: ServiceInstance
) -> None:
    """Twenty products hot at once: each drainer holds a few, FINISH takes their next
    batches, and rounds hand products back and forth. A worker killed in the middle
    leaves batches in flight under its leases; every product still sells exactly its
    stock, and every acknowledged hold exists."""
    api = Api(http, rotating_service)
    pids = [(await api.create_product(stock=MANY_STOCK))["id"] for _ in range(MANY_PRODUCTS)]
    workers = rotating_service.running("worker")
    replies: list[tuple[bool, Reply]] = []  # (sent after the kill, reply)
    time_to_kill, killed = asyncio.Event(), asyncio.Event()

    async def client(number: int) -> None:
        refused: set[int] = set()
        turn = sent = 0
        while len(refused) < MANY_PRODUCTS:
            pid = pids[(number + turn) % MANY_PRODUCTS]  # every client takes them in turn
            turn += 1
            if pid in refused:
                continue
            assert sent < MANY_MAX_REQUESTS, f"client {number}: {sent} holds, still not refused"
            sent += 1
            after_kill = killed.is_set()
            reply = await api.hold(pid, 1, prefer=WAIT)
            replies.append((after_kill, reply))
            if len(replies) >= KILL_AFTER:
                time_to_kill.set()
            if reply.status == 409:
                refused.add(pid)

    outcomes = await asyncio.gather(
        kill_the_busy_worker(rotating_service, workers, time_to_kill, killed),
        *(client(n) for n in range(MANY_CLIENTS)), return_exceptions=True
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} failed, first: {failures[0]!r}"

    gate = asyncio.Semaphore(100)

    async def final(reply: Reply) -> Reply:
        async with gate:
            return await api.settle(reply, timeout=RECOVERY_TIMEOUT)

    finals = await asyncio.gather(*(final(reply) for _, reply in replies))
    server_errors = [r for _, r in replies if r.status >= 500] + [
        r for r in finals if r.status >= 500]
    assert not server_errors, server_errors[:5]

    granted: dict[str, int] = {}  # hold id -> product
    for reply in finals:
        if reply.status == 409:
            assert_problem(reply, 409, "Insufficient stock")
            continue
        assert reply.status == 201 and reply.body["qty"] == 1, reply
        assert reply.body["hold_id"] not in granted, f"hold id twice: {reply.body}"
        granted[reply.body["hold_id"]] = reply.body["product_id"]
    assert any(after and final_reply.status == 201
               for (after, _), final_reply in zip(replies, finals, strict=True)), (
        "nothing was sold after the kill: the fault did not land mid-load")

    sold = {pid: 0 for pid in pids}
    for pid in granted.values():
        sold[pid] += 1
    # Every client went on until each product refused it: each sold exactly its stock.
    assert sold == {pid: MANY_STOCK for pid in pids}, sold

    async def lookup(hold_id: str) -> Reply:
        async with gate:
            return await api.get(f"/api/holds/{hold_id}")

    stored = await asyncio.gather(*(lookup(h) for h in granted))
    for (hold_id, pid), reply in zip(granted.items(), stored, strict=True):
        assert reply.status == 200, f"hold {hold_id} lost: {reply}"
        assert reply.body["product_id"] == pid and reply.body["status"] == "active", reply
    for pid in pids:
        await api.wait_product(pid, stock=MANY_STOCK, available=0)
