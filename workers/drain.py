"""The rq job that drains ready products' queues, batch after batch, under their leases."""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from functools import lru_cache
from typing import Any, cast

import orjson
import redis
from rq import Queue, get_current_job

from flashsale.config import Settings
from workers import keys
from workers.apply import Outcome, apply_batch
from workers.decide import Policy, Request, Result
from workers.protocol import (
    FINISH,
    READY,
    RELEASE,
    TAKE,
    Envelope,
    finish_args,
    product_fields,
    take_keys,
)

log = logging.getLogger("flashsale.drain")

DRAIN_JOB_TIMEOUT = 3600
DRAIN_JOB_SECONDS = 300
# Envelopes the scheduler pushes, at most one pending per product (see schedules.jobs).
CONTROL_OPS = ("expire", "retry_webhooks")


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings.from_env()


def wake(conn: redis.Redis, product_id: int) -> None:
    """Put the product on the ready list and make sure a drain job will come for it.

    The caller holds the product's wake flag (set by the push script), so this runs once
    per drain cycle of the product, not once per request.
    """
    if conn.register_script(READY)(keys=[keys.READY, keys.DRAIN_JOBS], args=[product_id]):
        enqueue_drain_job(conn)


def enqueue_drain_job(conn: redis.Redis) -> None:
    Queue(keys.DRAIN_QUEUE, connection=conn).enqueue(
        "workers.drain.drain", job_timeout=DRAIN_JOB_TIMEOUT, result_ttl=0,
        failure_ttl=24 * 3600, description="drain ready products")


def drain(product_id: int | None = None) -> int:
    """rq entry point: drain ready products until none is left; returns requests applied.

    Each product is drained until its queue is empty, under its lease; then the job takes
    the next ready product. One job thus serves many lukewarm products without an rq job
    each; after DRAIN_JOB_SECONDS it hands what is left to a fresh job.
    """
    job = get_current_job()
    conn = job.connection if job is not None else redis.Redis.from_url(settings().redis_url)
    started = time.monotonic()
    applied = Drainer(conn, product_id, settings()).run() if product_id is not None else 0
    while (ready := cast(bytes | None, conn.lpop(keys.READY))) is not None:
        applied += Drainer(conn, int(ready), settings()).run()
        if time.monotonic() - started > DRAIN_JOB_SECONDS:
            if conn.llen(keys.READY):
                enqueue_drain_job(conn)
            break
    return applied


class Drainer:
    """Holds one product's lease and applies its queue in batches."""

    def __init__(self, conn: redis.Redis, product_id: int, config: Settings) -> None:
        self.conn = conn
        self.product_id = product_id
        self.config = config
        self.token = secrets.token_hex(8)
        self.policy = Policy(hold_ttl_ms=config.hold_ttl_seconds * 1000,
                             order_ttl_ms=config.order_payment_ttl_seconds * 1000)
        self._take = conn.register_script(TAKE)
        self._finish = conn.register_script(FINISH)

    def run(self) -> int:
        lease = keys.lease(self.product_id)
        if not self.conn.set(lease, self.token, nx=True, px=self.config.lease_ms):
            return 0  # another drainer holds the product and will see our requests
        applied = 0
        try:
            while True:
                raw = self._take(keys=take_keys(self.product_id),
                                 args=[self.token, self.config.batch_size,
                                       self.config.lease_ms,
                                       keys.job_prefix(self.product_id)])
                if raw is None:
                    log.warning("product %d: lease lost, stopping", self.product_id)
                    return applied
                if not raw:
                    return applied  # queue empty: the script released lease and wake
                applied += self.step([Envelope.decode(item) for item in raw])
        except BaseException:
            self.conn.register_script(RELEASE)(keys=[lease], args=[self.token])
            raise

    def step(self, batch: list[Envelope]) -> int:
        """Apply one batch in one transaction, then answer it."""
        started = time.perf_counter()
        requests = [Request(id=e.id, op=e.op, args=e.args, idem=e.idem) for e in batch]
        outcome = apply_batch(self.product_id, requests, self.policy)
        committed = time.perf_counter()
        self.answer(batch, outcome)
        self.record(batch, outcome, committed - started, time.perf_counter() - committed)
        return len(batch)

    def answer(self, batch: list[Envelope], outcome: Outcome) -> None:
        """Store results, publish replies, refresh the cache: one script call."""
        results: dict[str, bytes] = {}
        replies: dict[str, list[Any]] = defaultdict(list)
        for env in batch:
            result = outcome.results[env.id]
            results[env.id] = orjson.dumps(result.as_dict())
            if env.reply:
                replies[env.reply].append([env.id, result.as_dict()])
        for job_id, result in outcome.revised.items():
            results[job_id] = orjson.dumps(result.as_dict())
        admitted = sum(int(e.args.get("qty", 0)) for e in batch if e.op == "hold")
        fields = product_fields(outcome.product) if outcome.product else {}
        delete = [keys.control(self.product_id, e.op) for e in batch if e.op in CONTROL_OPS]
        self._finish(keys=[keys.inflight(self.product_id), keys.lease(self.product_id),
                           keys.product(self.product_id)],
                     args=finish_args(self.token, self.config.lease_ms,
                                      self.config.job_cache_seconds, self.product_id, admitted,
                                      fields, results,
                                      {ch: orjson.dumps(r) for ch, r in replies.items()},
                                      sorted(set(delete))))

    def record(self, batch: list[Envelope], outcome: Outcome, apply_s: float,
               answer_s: float) -> None:
        """One log line and the shared batch counters the gateway's /metrics exposes."""
        granted = sum(1 for e in batch if e.op == "hold" and _status(outcome, e.id) == 201)
        refused = sum(1 for e in batch if e.op == "hold" and _status(outcome, e.id) == 409)
        log.info("batch applied", extra={"product_id": self.product_id, "size": len(batch),
                                         "granted": granted, "refused": refused,
                                         "apply_ms": round(apply_s * 1000, 2),
                                         "answer_ms": round(answer_s * 1000, 2)})
        pipe = self.conn.pipeline(transaction=False)
        pipe.hincrby(keys.BATCH_STATS, "batches", 1)
        pipe.hincrby(keys.BATCH_STATS, "requests", len(batch))
        pipe.hincrby(keys.BATCH_STATS, f"size_le_{_bucket(len(batch))}", 1)
        pipe.hincrby(keys.BATCH_STATS, "holds_granted", granted)
        pipe.hincrby(keys.BATCH_STATS, "holds_refused_worker", refused)
        pipe.hincrbyfloat(keys.BATCH_STATS, "apply_seconds", apply_s)
        pipe.execute()


BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000)


def _bucket(size: int) -> str:
    for bound in BATCH_BUCKETS:
        if size <= bound:
            return str(bound)
    return "inf"


def _status(outcome: Outcome, job_id: str) -> int:
    result: Result | None = outcome.results.get(job_id)
    return result.status if result else 0
