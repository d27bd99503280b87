"""The gateway's auto-pipeline when a connection drops after Redis ran the commands.

A Redis that stops (a restart, a failover) may have run a pipeline's commands and lost
their replies: the gateway sends them again. These tests drop the replies of the first
pipeline on purpose, over fakeredis, and look at what the second sending did. Then the
connection the auto-pipeline keeps for a standalone Redis: replies in order, errors,
a lost connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import hiredis
import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from gateway.pipeline import RETRY_PAUSE_S, AutoPipeline
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


# A standalone client's batches go over a connection the auto-pipeline keeps, written as
# they are flushed and answered in order by one reader: each caller must get its own
# reply, whatever else is in flight.

@pytest.fixture
async def kept() -> AsyncIterator[tuple[fakeredis.FakeServer, AutoPipeline]]:
    """An auto-pipeline over a fake Redis server that a test can stop and start."""
    fake = fakeredis.FakeServer()
    conn = fakeredis.FakeAsyncRedis(server=fake)
    pipe = AutoPipeline(conn)
    yield fake, pipe
    fake.connected = True
    await pipe.aclose()
    await conn.aclose()


async def test_concurrent_callers_each_get_their_own_reply(
        kept: tuple[fakeredis.FakeServer, AutoPipeline]) -> None:
    _, pipe = kept

    async def caller(n: int) -> tuple[Any, Any, Any]:
        await pipe.execute("SET", f"k{n}", f"v{n}")
        await pipe.execute("HSET", f"h{n}", "n", n)
        return (await pipe.execute("GET", f"k{n}"), await pipe.execute("HGETALL", f"h{n}"),
                await pipe.execute("INCR", "count"))

    answers = await asyncio.gather(*(caller(n) for n in range(300)))

    assert [a[0] for a in answers] == [f"v{n}".encode() for n in range(300)]
    # the client's reply callbacks apply, as through its own pipeline
    assert [a[1] for a in answers] == [{b"n": str(n).encode()} for n in range(300)]
    assert sorted(a[2] for a in answers) == list(range(1, 301))


async def test_an_error_reply_fails_its_caller_alone(
        kept: tuple[fakeredis.FakeServer, AutoPipeline]) -> None:
    _, pipe = kept
    await pipe.execute("SET", "text", "x")

    answers: tuple[Any, ...] = await asyncio.gather(
        pipe.execute("GET", "text"), pipe.execute("INCR", "text"),
        pipe.execute("INCR", "n"), return_exceptions=True)
    good, bad, after = answers

    assert good == b"x"
    assert isinstance(bad, ResponseError)
    assert after == 1
    assert await pipe.execute("GET", "n") == b"1"  # the connection is still in use

    with pytest.raises(UnicodeEncodeError):  # not UTF-8: this caller alone fails
        await asyncio.gather(pipe.execute("SET", "k", "\udcff"), pipe.execute("INCR", "n"))
    assert await pipe.execute("GET", "n") == b"2"
    # A 5,000-digit integer (hiredis alone would crash the process), None, a bool:
    # refused in the caller's own call.
    for bad in (10**5000, None, True):
        with pytest.raises(DataError):
            await asyncio.gather(pipe.execute("SET", "k", bad), pipe.execute("INCR", "n"))
    assert await pipe.execute("GET", "n") == b"5"
    assert await pipe.execute("SET", "k", -(2**63)) is True  # a plain integer still goes
    assert await pipe.execute("GET", "k") == b"-9223372036854775808"
    # Bytes that are not ASCII and text that is go as they are; a float as redis-py's
    # encoder writes it (NaN as "nan").
    redis_encoder = redis.asyncio.Redis().get_encoder()
    for value in (b"\xff\x00\xfe", "caf\u00e9 \u2603", float("nan"), float("-inf"), 0.1):
        assert await pipe.execute("SET", "k", value) is True
        assert await pipe.execute("GET", "k") == redis_encoder.encode(value)


async def test_commands_on_a_lost_connection_go_out_again_on_a_new_one(
        kept: tuple[fakeredis.FakeServer, AutoPipeline]) -> None:
    fake, pipe = kept
    assert await pipe.execute("INCR", "n") == 1
    first = pipe._link
    fake.connected = False  # Redis stops
    pending = asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(5)))
    await asyncio.sleep(RETRY_PAUSE_S * 2)
    fake.connected = True  # and is back

    assert sorted(await pending) == [2, 3, 4, 5, 6]
    assert pipe._link is not first and first is not None and first.broken


async def test_a_connection_that_stays_down_fails_the_callers(
        kept: tuple[fakeredis.FakeServer, AutoPipeline]) -> None:
    fake, pipe = kept
    assert await pipe.execute("INCR", "n") == 1
    fake.connected = False

    with pytest.raises(RedisConnectionError):  # after the retries, about 0.75 s
        await pipe.execute("INCR", "n")


async def test_an_idle_link_keeps_no_timer_and_closing_stops_it(
        kept: tuple[fakeredis.FakeServer, AutoPipeline]) -> None:
    _, pipe = kept
    assert await pipe.execute("PING") is True  # (the client's callback: PONG is True)
    link = pipe._link
    assert link is not None and link._watch is not None  # armed while PING waited
    link._check()  # its next turn finds nothing waiting: an idle link keeps no timer
    assert link._watch is None

    await pipe.aclose()

    assert link.broken and not link.conn.is_connected
    await asyncio.sleep(0)
    assert link._reader.done()


class SilentRedis:
    """A Redis stand-in on a local port: answers +OK to every command while ``silent`` is
    not set, and then reads without answering (a server that hangs without closing its
    connections)."""

    def __init__(self) -> None:
        self.silent = False
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        commands = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                commands.feed(data)
                while commands.gets() is not False:
                    if not self.silent:
                        writer.write(b"+OK\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_a_redis_that_stops_answering_fails_the_link_and_the_command_goes_again(
        ) -> None:
    fake = SilentRedis()
    async with fake as port:
        client = redis.asyncio.Redis(port=port, socket_timeout=0.2)
        pipe = AutoPipeline(client)
        try:
            assert await pipe.execute("SET", "a", "1") is True
            first = pipe._link
            assert first is not None
            fake.silent = True
            pending = asyncio.ensure_future(pipe.execute("SET", "a", "2"))
            for _ in range(300):  # the watchdog's turn: after 0.2 s, within a second more
                if first.broken:
                    break
                await asyncio.sleep(0.01)
            assert first.broken and not pending.done()  # sent again, on a new connection
            fake.silent = False

            assert await pending is True
            assert pipe._link is not first
        finally:
            await pipe.aclose()
            await client.aclose()
