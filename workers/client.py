"""Pushing envelopes from synchronous code (scheduler jobs, CLI, tests)."""

from __future__ import annotations

import time

import redis

from workers import keys
from workers.drain import HEARTBEAT_MS, wake
from workers.protocol import PUSH, Envelope, push_args, push_keys

WAKE_TTL_MS = 15_000


def push(conn: redis.Redis, product_id: int, envelope: Envelope, job_ttl: int,
         qty: int = 0) -> list[int]:
    """Queue ``envelope`` behind the product's other requests; wake a drainer if needed."""
    code = conn.register_script(PUSH)(keys=push_keys(product_id, envelope.id),
                                      args=push_args(envelope, qty, job_ttl, WAKE_TTL_MS))
    if code[0] == 1:
        wake(conn, product_id)
    return [int(c) for c in code]


def rewake_stalled(conn: redis.Redis, product_ids: list[int]) -> int:
    """Wake a drainer for each product with queued work and no live drainer.

    A drainer that died left its lease to expire and its product off the ready list; a
    drain job that died may have left products on the ready list with no drainer to come.
    """
    now_ms = int(time.time() * 1000)
    conn.zremrangebyscore(keys.DRAINERS, "-inf", now_ms - HEARTBEAT_MS)
    pipe = conn.pipeline(transaction=False)
    for pid in product_ids:
        pipe.llen(keys.queue(pid))
        pipe.llen(keys.inflight(pid))
        pipe.exists(keys.lease(pid))
    pipe.lrange(keys.READY, 0, -1)
    *state, ready = pipe.execute()
    waiting = {int(pid) for pid in ready}
    woken = 0
    for n, pid in enumerate(product_ids):
        queued, inflight, leased = state[3 * n:3 * n + 3]
        if (queued or inflight) and not leased and pid not in waiting:
            conn.set(keys.wake(pid), "1", px=WAKE_TTL_MS)
            wake(conn, pid)
            woken += 1
    if waiting:
        wake(conn, None)  # a drainer for what already waits, if none is at work
    return woken
