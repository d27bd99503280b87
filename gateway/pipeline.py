"""Automatic pipelining: the Redis commands of concurrent requests travel together.

Every request on a hot product makes one or two Redis calls. Sent one by one, each call
pays for a pool checkout, a write and a read of its own; here the calls issued during
one turn of the event loop go out as a single pipeline on one connection, and each
caller gets its own reply (or its own exception).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

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

    async def execute(self, *command: Any) -> Any:
        """Run one command (``"HGETALL", key``) in the next pipeline; its reply.

        The arguments are encoded here, in the caller's own call: an argument that cannot
        be sent (a string that is not valid UTF-8) fails this caller alone, never the
        other callers whose commands share the pipeline.
        """
        encode = self._encoder.encode
        encoded = (command[0], *(encode(arg) for arg in command[1:]))  # the name stays str
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
            async with self.conn.pipeline(transaction=False) as pipe:
                for command, _ in batch:
                    pipe.execute_command(*command)
                return list(await pipe.execute(raise_on_error=False))
        except Exception as exc:
            # Not an answer about a command (those come back one by one) but the client
            # failing under it, e.g. redis-py's cluster client closing a connection that
            # another task uses while it learns a moved slot: the connection is lost.
            return [exc] * len(batch)


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
