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

from redis.exceptions import NoScriptError

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
        try:
            async with self.conn.pipeline(transaction=False) as pipe:
                for command, _ in batch:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every caller hears of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
