"""A crowd on one product: exactly the stock is granted, everyone else gets a clean 409."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.harness import Api, Reply, assert_problem

pytestmark = pytest.mark.e2e

CLIENTS = 300
STOCK = 50


async def test_300_clients_on_stock_50_get_exactly_50_holds(api: Api) -> None:
    product = await api.create_product(stock=STOCK)
    pid = product["id"]

    async def one_client() -> Reply:
        return await api.settle(await api.hold(pid, 1))

    outcomes = await asyncio.gather(*(one_client() for _ in range(CLIENTS)), return_exceptions=True)

    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} transport errors, first: {failures[0]!r}"
    replies = [o for o in outcomes if isinstance(o, Reply)]
    assert not [r for r in replies if r.status >= 500], [str(r) for r in replies if r.status >= 500]
    granted = [r for r in replies if r.status == 201]
    refused = [r for r in replies if r.status == 409]
    assert len(granted) == STOCK, sorted({r.status for r in replies})
    assert len(refused) == CLIENTS - STOCK, sorted({r.status for r in replies})

    for reply in refused:
        problem = assert_problem(reply, 409, "Insufficient stock")
        assert isinstance(problem.get("available"), int), problem
        assert problem["available"] >= 0, problem

    hold_ids = [r.body["hold_id"] for r in granted]
    assert len(set(hold_ids)) == STOCK, "hold ids are not distinct"
    for reply in granted:
        assert reply.body["product_id"] == pid and reply.body["qty"] == 1, reply
        assert reply.body["status"] == "active", reply

    await api.wait_product(pid, available=0, stock=STOCK)

    stored = await asyncio.gather(*(api.get(f"/api/holds/{h}") for h in hold_ids))
    for hold_id, reply in zip(hold_ids, stored, strict=True):
        assert reply.status == 200, f"hold {hold_id}: {reply}"
        assert reply.body["hold_id"] == hold_id and reply.body["status"] == "active", reply
