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
from redis.exceptions import NoScriptError
from rq import Queue, get_current_job

from flashsale.config import Settings
from flashsale.problems import problem
from workers import keys
from workers.apply import Outcome, apply_batch
from workers.decide import Policy, Request, Result
from workers.protocol import (
    FINISH,
    READY,
    RELEASE,
    RETIRE,
    TAKE,
    Envelope,
    adds_units,
    finish_args,
    product_fields,
    take_keys,
)

log = logging.getLogger("flashsale.drain")

DRAIN_JOB_TIMEOUT = 3600
# A drain job hands over to a fresh one after this long, so that the maintenance queue
# (expiry sweeps) gets a worker between drain jobs even during a long rush.
DRAIN_JOB_SECONDS = 2.0
# A drainer whose heartbeat is older than this is counted as gone (killed).
HEARTBEAT_MS = 30_000
# Envelopes the scheduler pushes, at most one pending per product (see schedules.jobs).
CONTROL_OPS = ("expire", "retry_webhooks")


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings.from_env()


READY_KEYS = [keys.READY, keys.DRAIN_JOBS, keys.DRAINERS, keys.DRAIN_WORKERS]


def wake(conn: redis.Redis, product_id: int | None) -> None:
    """Put the product on the ready list and make sure a drainer will come for it.

    The caller holds the product's wake flag (set by the push script), so this runs once
    per drain cycle of the product, not once per request. A drain job is enqueued only
    when no job waits to start and fewer drainers work than there are workers: busy
    drainers take ready products as they go. With None, only the last part.
    """
    pid = "" if product_id is None else product_id
    if conn.register_script(READY)(keys=READY_KEYS, args=[pid, HEARTBEAT_MS]):
        enqueue_drain_job(conn)


def enqueue_drain_job(conn: redis.Redis) -> None:
    Queue(keys.DRAIN_QUEUE, connection=conn).enqueue(
        "workers.drain.drain", job_timeout=DRAIN_JOB_TIMEOUT, result_ttl=0,
        failure_ttl=24 * 3600, description="drain ready products")


def drain(product_id: int | None = None) -> int:
    """rq entry point: drain ready products, one batch at a time each; returns requests.

    A product with more work after its batch goes back to the end of the ready list when
    other products wait, so many hot products share the drainers fairly. The job leaves
    when nothing is ready, or hands over to a fresh job after DRAIN_JOB_SECONDS.
    """
    job = get_current_job()
    conn = job.connection if job is not None else redis.Redis.from_url(settings().redis_url)
    me = job.id if job is not None else secrets.token_hex(8)
    retire = conn.register_script(RETIRE)
    deadline = time.monotonic() + DRAIN_JOB_SECONDS
    if product_id is not None:  # a job enqueued by an earlier release names its product
        conn.rpush(keys.READY, product_id)
    applied = 0
    try:
        while time.monotonic() < deadline:
            pipe = conn.pipeline(transaction=False)
            pipe.zadd(keys.DRAINERS, {me: int(time.time() * 1000)})  # heartbeat
            pipe.lpop(keys.READY)
            ready = cast(bytes | None, pipe.execute()[1])
            if ready is None:
                if retire(keys=[keys.READY, keys.DRAINERS], args=[me]):
                    return applied
                continue
            applied += Drainer(conn, int(ready), settings()).run(deadline, share=True)
        if conn.llen(keys.READY):  # time is up: a fresh job carries on
            enqueue_drain_job(conn)
    finally:
        conn.zrem(keys.DRAINERS, me)
    return applied


class Drainer:
    """Holds one product's lease and applies its queue in batches."""

    def __init__(self, conn: redis.Redis, product_id: int, config: Settings) -> None:
        self.conn = conn
        self.product_id = product_id
        self.config = config
        self.token = secrets.token_hex(8)
        self.policy = self.policy_of(config)
        self.others_waiting = 0  # products on the ready list, seen after the last batch
        self._take = conn.register_script(TAKE)
        self._finish = conn.register_script(FINISH)
        self._release = conn.register_script(RELEASE)

    @staticmethod
    def policy_of(config: Settings) -> Policy:
        return Policy(hold_ttl_ms=config.hold_ttl_seconds * 1000,
                      order_ttl_ms=config.order_payment_ttl_seconds * 1000,
                      max_qty_per_customer=config.max_qty_per_customer)

    def run(self, deadline: float | None = None, share: bool = False) -> int:
        """Drain until the queue is empty. Past ``deadline``, or with ``share`` when other
        products wait, hand the product back to the ready list after a batch."""
        applied, first = 0, True
        try:
            while True:
                # The first TAKE also takes the lease, if no other drainer holds it.
                raw = self._take(keys=take_keys(self.product_id),
                                 args=[self.token, self.config.batch_size,
                                       self.config.lease_ms,
                                       keys.job_prefix(self.product_id), int(first)])
                if raw is None:  # another drainer has the product and sees our requests
                    if not first:
                        log.warning("product %d: lease lost, stopping", self.product_id)
                    return applied
                first = False
                if not raw:
                    return applied  # queue empty: the script released lease and wake
                applied += self.step(raw)
                if (share and self.others_waiting) or (
                        deadline is not None and time.monotonic() >= deadline):
                    self.hand_back()
                    return applied
        except BaseException:
            self._release(keys=[keys.lease(self.product_id)], args=[self.token])
            raise

    def hand_back(self) -> None:
        """Release the lease and requeue the product; its wake flag stays set."""
        pipe = self.conn.pipeline(transaction=False)
        release_keys = [keys.lease(self.product_id)]
        pipe.evalsha(self._release.sha, 1, *release_keys, self.token)
        pipe.rpush(keys.READY, self.product_id)
        if isinstance(pipe.execute(raise_on_error=False)[0], NoScriptError):
            self._release(keys=release_keys, args=[self.token])

    def step(self, raw: list[bytes]) -> int:
        """Apply one batch in one transaction, then answer it: one round trip to Redis
        for the results, the replies, the cache and the counters."""
        started = time.perf_counter()
        batch, unreadable = _decode(raw)
        requests, seen = [], set()
        for env in batch:  # a request id is applied once, even if queued twice
            if env.id not in seen:
                seen.add(env.id)
                requests.append(Request(id=env.id, op=env.op, args=env.args, idem=env.idem))
        outcome = apply_batch(self.product_id, requests, self.policy)
        outcome.results.update(unreadable)
        committed = time.perf_counter()
        finish_keys, finish_argv = self.answer(batch, outcome)
        pipe = self.conn.pipeline(transaction=False)
        pipe.evalsha(self._finish.sha, len(finish_keys), *finish_keys, *finish_argv)
        granted, refused = self.count(pipe, batch, outcome, committed - started)
        pipe.llen(keys.READY)
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], NoScriptError):  # Redis restarted: load it and run it
            self._finish(keys=finish_keys, args=finish_argv)
        elif isinstance(replies[0], Exception):
            raise replies[0]
        self.others_waiting = replies[-1]
        log.info("batch applied", extra={"product_id": self.product_id, "size": len(batch),
                                         "granted": granted, "refused": refused,
                                         "apply_ms": round((committed - started) * 1000, 2),
                                         "answer_ms": round((time.perf_counter() - committed)
                                                            * 1000, 2)})
        return len(batch)

    def answer(self, batch: list[Envelope], outcome: Outcome) -> tuple[list[str], list[Any]]:
        """The FINISH call for a committed batch: results, replies, cache, control flags."""
        results: dict[str, bytes] = {}
        replies: dict[str, list[Any]] = defaultdict(list)
        for env in batch:
            result = outcome.results[env.id]
            results[env.id] = orjson.dumps(result.as_dict())
            if env.reply:
                replies[env.reply].append([env.id, result.as_dict()])
        for job_id, result in outcome.revised.items():
            results[job_id] = orjson.dumps(result.as_dict())
        for job_id in outcome.results.keys() - results.keys():  # unreadable envelopes
            results[job_id] = orjson.dumps(outcome.results[job_id].as_dict())
        admitted = sum(int(e.args.get("qty", 0)) for e in batch if e.op == "hold")
        adders = sum(1 for e in batch if adds_units(e.op, e.args))
        fields = product_fields(outcome.product) if outcome.product else {}
        delete = [keys.control(self.product_id, e.op) for e in batch if e.op in CONTROL_OPS]
        return ([keys.inflight(self.product_id), keys.lease(self.product_id),
                 keys.product(self.product_id)],
                finish_args(self.token, self.config.lease_ms, self.config.job_cache_seconds,
                            self.product_id, admitted, fields, results,
                            {ch: orjson.dumps(r) for ch, r in replies.items()},
                            sorted(set(delete)), adders))

    def count(self, pipe: Any, batch: list[Envelope], outcome: Outcome,
              apply_s: float) -> tuple[int, int]:
        """Add the batch to the shared counters that the gateway's /metrics exposes."""
        granted = sum(1 for e in batch if e.op == "hold" and _status(outcome, e.id) == 201)
        refused = sum(1 for e in batch if e.op == "hold" and _status(outcome, e.id) == 409)
        pipe.hincrby(keys.BATCH_STATS, "batches", 1)
        pipe.hincrby(keys.BATCH_STATS, "requests", len(batch))
        pipe.hincrby(keys.BATCH_STATS, f"size_le_{_bucket(len(batch))}", 1)
        pipe.hincrby(keys.BATCH_STATS, "holds_granted", granted)
        pipe.hincrby(keys.BATCH_STATS, "holds_refused_worker", refused)
        pipe.hincrbyfloat(keys.BATCH_STATS, "apply_seconds", apply_s)
        if outcome.dead:
            pipe.incrby(keys.DEAD_LETTERS, len(outcome.dead))
        return granted, refused


BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000)


def _bucket(size: int) -> str:
    for bound in BATCH_BUCKETS:
        if size <= bound:
            return str(bound)
    return "inf"


def _decode(raw: list[bytes]) -> tuple[list[Envelope], dict[str, Result]]:
    """The batch's envelopes, and an answer for each that cannot be read (only a bug or
    a hand-made queue entry could put one there; it must not stop the queue)."""
    batch: list[Envelope] = []
    unreadable: dict[str, Result] = {}
    for item in raw:
        try:
            batch.append(Envelope.decode(item))
        except Exception as exc:
            job_id = item.partition(b" ")[0].decode(errors="replace")
            log.error("unreadable envelope %r dropped: %r", item[:200], exc)
            if keys.parse_partition(job_id, "job") is not None:
                unreadable[job_id] = Result(500, problem(
                    500, detail="The request could not be read", slug="set-aside"))
    return batch, unreadable


def _status(outcome: Outcome, job_id: str) -> int:
    result: Result | None = outcome.results.get(job_id)
    return result.status if result else 0
