"""The gateway's fast paths decide exactly as the slow ones would: the plain hold body
without marshmallow, and the waiter bound that turns writes away before queueing them."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from marshmallow import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from flashsale.config import Settings
from gateway import replies, schemas
from gateway.errors import ProblemError
from gateway.handlers import plain_hold
from gateway.metrics import Metrics
from gateway.replies import ReplyHub
from gateway.submit import Write, submit
from gateway.typedefs import METRICS, REPLIES, SCRIPTS, SETTINGS

BODIES: list[Any] = [
    {"product_id": 5, "qty": 1},
    {"product_id": 2147483647, "qty": 10},
    {"qty": 3, "product_id": 1},
    {"product_id": 5, "qty": 0},
    {"product_id": 5, "qty": 11},
    {"product_id": 0, "qty": 1},
    {"product_id": 2147483648, "qty": 1},
    {"product_id": -1, "qty": 1},
    {"product_id": 5, "qty": 1.0},
    {"product_id": 5.5, "qty": 1},
    {"product_id": True, "qty": 1},
    {"product_id": "5", "qty": 1},
    {"product_id": 5, "qty": None},
    {"product_id": 5},
    {"product_id": 5, "qty": 1, "extra": 1},
    {"product_id": 5, "quantity": 1},
    {"product_id": 5, "qty": 1, "customer_id": "c-1"},
    {"product_id": 5, "qty": 1, "customer_id": ""},
    [5, 1],
    "hold",
    None,
    {},
]


def marshmallow_answer(schema: Any, body: Any) -> Any:
    try:
        return schemas.load(schema, body)
    except ValidationError as exc:
        return ("422", exc.messages)


@pytest.mark.parametrize("options", [
    {}, {"customer_in_body": True}, {"customer_in_body": True, "customer_required": True}])
@pytest.mark.parametrize("body", BODIES)
def test_plain_hold_accepts_only_what_marshmallow_accepts_and_the_same_way(
        options: dict[str, bool], body: Any) -> None:
    schema = schemas.hold_schema(10, **options)
    fast = plain_hold(schema, body)
    slow = marshmallow_answer(schema, body)
    if fast is not None:  # taken without marshmallow: marshmallow would say the same
        assert fast == slow
        assert list(fast) == list(slow)
    # Either way the handler's answer is marshmallow's whenever the fast path declines.
    assert (fast or slow) == slow


def test_plain_hold_declines_when_a_customer_is_required() -> None:
    schema = schemas.hold_schema(10, customer_in_body=True, customer_required=True)
    assert plain_hold(schema, {"product_id": 5, "qty": 1}) is None


def app_with_waiters(waiting: int, bound: int) -> web.Application:
    app = web.Application()
    app[SETTINGS] = Settings()
    app[METRICS] = Metrics()
    hub = ReplyHub(conn=None, max_waiting=bound)  # type: ignore[arg-type]
    hub.waiters = waiting
    app[REPLIES] = hub
    return app


async def test_a_full_gateway_turns_writes_away_with_503_and_retry_after() -> None:
    app = app_with_waiters(waiting=3, bound=3)
    write = Write(product_id=5, op="hold", args={"product_id": 5, "qty": 1})
    with pytest.raises(ProblemError) as raised:  # before any Redis call: none is set up
        await submit(app, write, wait=5.0)
    assert raised.value.doc["status"] == 503
    assert raised.value.doc["type"].endswith("/busy")
    assert raised.value.headers == {"Retry-After": "1"}
    assert app[METRICS].shed._value.get() == 1


async def test_a_client_that_does_not_wait_is_not_turned_away() -> None:
    app = app_with_waiters(waiting=3, bound=3)
    write = Write(product_id=5, op="hold", args={"product_id": 5, "qty": 1})
    with pytest.raises(KeyError):  # it went on towards Redis (absent here): not shed
        await submit(app, write, wait=0.0)
    assert app[METRICS].shed._value.get() == 0


async def test_requests_registered_for_a_reply_count_before_they_wait() -> None:
    # A burst arrives in one loop turn: every request registers for its reply before any
    # push is sent, so none is inside wait() yet. They must fill the waiting room all the
    # same, or a burst of 5,000 all wait (and all hold their memory).
    hub = ReplyHub(conn=None, max_waiting=2)  # type: ignore[arg-type]
    first = hub.expect("job_5_0000000000000001")
    assert not hub.full
    hub.expect("job_5_0000000000000002")
    assert hub.full
    hub.discard("job_5_0000000000000001", first)
    assert not hub.full


async def test_a_waiter_answered_202_stops_expecting_its_reply() -> None:
    # Its reply may never come (a reply channel lost with Redis): it must not hold a
    # place in the waiting room for ever.
    class NoJob:
        async def status(self, job_id: str) -> tuple[str, None]:
            return "queued", None

    hub = ReplyHub(conn=None, max_waiting=1)  # type: ignore[arg-type]
    hub.status = NoJob().status  # type: ignore[method-assign]
    future = hub.expect("job_5_0000000000000001")
    assert hub.full

    assert await hub.wait("job_5_0000000000000001", future, 0.01) == ("queued", None)

    assert not hub.full and hub.waiters == 0


async def test_a_full_gateway_still_lets_holds_on_a_sold_out_product_hear_their_409() -> None:
    # A sold-out rush is refused in one Redis call each and never waits: turning it away
    # with 503 would only make the clients come back.
    hub = ReplyHub(conn=None, max_waiting=1)  # type: ignore[arg-type]
    hub.expect("job_5_0000000000000001")
    hub.note_push(6, sold_out=True)

    assert hub.may_shed(5) and not hub.may_shed(6)
    hub.note_push(6, sold_out=False)  # restocked: its holds wait again, and are bounded
    assert hub.may_shed(6)


async def test_a_push_that_failed_holds_no_place_in_the_waiting_room() -> None:
    # Redis unreachable: the request is answered 503 by the error middleware. Were it to
    # stay registered, an outage would fill the waiting room for good.
    class Unreachable:
        async def push(self, keys: list[str], args: list[Any], product_id: int) -> list[int]:
            raise RedisConnectionError("Connection refused")

    app = app_with_waiters(waiting=0, bound=1)
    app[SCRIPTS] = Unreachable()  # type: ignore[assignment]
    write = Write(product_id=5, op="hold", args={"product_id": 5, "qty": 1})
    with pytest.raises(RedisConnectionError):
        await submit(app, write, wait=5.0)

    assert not app[REPLIES].full


async def test_a_replay_that_stops_waiting_leaves_the_first_request_registered() -> None:
    # Two requests with one Idempotency-Key on one gateway: the second waits on the first
    # one's job without a registration of its own; when it gives up, the first request
    # must still get its reply by message (not a poll a second later).
    class NoJob:
        async def status(self, job_id: str) -> tuple[str, None]:
            return "queued", None

    hub = ReplyHub(conn=None)  # type: ignore[arg-type]
    hub.status = NoJob().status  # type: ignore[method-assign]
    first = hub.expect("job_5_0000000000000001")

    await hub.wait("job_5_0000000000000001", None, 0)

    hub._dispatch(b'[["job_5_0000000000000001", {"status": 201, "body": {}}]]')
    assert first.done() and first.result() == {"status": 201, "body": {}}


async def test_a_waiter_that_has_polled_still_hears_its_reply_by_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Each POLL_SECONDS a waiter reads its job key, then listens on: a reply published
    # after a poll must still reach it (its registration is renewed), and it still counts
    # once in the waiting room.
    monkeypatch.setattr(replies, "POLL_SECONDS", 0.02)
    polls = 0

    class NoJob:
        async def status(self, job_id: str) -> tuple[str, None]:
            nonlocal polls
            polls += 1
            return "queued", None

    hub = ReplyHub(conn=None, max_waiting=1)  # type: ignore[arg-type]
    hub.status = NoJob().status  # type: ignore[method-assign]
    job_id = "job_5_0000000000000001"
    waiting = asyncio.ensure_future(hub.wait(job_id, hub.expect(job_id), 5.0))
    while polls < 3:
        await asyncio.sleep(0.01)
    assert hub.full and not waiting.done()

    hub._dispatch(orjson.dumps([[job_id, {"status": 201, "body": {"n": 1}}]]))

    assert await waiting == ("done", {"status": 201, "body": {"n": 1}})
    assert not hub.full and hub.waiters == 0
