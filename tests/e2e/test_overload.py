"""A burst larger than the gateways' waiting rooms, against real processes.

Each gateway lets at most ``MAX_WAITING`` requests wait for their answers; a burst that
arrives all at once (every request registered before any push is answered) is bounded
too, and what is turned away is told so at once (503, Retry-After) with nothing queued.
Holds on a sold-out product are refused in one Redis call and never wait: a full waiting
room does not turn them away.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.replies import MAX_WAITING
from tests.e2e.harness import Api, Reply, ServiceFactory, ServiceInstance, assert_problem

pytestmark = pytest.mark.e2e

EXTRA = 150  # requests past the waiting room, per gateway
WAIT = "wait=20"  # longer than the test keeps the workers paused


@pytest.fixture(scope="module")
def overload_service(service_factory: ServiceFactory) -> Iterator[ServiceInstance]:
    """An instance of its own: its workers are paused while its waiting rooms fill."""
    instance = service_factory.get("overload")
    yield instance
    service_factory.discard(instance)


async def test_a_burst_past_the_waiting_room_is_turned_away_and_refusals_are_not(
    http: aiohttp.ClientSession, overload_service: ServiceInstance
) -> None:
    api = Api(http, overload_service)
    gateways = len(overload_service.web_urls)
    stock = gateways * (MAX_WAITING + EXTRA)  # enough for all: nothing is refused
    pid = (await api.create_product(stock=stock))["id"]
    sold_out = (await api.create_product(stock=0))["id"]
    for gateway in range(gateways):  # each gateway sees the product refused once
        reply = await api.post("/api/holds", {"product_id": sold_out, "qty": 1}, gateway=gateway)
        assert reply.status == 409, reply

    with overload_service.paused("worker"):  # what is queued now stays queued
        burst = [asyncio.ensure_future(api.post("/api/holds", {"product_id": pid, "qty": 1},
                                                prefer=WAIT, gateway=gateway))
                 for gateway in range(gateways) for _ in range(MAX_WAITING + EXTRA)]
        deadline = time.monotonic() + 30
        while sum(task.done() for task in burst) < gateways * EXTRA:
            assert time.monotonic() < deadline, (
                f"{sum(t.done() for t in burst)} of {len(burst)} answered; "
                f"{gateways * EXTRA} should have been turned away at once")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # (any more answers would show up now)
        early = [task.result() for task in burst if task.done()]
        assert len(early) == gateways * EXTRA, f"{len(early)} answered before the workers"
        for reply in early:
            assert_problem(reply, 503)
            assert reply.body["type"].endswith("/busy"), reply
            assert reply.headers["Retry-After"] == "1"

        # The waiting rooms are full: holds on the sold-out product still hear their 409.
        refusals = await asyncio.gather(*(
            api.post("/api/holds", {"product_id": sold_out, "qty": 1}, prefer=WAIT,
                     gateway=gateway) for gateway in range(gateways) for _ in range(50)))
        assert Counter(r.status for r in refusals) == {409: 50 * gateways}

    replies: list[Reply] = await asyncio.gather(*burst)
    statuses = Counter(r.status for r in replies)
    assert statuses[503] == gateways * EXTRA, statuses
    waited = [await api.settle(r) for r in replies if r.status != 503]
    assert Counter(r.status for r in waited) == {201: gateways * MAX_WAITING}
    # Nothing was queued for a request turned away: exactly the waiting ones hold units.
    await api.wait_product(pid, stock=stock, available=stock - gateways * MAX_WAITING)
