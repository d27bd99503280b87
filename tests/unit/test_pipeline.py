"""The gateway's auto-pipeline when a connection drops after Redis ran the commands.

A Redis that stops (a restart, a failover) may have run a pipeline's commands and lost
their replies: the gateway sends them again. These tests drop the replies of the first
pipeline on purpose, over fakeredis, and look at what the second sending did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.pipeline import AutoPipeline
from workers import keys
from workers.protocol import ONCE, PUSH, Envelope, push_args, push_keys

PID = 7


class RepliesLost:
    """A client whose first ``lose`` pipelines run on the server but lose their replies."""

    def __init__(self, inner: fakeredis.FakeAsyncRedis, lose: int = 1) -> None:
        self.inner = inner
        self.lose = lose
        self.pipelines_sent = 0

    def get_encoder(self) -> Any:
        return self.inner.get_encoder()

    async def script_load(self, script: str) -> Any:
        return await self.inner.script_load(script)

    def pipeline(self, transaction: bool = False) -> _Pipeline:
        return _Pipeline(self)


class _Pipeline:
    def __init__(self, owner: RepliesLost) -> None:
        self.owner = owner
        self.commands: list[tuple[Any, ...]] = []

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def execute_command(self, *command: Any) -> None:
        self.commands.append(command)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.owner.pipelines_sent += 1
        async with self.owner.inner.pipeline(transaction=False) as pipe:
            for command in self.commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=raise_on_error)
        if self.owner.lose > 0:
            self.owner.lose -= 1
            raise RedisConnectionError("Connection closed by server.")
        return list(replies)


@pytest.fixture
async def server() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    conn = fakeredis.FakeAsyncRedis()
    yield conn
    await conn.aclose()


def hold(n: int) -> Envelope:
    return Envelope(id=f"job_{PID}_{n:016x}", op="hold",
                    args={"product_id": PID, "qty": 1, "hold_id": f"hold_{PID}_{n:016x}"})


async def test_a_command_whose_reply_was_lost_is_sent_again(
        server: fakeredis.FakeAsyncRedis) -> None:
    client = RepliesLost(server)
    pipe = AutoPipeline(client)

    assert await pipe.execute("INCR", "n") == 2  # it ran twice: INCR is not idempotent

    assert client.pipelines_sent == 2


async def test_a_push_whose_reply_was_lost_is_queued_and_charged_once(
        server: fakeredis.FakeAsyncRedis) -> None:
    # Charged twice, the admission counter would refuse the last unit at once (409)
    # while nobody is left to take it: the flake that a Redis restarted mid-rush showed.
    await server.hset(keys.product(PID), mapping={"available": 1, "queued": 0})
    await server.script_load(PUSH)
    client = RepliesLost(server)
    pipe = AutoPipeline(client)

    code = await pipe.evalsha(PUSH, push_keys(PID, hold(1).id),
                              push_args(hold(1), 1, 3_600, 15_000, ONCE))
    assert code == [5]  # the resent push found its job key: queued already

    assert await server.llen(keys.queue(PID)) == 1
    assert await server.hget(keys.product(PID), "queued") == b"1"
    code = await pipe.evalsha(PUSH, push_keys(PID, hold(2).id),
                              push_args(hold(2), 1, 3_600, 15_000, ONCE))
    assert code == [2, 0]  # the one unit is taken by the first hold, and only by it


async def test_without_once_the_resent_push_would_charge_twice(
        server: fakeredis.FakeAsyncRedis) -> None:
    # The same sending without the flag: what ONCE prevents (and why the test above can
    # fail).
    await server.hset(keys.product(PID), mapping={"available": 2, "queued": 0})
    await server.script_load(PUSH)
    pipe = AutoPipeline(RepliesLost(server))

    await pipe.evalsha(PUSH, push_keys(PID, hold(1).id), push_args(hold(1), 1, 3_600, 15_000))

    assert await server.llen(keys.queue(PID)) == 2
    assert await server.hget(keys.product(PID), "queued") == b"2"
