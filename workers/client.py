"""Pushing envelopes from synchronous code (scheduler jobs, CLI, tests)."""

from __future__ import annotations

import time
from typing import Any

import redis

from workers import keys
from workers.planes import (
    HEARTBEAT_MS,
    Planes,
    as_planes,
    enqueue_drain_job,
    push_ready_call,
    wake,
)
from workers.protocol import FORGET, PUSH, PUSH_READY, Envelope, push_args, push_keys

WAKE_TTL_MS = 15_000


def push(planes: Planes | redis.Redis, product_id: int, envelope: Envelope, job_ttl: int,
         qty: int = 0) -> list[int]:
    """Queue ``envelope`` behind the product's other requests; wake a drainer if needed.

    PUSH's reply, except that a push that woke the product answers {1} when it enqueued
    a drain job and {6} when a drainer at work or waiting takes the product (on one
    Redis, PUSH_READY: PUSH and READY as one script)."""
    planes = as_planes(planes)
    args = push_args(envelope, qty, job_ttl, WAKE_TTL_MS)
    if planes.data is planes.control:
        call_keys, call_args = push_ready_call(push_keys(product_id, envelope.id), args,
                                               product_id)
        code = [int(c) for c in planes.data.register_script(PUSH_READY)(
            keys=call_keys, args=call_args)]
        if code[0] == 1:
            enqueue_drain_job(planes.control)
        return code
    code = [int(c) for c in planes.data.register_script(PUSH)(
        keys=push_keys(product_id, envelope.id), args=args)]
    if code[0] == 1 and not wake(planes, product_id):
        return [6]
    return code


def rewake_stalled(planes: Planes | redis.Redis, product_ids: list[int]) -> int:
    """Wake a drainer for each of ``product_ids`` with queued work and no live drainer;
    returns how many were woken.

    A drainer that died left its lease to expire and its product off the ready list; a
    drain job that died may have left products on the ready list with no drainer to come.
    """
    return _rewake(as_planes(planes), product_ids)[0]


def sweep_stalled(planes: Planes | redis.Redis, catalog_slice: list[int]) -> int:
    """The sweep's re-wake: of the products woken since the sweep last found them idle
    (``fs:woken``, counted by READY) and of a slice of the catalog (for a product that
    was never counted: woken by an older release, or while the control plane lost its
    data). Forgets the counted products it finds idle, unless woken again meanwhile, so
    that a sweep costs what the products at work cost, not what the catalog does."""
    planes = as_planes(planes)
    counts: dict[int, Any] = {}
    for member, count in planes.control.hgetall(keys.WOKEN).items():
        pid = parse_id(member)
        if pid is None:  # not written by READY: dropped, so that it fails no sweep
            planes.control.hdel(keys.WOKEN, member)
        else:
            counts[pid] = count
    woken, idle = _rewake(planes, list(dict.fromkeys([keys.CATALOG, *counts, *catalog_slice])))
    forget = [v for pid in idle if pid in counts for v in (pid, counts[pid])]
    if forget:
        planes.control.register_script(FORGET)(keys=[keys.WOKEN], args=forget)
    return woken


def _rewake(planes: Planes, product_ids: list[int]) -> tuple[int, list[int]]:
    """Wake the stalled products among ``product_ids``; returns how many, and the idle
    ones (nothing queued or in flight, no lease, no wake flag: a push will wake them).

    The ready list is read before the products' keys, and again (with the leases) before
    waking any. A hot product moves from the ready list to a lease (a drainer takes it)
    and back (a drainer hands it back) many times a second: read the other way round, a
    product taken meanwhile looked stalled, and a busy sweep woke dozens of products at
    work, each one more entry on the ready list and perhaps one more drain job.
    """
    control, data = planes.control, planes.data
    now_ms = int(time.time() * 1000)
    control.zremrangebyscore(keys.DRAINERS, "-inf", now_ms - HEARTBEAT_MS)
    waiting = _ready(control)
    pipe = data.pipeline(transaction=False)
    for pid in product_ids:
        pipe.llen(keys.queue(pid))
        pipe.llen(keys.inflight(pid))
        pipe.exists(keys.lease(pid))
        pipe.exists(keys.wake(pid))
    state = pipe.execute()
    stalled, idle = [], []
    for n, pid in enumerate(product_ids):
        queued, inflight, leased, flagged = state[4 * n:4 * n + 4]
        if (queued or inflight) and not leased and pid not in waiting:
            stalled.append(pid)
        elif not (queued or inflight or leased or flagged):
            idle.append(pid)
    if stalled:  # still neither on the ready list nor leased?
        waiting |= _ready(control)
        pipe = data.pipeline(transaction=False)
        for pid in stalled:
            pipe.exists(keys.lease(pid))
        stalled = [pid for pid, leased in zip(stalled, pipe.execute(), strict=True)
                   if not leased and pid not in waiting]
    for pid in stalled:
        data.set(keys.wake(pid), "1", px=WAKE_TTL_MS)
        wake(planes, pid)
    if waiting:
        wake(planes, None)  # a drainer for what already waits, if none is at work
    return len(stalled), idle


def parse_id(raw: bytes | str) -> int | None:
    """A product id as READY writes it (ASCII digits), else None."""
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 20 else None


def _ready(control: redis.Redis) -> set[int]:
    return {pid for pid in map(parse_id, control.lrange(keys.READY, 0, -1)) if pid is not None}
