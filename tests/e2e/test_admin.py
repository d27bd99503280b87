"""Admin API: creating and restocking products (bearer token)."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Api, assert_errors_name, assert_problem
from tests.random_refs import random_product_name

pytestmark = pytest.mark.e2e


async def test_created_product_is_served(api: Api) -> None:
    name = random_product_name("admin")
    body = {"name": name, "price_cents": 4250, "currency": "EUR", "stock": 7}
    reply = await api.settle(
        await api.post("/api/admin/products", body, headers=api.admin_headers())
    )
    assert reply.status == 201, reply
    product = reply.body
    assert isinstance(product["id"], int) and product["id"] > 0, product
    assert {k: product[k] for k in body} == body, product

    served = await api.wait_product(product["id"], stock=7, available=7)
    assert served == {**body, "id": product["id"], "available": 7}, served


async def test_restock_adds_units_and_wakes_a_sold_out_product(api: Api) -> None:
    pid = (await api.create_product(stock=2))["id"]
    await api.new_hold(pid, 2)
    assert_problem(await api.settle(await api.hold(pid, 1)), 409, "Insufficient stock")

    path = f"/api/admin/products/{pid}/restock"
    reply = await api.settle(await api.post(path, {"qty": 5}, headers=api.admin_headers()))
    assert reply.status == 200, reply
    assert reply.body["id"] == pid and reply.body["stock"] == 7, reply
    assert reply.body["available"] == 5, reply
    await api.wait_product(pid, stock=7, available=5)

    assert (await api.settle(await api.hold(pid, 1))).status == 201


async def test_restock_can_be_asynchronous(api: Api) -> None:
    pid = (await api.create_product(stock=1))["id"]
    path = f"/api/admin/products/{pid}/restock"
    accepted = await api.post(path, {"qty": 3}, headers=api.admin_headers(), prefer="respond-async")
    assert accepted.status == 202, accepted
    job = await api.wait_job(accepted.body["job_id"])
    assert job["result"]["status"] == 200 and job["result"]["body"]["stock"] == 4, job


@pytest.mark.parametrize(("qty", "field"), [(0, "qty"), (-2, "qty"), ("many", "qty")])
async def test_invalid_restock_is_422(api: Api, qty: object, field: str) -> None:
    pid = (await api.create_product(stock=1))["id"]
    reply = await api.post(
        f"/api/admin/products/{pid}/restock", {"qty": qty}, headers=api.admin_headers()
    )
    assert_errors_name(assert_problem(reply, 422), field)
    await api.wait_product(pid, stock=1, available=1)


async def test_restock_of_unknown_product_is_404(api: Api) -> None:
    reply = await api.settle(
        await api.post(
            "/api/admin/products/987654321/restock", {"qty": 1}, headers=api.admin_headers()
        )
    )
    assert_problem(reply, 404)
