"""Automatic pipelining: the Redis commands of concurrent requests travel together.

Every request on a hot product makes one or two Redis calls. Sent one by one, each call
pays for a pool checkout, a write and a read of its own; here the calls issued during
one turn of the event loop go out together on one connection, and each caller gets its
own reply (or its own exception).

On a single Redis the batches go over a connection the auto-pipeline keeps (``_Link``):
each batch is written as soon as it is flushed, and one reader hands the replies out in
order. redis-py's pipeline object would check a connection out of the pool, wrap the
batch in its retry and timeout machinery and give it back, for every batch: two to three
times the CPU per command (docs/BENCHMARKS.md). On a Redis Cluster, the batches go
through redis-py's cluster pipeline, which splits them by node and follows MOVED/ASK.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import inspect
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    DataError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_BATCH = 256


class AutoPipeline:
    def __init__(self, conn: Any, max_batch: int = MAX_BATCH) -> None:
        """``conn``: a redis.asyncio client, standalone or cluster (whose pipeline splits
        a batch by node and follows MOVED/ASK)."""
        self.conn = conn
        self.max_batch = max_batch
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._shas: dict[str, str] = {}
        self._encoder = conn.get_encoder()
        # A standalone client: batches over a kept connection; anything else (a cluster
        # client) through its own pipeline.
        self._direct = isinstance(conn, aioredis.Redis)
        self._link: _Link | None = None
        self._opening = asyncio.Lock()

    async def aclose(self) -> None:
        """Close the kept connection (commands still waiting hear of a lost connection)."""
        if self._link is not None:
            await self._link.fail(RedisConnectionError("The auto-pipeline was closed"))

    async def execute(self, *command: Any) -> Any:
        """Run one command (``"HGETALL", key``) in the next pipeline; its reply.

        The arguments are encoded here, in the caller's own call: an argument that cannot
        be sent (a string that is not valid UTF-8) fails this caller alone, never the
        other callers whose commands share the pipeline. For the kept connection the
        command is packed here too, by hiredis (the packer redis-py's synchronous client
        uses; its asyncio connection packs in Python, argument by argument).
        """
        if self._direct:
            try:
                # Integers are written out here: hiredis 3.5 crashes the process (SIGSEGV)
                # on one too long for str() (over 4,300 digits); b"%d" raises ValueError.
                args: Any = tuple(b"%d" % arg if type(arg) is int else arg for arg in command)
                encoded: tuple[Any, ...] = (command[0], hiredis.pack_command(args))
            except UnicodeError:  # a string that is not UTF-8, as redis-py's encoder raises it
                raise
            except (TypeError, ValueError) as exc:  # as redis-py's encoder says it
                raise DataError(f"Invalid input of {command[0]}: {exc}") from None
        else:
            encode = self._encoder.encode
            encoded = (command[0], *(encode(arg) for arg in command[1:]))  # name stays str
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((encoded, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    async def evalsha(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        """Run a Lua script by its SHA, loading it once if Redis does not know it."""
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or restarted Redis
            await self.conn.script_load(script)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """Send the batch; commands that met a broken connection (a Redis restarting, a
        cluster node whose slots are moving) are sent again. A push sent twice queues
        once (PUSH checks its job key), and the drainer applies each request id once."""
        try:
            await self._send_retrying(batch)
        except BaseException as exc:  # cancelled: no caller may wait for ever
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise

    async def _send_retrying(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
                          ) -> None:
        pause = RETRY_PAUSE_S
        for attempt in range(ATTEMPTS):
            replies = await self._execute(batch)
            retry = []
            for entry, reply in zip(batch, replies, strict=True):
                future = entry[1]
                if future.done():
                    continue
                if not isinstance(reply, Exception):
                    future.set_result(reply)
                elif attempt < ATTEMPTS - 1 and _transient(reply):
                    retry.append(entry)
                else:
                    future.set_exception(_as_redis_error(reply))
            if not retry:
                return
            batch = retry
            await asyncio.sleep(pause)
            pause *= 2

    async def _execute(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
                       ) -> list[Any]:
        """One reply (or exception) per command; a failed connection fails them all."""
        try:
            if self._direct:
                link = await self._open()
                return await link.run([command for command, _ in batch])
            async with self.conn.pipeline(transaction=False) as pipe:
                for command, _ in batch:
                    pipe.execute_command(*command)
                return list(await pipe.execute(raise_on_error=False))
        except Exception as exc:
            # Not an answer about a command (those come back one by one) but the client
            # failing under it, e.g. redis-py's cluster client closing a connection that
            # another task uses while it learns a moved slot: the connection is lost.
            return [exc] * len(batch)

    async def _open(self) -> _Link:
        """The kept connection; a new one (with the client's settings, but never lent to
        anyone else) when there is none or the last one failed."""
        link = self._link
        if link is not None and not link.broken:
            return link
        async with self._opening:
            if self._link is None or self._link.broken:
                pool = self.conn.connection_pool
                # Without a socket timeout of its own: redis-py would wrap every write in
                # a task (asyncio.wait_for) and every reply in a timer. The link watches
                # for a stalled Redis once a second instead (with the same timeout).
                conn = pool.connection_class(**{**pool.connection_kwargs,
                                                "socket_timeout": None})
                stall = pool.connection_kwargs.get("socket_timeout") or DEFAULT_STALL_S
                try:
                    async with asyncio.timeout(stall):  # (the handshake has no timeout)
                        await conn.connect()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                    raise
                self._link = _Link(conn, self.conn.response_callbacks, stall)
            return self._link


# While commands wait on the kept connection it is checked this often for one left without
# a reply; after the client's socket timeout (or this default when it has none) the link
# is failed. An idle link has no timer.
WATCH_S = 1.0
DEFAULT_STALL_S = 5.0

# A command that met a broken connection, or a slot in the middle of a migration (the
# cluster client gave up following its redirections), is sent again: 5 tries over about
# 0.75 s, then the caller hears of it (and the gateway answers 503).
ATTEMPTS = 5
RETRY_PAUSE_S = 0.05


def _transient(exc: BaseException) -> bool:
    """Anything but the server's answer about the command itself: a broken or closed
    connection, a slot in migration (TRYAGAIN, redirections given up), or the client
    failing under it while it learns the cluster's new layout."""
    if isinstance(exc, (TryAgainError, ClusterDownError, AskError, MovedError)):
        return True
    return not isinstance(exc, ResponseError)


def _as_redis_error(exc: Exception) -> Exception:
    """What the caller hears: the server's answer as it is; a connection that could not
    be used even after the retries, as a lost connection (the gateway answers 503)."""
    if isinstance(exc, RedisError):
        return exc
    return RedisConnectionError(f"{exc!r}")


class _Link:
    """A connection kept by the auto-pipeline: batches are written to it as they are
    flushed, without waiting for the replies of the batches before them, and one reader
    task hands the replies out in the order the commands were written (Redis answers a
    connection's commands in order). A connection that fails, or that leaves a command
    without a reply for ``stall`` seconds, fails every command written to it and is
    never written to again: the next batch opens a new one."""

    def __init__(self, conn: Any, callbacks: dict[str, Any], stall: float) -> None:
        self.conn = conn
        self.callbacks = callbacks  # the client's: HGETALL's reply as a dict, and so on
        self.stall = stall
        self.broken = False
        self._expected: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._more = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._progress = 0.0  # the last reply, or the first command since idle
        self._watch: asyncio.TimerHandle | None = None  # armed while commands wait
        self._failing: asyncio.Task[None] | None = None

    async def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` (each its name and its packed bytes); a reply, or the
        exception that answers it, for each."""
        if self.broken or not self.conn.is_connected:  # never reconnect a failed link
            return [RedisConnectionError("Connection lost")] * len(commands)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        if not self._expected:
            self._progress = loop.time()
            if self._watch is None:
                self._watch = loop.call_later(WATCH_S, self._check)
        # The futures join the line in the same step as redis-py writes the bytes (no
        # socket timeout: it writes before its first await), so the line's order is the
        # order of the commands on the wire.
        self._expected.extend(futures)
        self._more.set()
        try:
            await self.conn.send_packed_command([c[1] for c in commands], check_health=False)
        except BaseException as exc:
            await self.fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        replies = [await future for future in futures]
        for n, (command, reply) in enumerate(zip(commands, replies, strict=True)):
            callback = self.callbacks.get(command[0])
            if callback is not None and not isinstance(reply, Exception):
                reply = callback(reply)
                replies[n] = await reply if inspect.isawaitable(reply) else reply
        return replies

    async def _read(self) -> None:
        expected = self._expected
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not expected:
                    self._more.clear()
                    await self._more.wait()
                    continue
                try:
                    # Not disconnected by redis-py on an error: fail() marks the link
                    # broken first, so that no batch reconnects it meanwhile.
                    reply = await self.conn.read_response(disconnect_on_error=False)
                except ResponseError as exc:  # the server's answer about one command
                    reply = exc
                self._progress = loop.time()
                future = expected.popleft()
                if not future.done():
                    future.set_result(reply)
        except BaseException as exc:
            await self.fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _check(self) -> None:
        """Once a second while commands wait: one waiting longer than ``stall`` for its
        reply fails the link (a Redis that stopped answering, its connection open)."""
        self._watch = None
        if self.broken or not self._expected:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._progress > self.stall:
            self._failing = asyncio.create_task(self.fail(
                RedisTimeoutError(f"No reply from Redis in {self.stall:g} s")))
        else:
            self._watch = loop.call_later(WATCH_S, self._check)

    async def fail(self, exc: BaseException) -> None:
        """Answer every command still waiting with ``exc`` (as a lost connection: they
        are sent again), stop the reader and close the connection."""
        if self.broken:
            return
        self.broken = True
        if self._watch is not None:
            self._watch.cancel()
        lost = exc if isinstance(exc, Exception) else RedisConnectionError(f"{exc!r}")
        while self._expected:
            future = self._expected.popleft()
            if not future.done():
                future.set_result(lost)
        if asyncio.current_task() is not self._reader:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self.conn.disconnect(nowait=True)
