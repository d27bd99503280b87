"""Queued writes: idempotency, admission, push, wait for the answer or say 202.

The gateway decides only what it can decide alone (an unknown product, a product
clearly sold out); everything else is queued behind the product's other requests and
decided by its drainer.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from aiohttp import web

from flashsale.limits import MAX_KEY_LENGTH, is_visible_ascii
from flashsale.problems import idempotency_reused, insufficient_stock, not_found, problem
from gateway.errors import ProblemError
from gateway.pipeline import AutoPipeline
from gateway.typedefs import (
    EXECUTOR,
    FILLING,
    METRICS,
    REPLIES,
    SCRIPTS,
    SETTINGS,
    SYNC_REDIS,
)
from workers import keys, reads
from workers.client import WAKE_TTL_MS
from workers.planes import HEARTBEAT_MS, READY_KEYS, enqueue_drain_job, push_ready_call
from workers.protocol import (
    FILL,
    KEYED,
    MISSING,
    MUST_EXIST,
    ONCE,
    PUSH,
    PUSH_READY,
    READY,
    Envelope,
    fill_keys,
    product_fields,
    push_args,
    push_keys,
)

# claim: KEYS idempotency key; ARGV "<job id> <fingerprint> <resource id>", ttl s.
# Returns the earlier claim, or nil when this request now owns the key.
CLAIM = """
local seen = redis.call('GET', KEYS[1])
if seen then return seen end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

MISSING_TTL_MS = 5000
PRODUCT_FIELDS = ("id", "name", "price_cents", "currency", "stock", "available")
RETRY_AFTER_BUSY_S = 1


def busy() -> dict[str, Any]:
    return problem(503, "Service busy", "Too many requests are waiting for their answer "
                   f"here; nothing was queued. Retry in {RETRY_AFTER_BUSY_S} s.", slug="busy")


class Scripts:
    """The gateway's Lua scripts, sent with other requests' commands in one pipeline:
    ``pipe`` on the data plane, ``control`` (the same one on a single Redis) for READY."""

    def __init__(self, pipe: AutoPipeline, control: AutoPipeline | None = None) -> None:
        self.pipe = pipe
        self.control = control or pipe

    async def push(self, keys: list[str], args: list[Any], product_id: int) -> Any:
        """PUSH, and READY when it woke the product: on one Redis in the same script
        (PUSH_READY), on two planes one after the other. A woken product answers {1}
        when the caller must enqueue a drain job, else {6} (see PUSH_READY)."""
        if self.control is self.pipe:
            return await self.pipe.evalsha(PUSH_READY, *push_ready_call(keys, args, product_id))
        code = await self.pipe.evalsha(PUSH, keys, args)
        if code[0] == 1 and not await self.ready(keys=READY_KEYS,
                                                 args=[product_id, HEARTBEAT_MS]):
            return [6]
        return code

    async def fill(self, keys: list[str], args: list[Any]) -> Any:
        return await self.pipe.evalsha(FILL, keys, args)

    async def claim(self, keys: list[str], args: list[Any]) -> Any:
        return await self.pipe.evalsha(CLAIM, keys, args)

    async def ready(self, keys: list[str], args: list[Any]) -> Any:
        return await self.control.evalsha(READY, keys, args)


@dataclass(frozen=True)
class Preference:
    """How long the client is willing to wait (RFC 7240), and what we tell it we did."""

    wait: float
    applied: str | None = None

    @classmethod
    def parse(cls, values: list[str], default: float, maximum: float) -> Preference:
        wait: float | None = None
        respond_async = False
        for value in values:
            for token in value.split(","):
                name, _, arg = token.strip().partition("=")
                name = name.strip().lower()
                if name == "respond-async":
                    respond_async = True
                elif name == "wait":
                    seconds = _seconds(arg.strip().strip('"'))
                    if seconds is not None:
                        wait = seconds
        if wait is not None:
            wait = min(wait, maximum)
            applied = f"wait={wait:g}"
            return cls(wait, f"respond-async, {applied}" if respond_async else applied)
        if respond_async:
            return cls(0.0, "respond-async")
        return cls(default)


_SECONDS = re.compile(r"-?[0-9]{1,9}(?:\.[0-9]{1,9})?", re.ASCII)


def _seconds(raw: str) -> float | None:
    """A ``wait`` value: plain decimal seconds, negative meaning 0. NaN, infinities,
    exponents and non-ASCII digits are not; an unusable preference is ignored (RFC 7240)."""
    return max(float(raw), 0.0) if _SECONDS.fullmatch(raw) else None


@dataclass
class Write:
    """One queued request as the handler describes it."""

    product_id: int
    op: str
    args: dict[str, Any]
    resource: str | None = None  # "hold_id" / "order_id": the id promised in a 202
    admission_qty: int = 0
    must_exist: bool = False  # answer 404 at once when the product is known not to exist
    unknown: dict[str, Any] | None = None  # that 404's problem (default: no such product)
    idempotency: tuple[str, str] | None = None  # (scope, key)
    fingerprint: str = ""
    job_id: str = field(default="")

    def __post_init__(self) -> None:
        self.job_id = self.job_id or keys.new_id("job", self.product_id)


@dataclass
class Answer:
    """Either the final result, or the job still under way."""

    job_id: str
    result: dict[str, Any] | None
    status: str = "done"
    resource: tuple[str, str] | None = None  # ("hold_id", id) promised in a 202


def fingerprint(op: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps([op, body], option=orjson.OPT_SORT_KEYS)).hexdigest()


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header, bare or quoted; 400 when empty or too long."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not is_visible_ascii(key):
        raise ProblemError(problem(400, "Invalid Idempotency-Key",
                                   "Idempotency-Key must be 1 to 255 printable ASCII "
                                   "characters", slug="invalid-idempotency-key"))
    return key


async def submit(app: web.Application, write: Write, wait: float) -> Answer:
    """Queue ``write`` (or find its earlier twin) and wait up to ``wait`` seconds.

    When this gateway already has its fill of requests waiting, a request that would
    wait is turned away before anything is queued: 503 with Retry-After, at once (but
    not one for a product sold out at its last push here: see ReplyHub.may_shed).
    """
    settings = app[SETTINGS]
    if wait > 0 and app[REPLIES].may_shed(write.product_id):
        app[METRICS].shed.inc()
        raise ProblemError(busy(), {"Retry-After": str(RETRY_AFTER_BUSY_S)})
    if write.idempotency is not None:
        scope, key = write.idempotency
        resource_id = write.args.get(write.resource) if write.resource else None
        seen = await app[SCRIPTS].claim(
            keys=[keys.idempotency(scope, key)],
            args=[f"{write.job_id} {write.fingerprint} {resource_id or '-'}",
                  settings.job_ttl_seconds])
        if seen is not None:
            return await _replay(app, write, seen.decode(), wait)
    return await _push(app, write, wait)


async def _replay(app: web.Application, write: Write, seen: str, wait: float) -> Answer:
    job_id, first_fingerprint, resource_id = seen.split(" ")
    if first_fingerprint != write.fingerprint:
        raise ProblemError(idempotency_reused())
    status, result = await app[REPLIES].wait(job_id, None, 0)
    if write.resource and resource_id != "-":
        write.args[write.resource] = resource_id
    if status == "missing":  # no longer cached: the database has it, unless Redis lost it
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(app[EXECUTOR], reads.job_result, job_id)
        if result is not None:
            return Answer(job_id, result, "done", _resource(write))
        # Not pushed yet (the first request is between its claim and its push), or lost
        # with Redis: push it under the first request's job id. PUSH queues a keyed job id
        # once, so whichever of the two comes second only waits for the same job.
        write.job_id = job_id
        return await _push(app, write, wait)
    if result is None and wait > 0:
        status, result = await app[REPLIES].wait(job_id, None, wait)
    return Answer(job_id, result, status, _resource(write))


async def _push(app: web.Application, write: Write, wait: float) -> Answer:
    hub = app[REPLIES]
    envelope = Envelope(id=write.job_id, op=write.op, args=write.args,
                        idem=(f"{write.idempotency[0]}:{write.idempotency[1]}",
                              write.fingerprint) if write.idempotency else None,
                        reply=hub.channel)
    app[METRICS].track(write.product_id)
    future = hub.expect(write.job_id)
    try:
        return await _push_expected(app, write, wait, envelope, future)
    except BaseException:  # Redis or the database failed it: it holds no place in the room
        hub.discard(write.job_id, future)
        raise


async def _push_expected(app: web.Application, write: Write, wait: float, envelope: Envelope,
                         future: asyncio.Future[dict[str, Any]]) -> Answer:
    settings, hub = app[SETTINGS], app[REPLIES]
    keyed = write.idempotency is not None
    flags = (KEYED if keyed else ONCE) + (MUST_EXIST if write.must_exist else "")
    args = push_args(envelope, write.admission_qty, settings.job_ttl_seconds, WAKE_TTL_MS,
                     flags, orjson.dumps(_unknown(write)) if keyed else b"",
                     _sold_out_template(write.admission_qty) if keyed else b"")
    push_keys_ = push_keys(write.product_id, write.job_id)
    code = await app[SCRIPTS].push(push_keys_, args, write.product_id)
    if code[0] == 3:  # product not cached yet: read it once, then try again
        await cache_product(app, write.product_id)
        code = await app[SCRIPTS].push(push_keys_, args, write.product_id)
    if code[0] in (0, 1, 2, 6):
        hub.note_push(write.product_id, sold_out=code[0] == 2)
    if code[0] in (2, 3, 4):  # decided here; a keyed answer was stored by the script
        hub.discard(write.job_id, future)
        if code[0] != 2:
            return Answer(write.job_id, _unknown(write))
        app[METRICS].holds_refused_fast.inc()
        return Answer(write.job_id, {"status": 409, "body": insufficient_stock(
            int(code[1]), write.admission_qty)})
    if code[0] == 1:  # woken, and no drainer to come: enqueue one (rq is synchronous)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(app[EXECUTOR], enqueue_drain_job, app[SYNC_REDIS])
    if wait <= 0:  # respond-async (or wait=0): 202 at once, even if a drainer was quicker
        hub.discard(write.job_id, future)
        return Answer(write.job_id, None, "queued", _resource(write))
    status, result = await hub.wait(write.job_id, future, wait)
    return Answer(write.job_id, result, status, _resource(write))


def _unknown(write: Write) -> dict[str, Any]:
    """The answer when the write's product does not exist (built only when needed: it is
    sent with a keyed push, or returned)."""
    return {"status": 404, "body": write.unknown or not_found("Product", write.product_id)}


AVAILABLE = -7_777_777  # placeholder, replaced by the script with the units left


def _sold_out_template(qty: int) -> bytes:
    body = insufficient_stock(AVAILABLE, qty)
    return orjson.dumps({"status": 409, "body": body}).replace(
        str(AVAILABLE).encode(), b"__AVAILABLE__")


def _resource(write: Write) -> tuple[str, str] | None:
    if write.resource and write.resource in write.args:
        return write.resource, str(write.args[write.resource])
    return None


async def cache_product(app: web.Application, product_id: int) -> dict[str, Any] | None:
    """Fill the product cache from the database (only if absent); None if unknown.

    The first requests for a product arrive together: one database read serves them all.
    """
    filling = app[FILLING]
    pending = filling.get(product_id)
    if pending is None:
        pending = filling[product_id] = asyncio.ensure_future(_fill(app, product_id))
        pending.add_done_callback(lambda _: filling.pop(product_id, None))
    return await asyncio.shield(pending)


async def _fill(app: web.Application, product_id: int) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    view = await loop.run_in_executor(app[EXECUTOR], reads.product_view, product_id)
    if view is None:  # remembered for a few seconds: a flood of unknown ids reads once
        await app[SCRIPTS].pipe.evalsha(MISSING, [keys.product(product_id)], [MISSING_TTL_MS])
        return None
    flat: list[Any] = []
    for name, value in product_fields(view).items():
        flat += [name, value]
    await app[SCRIPTS].fill(keys=fill_keys(product_id), args=flat)
    return view


async def cache_created(app: web.Application, view: dict[str, Any]) -> None:
    """Cache a product its creation just committed (``view`` is the 201 body), so that its
    first requests need no database read: a drop's products are hot from their first
    second. FILL replaces a "missing" marker and writes nothing over a newer value."""
    product_id = int(view["id"])
    if all(name in view for name in PRODUCT_FIELDS):
        flat: list[Any] = []
        for name, value in product_fields(view).items():
            flat += [name, value]
        await app[SCRIPTS].fill(keys=fill_keys(product_id), args=flat)


async def product_from_cache(app: web.Application, product_id: int) -> dict[str, Any] | None:
    """The product as the cache has it, reading through to the database on a miss."""
    cached = cast(dict[bytes, bytes],
                  await app[SCRIPTS].pipe.execute("HGETALL", keys.product(product_id)))
    if b"stock" in cached:
        return {"id": int(cached[b"id"]), "name": cached[b"name"].decode(),
                "price_cents": int(cached[b"price_cents"]),
                "currency": cached[b"currency"].decode(), "stock": int(cached[b"stock"]),
                "available": max(int(cached[b"available"]), 0)}
    if b"missing" in cached:
        return None
    return await cache_product(app, product_id)
