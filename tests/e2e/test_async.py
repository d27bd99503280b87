"""Asynchronous writes (RFC 7240 Prefer): 202 + job URL, and the job ends with the real answer."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.harness import Api, Reply, assert_location, assert_problem, mutate_id

pytestmark = pytest.mark.e2e


def assert_accepted(reply: Reply, id_member: str) -> str:
    """A well-formed 202 for a write; returns its job id."""
    assert reply.status == 202, reply
    body = reply.body
    job_id = body["job_id"]
    assert isinstance(job_id, str) and job_id, body
    assert body["status"] in ("queued", "processing"), body
    assert body["status_url"] == f"/api/jobs/{job_id}", body
    assert_location(reply, f"/api/jobs/{job_id}")
    assert reply.headers.get("Retry-After") == "1", reply.headers
    assert reply.headers.get("Preference-Applied"), reply.headers
    assert isinstance(body.get(id_member), str) and body[id_member], body
    return str(job_id)


async def test_respond_async_hold_is_accepted_then_done(api: Api) -> None:
    pid = (await api.create_product(stock=5))["id"]
    reply = await api.post(
        "/api/holds", {"product_id": pid, "qty": 2}, prefer="respond-async", gateway=0
    )
    job_id = assert_accepted(reply, "hold_id")
    assert "respond-async" in reply.headers["Preference-Applied"], reply.headers
    hold_id = reply.body["hold_id"]

    job = await api.wait_job(job_id)  # polled on both gateways
    assert job["job_id"] == job_id, job
    result = job["result"]
    assert result["status"] == 201, job
    assert result["body"]["hold_id"] == hold_id, job
    assert result["body"]["product_id"] == pid and result["body"]["qty"] == 2, job

    hold = await api.get(f"/api/holds/{hold_id}", gateway=1)
    assert hold.status == 200, hold
    assert hold.body["hold_id"] == hold_id and hold.body["status"] == "active", hold.body
    await api.wait_product(pid, available=3)


async def test_respond_async_order_names_its_order_id(api: Api) -> None:
    pid = (await api.create_product(stock=5, price_cents=250))["id"]
    hold = await api.new_hold(pid, 2)
    reply = await api.order(hold["hold_id"], prefer="respond-async")
    job_id = assert_accepted(reply, "order_id")

    job = await api.wait_job(job_id)
    assert job["result"]["status"] == 201, job
    order = job["result"]["body"]
    assert order["order_id"] == reply.body["order_id"] and order["amount_cents"] == 500, job
    fetched = await api.get(f"/api/orders/{order['order_id']}")
    assert fetched.status == 200 and fetched.body["hold_id"] == hold["hold_id"], fetched


async def test_wait_zero_answers_at_once(api: Api) -> None:
    pid = (await api.create_product(stock=5))["id"]
    reply = await api.hold(pid, 1, prefer="wait=0")
    if reply.status == 202:
        assert_accepted(reply, "hold_id")
        final = await api.settle(reply)
    else:  # decided before the gateway answered
        final = reply
    assert final.status == 201, final
    await api.wait_product(pid, available=4)


async def test_unknown_job_is_404(api: Api) -> None:
    assert_problem(await api.get(f"/api/jobs/no-such-job-{uuid.uuid4().hex}"), 404)
    pid = (await api.create_product(stock=1))["id"]
    accepted = await api.hold(pid, 1, prefer="respond-async")
    job_id = assert_accepted(accepted, "hold_id")
    await api.settle(accepted)
    assert_problem(await api.get(f"/api/jobs/{mutate_id(job_id)}"), 404)
