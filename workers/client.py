"""Pushing envelopes from synchronous code (scheduler jobs, CLI, tests)."""

from __future__ import annotations

import time

import redis

from workers import keys
from workers.planes import HEARTBEAT_MS, Planes, as_planes, wake
from workers.protocol import PUSH, Envelope, push_args, push_keys

WAKE_TTL_MS = 15_000


def push(planes: Planes | redis.Redis, product_id: int, envelope: Envelope, job_ttl: int,
         qty: int = 0) -> list[int]:
    """Queue ``envelope`` behind the product's other requests; wake a drainer if needed."""
    planes = as_planes(planes)
    code = planes.data.register_script(PUSH)(
        keys=push_keys(product_id, envelope.id),
        args=push_args(envelope, qty, job_ttl, WAKE_TTL_MS))
    if code[0] == 1:
        wake(planes, product_id)
    return [int(c) for c in code]


def rewake_stalled(planes: Planes | redis.Redis, product_ids: list[int]) -> int:
    """Wake a drainer for each product with queued work and no live drainer.

    A drainer that died left its lease to expire and its product off the ready list; a
    drain job that died may have left products on the ready list with no drainer to come.
    """
    planes = as_planes(planes)
    control, data = planes.control, planes.data
    now_ms = int(time.time() * 1000)
    control.zremrangebyscore(keys.DRAINERS, "-inf", now_ms - HEARTBEAT_MS)
    pipe = data.pipeline(transaction=False)
    for pid in product_ids:
        pipe.llen(keys.queue(pid))
        pipe.llen(keys.inflight(pid))
        pipe.exists(keys.lease(pid))
    state = pipe.execute()
    waiting = {int(pid) for pid in control.lrange(keys.READY, 0, -1)}
    woken = 0
    for n, pid in enumerate(product_ids):
        queued, inflight, leased = state[3 * n:3 * n + 3]
        if (queued or inflight) and not leased and pid not in waiting:
            data.set(keys.wake(pid), "1", px=WAKE_TTL_MS)
            wake(planes, pid)
            woken += 1
    if waiting:
        wake(planes, None)  # a drainer for what already waits, if none is at work
    return woken
