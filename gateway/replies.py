"""Waiting for results: one pub/sub channel per gateway process, a future per request.

Drainers publish each batch's answers to the channel named in the envelopes. A waiter
also reads the job key now and then, so a reply lost with a dropped subscription (or
sent to another gateway, for an idempotent replay) is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from gateway.pipeline import AutoPipeline
from workers import keys

log = logging.getLogger("flashsale.gateway")

POLL_SECONDS = 1.0
# Requests one gateway lets wait for their answer at once. Past it, new writes are turned
# away (503 with Retry-After) before anything is queued: each waiter holds its request
# and connection in memory, and at the drainers' pace a longer line only adds latency.
MAX_WAITING = 1000
# Products whose last push here was refused at once (sold out), remembered so that a full
# waiting room does not turn their refusals away; at most this many (then forgotten).
MAX_SOLD_OUT_HINTS = 10_000


class ReplyHub:
    def __init__(self, conn: Any, sharded: bool = False, pipe: AutoPipeline | None = None,
                 max_waiting: int = MAX_WAITING) -> None:
        """``conn`` is the data plane; ``sharded`` (a Redis Cluster): SSUBSCRIBE, so that
        only the node owning this gateway's channel carries its replies. ``pipe``: the
        data plane's auto-pipeline, for the waiters' polls of their job keys."""
        self.conn = conn
        self.sharded = sharded
        self.pipe = pipe
        self.max_waiting = max_waiting
        self.waiters = 0  # requests inside wait()
        self._sold_out: set[int] = set()  # products whose last push here was refused
        self.channel = keys.reply_channel(secrets.token_hex(8))
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                if self.sharded:
                    await self._listen_sharded()
                    continue
                async with self.conn.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._ready.set()
                    async for message in pubsub.listen():
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: resubscribe; waiters poll meanwhile
                log.warning("reply channel lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)

    async def _listen_sharded(self) -> None:
        """Sharded pub/sub on a cluster: redis-py's ClusterPubSub finds the node that owns
        the channel's slot, and follows it when the slot moves."""
        pubsub = self.conn.pubsub()
        try:
            await pubsub.ssubscribe(self.channel)
            self._ready.set()
            while True:
                message = await pubsub.get_sharded_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                if message is not None and message.get("type") == "smessage":
                    self._dispatch(message["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _dispatch(self, data: bytes) -> None:
        for job_id, result in orjson.loads(data):
            future = self._waiting.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(result)

    def note_push(self, product_id: int, sold_out: bool) -> None:
        """Remember whether the product's last push here was refused at once (sold out)."""
        if not sold_out:
            self._sold_out.discard(product_id)
        elif product_id not in self._sold_out:
            if len(self._sold_out) >= MAX_SOLD_OUT_HINTS:
                self._sold_out.clear()
            self._sold_out.add(product_id)

    def may_shed(self, product_id: int) -> bool:
        """Whether a write on this product that would wait is turned away (503): the
        waiting room is full, and the product was not sold out at its last push here.
        A hold on a sold-out product is refused in one Redis call without waiting, so it
        goes on to hear its 409 (if a restock made it possible meanwhile, it waits, one
        past the bound, and the next one is turned away)."""
        return self.full and product_id not in self._sold_out

    @property
    def full(self) -> bool:
        """Whether as many requests wait for answers as this gateway lets wait: those
        registered for a reply (counted from ``expect``, before their push is even sent,
        so that a burst arriving in one loop turn is bounded too) or inside ``wait``."""
        return max(len(self._waiting), self.waiters) >= self.max_waiting

    def expect(self, job_id: str) -> asyncio.Future[dict[str, Any]]:
        """Register interest before pushing, so an early reply is not missed."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        return future

    def discard(self, job_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        """Stop expecting ``job_id`` for this ``future`` (not for another request of this
        gateway that registered the same job id since, e.g. a keyed duplicate)."""
        if self._waiting.get(job_id) is future:
            del self._waiting[job_id]

    async def wait(self, job_id: str, future: asyncio.Future[dict[str, Any]] | None,
                   timeout: float) -> tuple[str, dict[str, Any] | None]:
        """Wait up to ``timeout`` s; returns (status, result) with status queued|processing|done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        status = "queued"
        self.waiters += 1
        try:
            while True:
                remaining = deadline - loop.time()
                if future is not None and remaining > 0:
                    # One timer, which answers the future with POLL when the time to look
                    # at the job key has come (asyncio.wait, with its waiter future, set
                    # and callbacks, cost about 14 us more per wait on this machine).
                    timer = loop.call_later(min(remaining, POLL_SECONDS), _poll, future)
                    try:
                        reply = await future
                    finally:
                        timer.cancel()
                    if reply is not POLL:
                        return "done", reply
                    future = self.expect(job_id)  # listen on, while the key is read
                elif remaining > 0:
                    await asyncio.sleep(min(remaining, POLL_SECONDS / 5))
                status, result = await self.status(job_id)
                if result is not None or status == "missing" or loop.time() >= deadline:
                    return status, result
        finally:
            self.waiters -= 1
            if future is not None:  # answered 202 (or by a poll): stop expecting
                self.discard(job_id, future)  # (a replay, future None, registered nothing)

    async def status(self, job_id: str) -> tuple[str, dict[str, Any] | None]:
        """The job key's state, read through the auto-pipeline when there is one."""
        if self.pipe is None:
            return await job_status(self.conn, job_id)
        return parse_status(await self.pipe.execute("GET", keys.job(job_id)))


# What a waiter's future is answered with when it is time to read the job key instead.
POLL: Any = object()


def _poll(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(POLL)


async def job_status(conn: aioredis.Redis, job_id: str) -> tuple[str, dict[str, Any] | None]:
    """(queued|processing|done|missing, result) from the job key."""
    return parse_status(cast(bytes | None, await conn.get(keys.job(job_id))))


def parse_status(raw: bytes | None) -> tuple[str, dict[str, Any] | None]:
    if raw is None:
        return "missing", None
    if raw.startswith(b"{"):
        return "done", orjson.loads(raw)
    return raw.decode(), None
