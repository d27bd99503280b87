"""Pushing envelopes from synchronous code (scheduler jobs, CLI, tests)."""

from __future__ import annotations

import redis

from workers import keys
from workers.drain import enqueue_drain
from workers.protocol import PUSH, Envelope, push_keys

WAKE_TTL_MS = 15_000


def push(conn: redis.Redis, product_id: int, envelope: Envelope, job_ttl: int,
         qty: int = 0) -> list[int]:
    """Queue ``envelope`` behind the product's other requests; wake a drainer if needed."""
    code = conn.register_script(PUSH)(keys=push_keys(product_id, envelope.id),
                                      args=[envelope.encode(), qty, job_ttl, WAKE_TTL_MS])
    if code[0] == 1:
        enqueue_drain(conn, product_id)
    return [int(c) for c in code]


def rewake_stalled(conn: redis.Redis, product_ids: list[int]) -> int:
    """Wake a drainer for each product with queued work and no live drainer."""
    pipe = conn.pipeline(transaction=False)
    for pid in product_ids:
        pipe.llen(keys.queue(pid))
        pipe.llen(keys.inflight(pid))
        pipe.exists(keys.lease(pid))
    state = pipe.execute()
    woken = 0
    for n, pid in enumerate(product_ids):
        queued, inflight, leased = state[3 * n:3 * n + 3]
        if (queued or inflight) and not leased:
            conn.set(keys.wake(pid), "1", px=WAKE_TTL_MS)
            enqueue_drain(conn, pid)
            woken += 1
    return woken
