"""The rq job that drains ready products' queues, batch after batch, under their leases."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, cast

import orjson
import redis
from redis.exceptions import NoScriptError
from rq import get_current_job

from flashsale.config import Settings
from flashsale.problems import problem
from workers import keys, stats
from workers.apply import Outcome, apply_batches
from workers.client import parse_id
from workers.decide import Policy, Request, Result
from workers.planes import Planes, as_planes, enqueue_drain_job, evalsha
from workers.protocol import (
    FINISH,
    RELEASE,
    RETIRE,
    TAKE,
    Envelope,
    adds_units,
    finish_args,
    finish_keys,
    for_many,
    many_call,
    product_fields,
    take_keys,
)

log = logging.getLogger("flashsale.drain")


# A drain job hands over to a fresh one after this long, so that the maintenance queue
# (expiry sweeps) gets a worker between drain jobs even during a long rush.
DRAIN_JOB_SECONDS = 2.0
# Queue waits are measured on one round in this many (it costs a round trip).
QUEUE_WAIT_SAMPLE = 10
# An idle drain job waits this long for a product to become ready before it leaves. A
# crowd comes back within moments (the clients just answered send again; a drop's next
# products go live), and a job still at work takes their requests at once, where a new
# one would first have to be started by rq: tens of milliseconds on a busy machine, paid
# by every burst (docs/BENCHMARKS.md). A waiting job costs nothing: it blocks in BLPOP.
LINGER_SECONDS = 1.0
# While it waits, it looks this often for maintenance jobs (the sweep) waiting for a
# worker, and leaves at once for them: an idle drain job must not hold them up.
LINGER_STEP_SECONDS = 0.1
# A job woken from that wait by one ready product lets the products made ready with it
# join the same round for this long: a burst's first requests arrive over a few
# milliseconds, and a round of one product pays a whole transaction for one request.
GATHER_SECONDS = 0.002
# A round applies at most this many BATCH_SIZE batches' worth of requests, shared by its
# products, so that one transaction stays well within the drainer's lease.
ROUND_BATCHES = 10
# Envelopes the scheduler pushes, at most one pending per product (see schedules.jobs).
CONTROL_OPS = ("expire", "retry_webhooks")


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings.from_env()


def planes_for(control: redis.Redis) -> Planes:
    """This process's planes around rq's connection (a cluster client is made once)."""
    cached = _PLANES.get(id(control))
    if cached is None or cached.control is not control:
        cached = _PLANES[id(control)] = Planes.connect(settings(), control)
    return cached


_PLANES: dict[int, Planes] = {}


def drain(product_id: int | None = None) -> int:
    """rq entry point: drain ready products, many at a time; returns requests applied.

    Each round takes a batch from every product the job holds (up to DRAIN_PRODUCTS of
    them, from the front of the ready list) and applies them all in one transaction.
    Products that become ready meanwhile join the next round while there is room; when
    there is none, the job hands its products back to the end of the ready list after the
    round, so many hot products share the drainers fairly and none waits for long. The
    job leaves when nothing has been ready for LINGER_SECONDS (at once when a maintenance
    job waits for its worker), or hands over to a fresh job after DRAIN_JOB_SECONDS.
    """
    job = get_current_job()
    planes = planes_for(job.connection) if job is not None else Planes.connect(settings())
    conn = planes.control
    me = job.id if job is not None else secrets.token_hex(8)
    retire = conn.register_script(RETIRE)
    drainer = Drainer(planes, settings(), name=me)
    deadline = time.monotonic() + DRAIN_JOB_SECONDS
    if product_id is not None:  # a job enqueued by an earlier release names its product
        conn.rpush(keys.READY, product_id)
    applied = 0
    room = drainer.config.drain_products
    try:
        while time.monotonic() < deadline:
            if drainer.others_waiting and len(drainer.held) >= room:
                drainer.hand_back()  # more products are hot than one round takes: rotate
            fresh: list[int] = []
            if not drainer.held or (drainer.others_waiting and len(drainer.held) < room):
                pipe = conn.pipeline(transaction=False)
                pipe.zadd(keys.DRAINERS, {me: int(time.time() * 1000)})  # heartbeat
                pipe.lpop(keys.READY, room - len(drainer.held))
                fresh = _product_ids(cast(list[bytes] | None, pipe.execute()[1]) or [])
                if not fresh and not drainer.held:
                    # Wait for the next burst (LINGER_SECONDS), gather what comes with
                    # its first product, or leave.
                    popped = _linger(conn)
                    if popped is not None:
                        fresh = popped + _gather(conn, room - 1)
                    elif retire(keys=[keys.READY, keys.DRAINERS], args=[me]):
                        return applied
                    else:
                        continue
            applied += drainer.round(fresh)
        drainer.hand_back()
        if conn.llen(keys.READY):  # time is up: a fresh job carries on
            enqueue_drain_job(conn)
    except BaseException:
        drainer.release_all()
        raise
    finally:
        conn.zrem(keys.DRAINERS, me)
    return applied


def _linger(conn: redis.Redis) -> list[int] | None:
    """Wait up to LINGER_SECONDS for a product to become ready; the one popped, or None
    when none came (or a maintenance job waits for this worker)."""
    until = time.monotonic() + LINGER_SECONDS
    while True:
        left = until - time.monotonic()
        popped = conn.blpop([keys.READY], timeout=max(0.01, min(LINGER_STEP_SECONDS, left)))
        if popped is not None:
            return _product_ids([cast(tuple[bytes, bytes], popped)[1]])
        if left <= LINGER_STEP_SECONDS or conn.llen(keys.MAINTENANCE_JOBS):
            return None


def _gather(conn: redis.Redis, room: int) -> list[int]:
    """After an idle wait ended by one product: up to ``room`` more made ready within
    GATHER_SECONDS of it."""
    if room <= 0:
        return []
    time.sleep(GATHER_SECONDS)
    return _product_ids(cast(list[bytes] | None, conn.lpop(keys.READY, room)) or [])


def _product_ids(members: list[bytes]) -> list[int]:
    """The product ids popped from the ready list. Only READY and the drainers write it;
    a member that is no product id (written by hand) is dropped and logged, not raised on,
    or it would end the job and lose the ids popped with it."""
    ids = [parse_id(m) for m in members]
    if None in ids:
        log.error("ready list member is no product id; dropped",
                  extra={"members": [m[:40] for m in members]})
    return [i for i in ids if i is not None]


class Drainer:
    """Holds the leases of some products and applies their queues, a round at a time:
    one batch of each product, all in one transaction, answered in one Redis round trip.
    That round trip also takes each product's next batch (FINISH), so a product that
    stays hot costs one script call a round, and a round of such products no TAKE.
    """

    def __init__(self, planes: Planes | redis.Redis, config: Settings, name: str = "") -> None:
        planes = self.planes = as_planes(planes)
        self.conn = planes.control  # the ready list, heartbeats and counters
        self.data = planes.data  # the products' keys
        self.config = config
        self.name = name or secrets.token_hex(8)  # its heartbeat in fs:drainers
        self.token = secrets.token_hex(8)  # the value of every lease it holds
        self.policy = self.policy_of(config)
        self.held: list[int] = []  # products whose lease it holds, with work left
        self.taken: dict[int, list[bytes]] = {}  # held products' next batches (FINISH's)
        self.others_waiting = 0  # products on the ready list, seen after the last round
        self.rounds = 0
        self._take = self.data.register_script(TAKE)
        self._finish = self.data.register_script(FINISH)
        self._release = self.data.register_script(RELEASE)
        # On one Redis a round's TAKEs (or FINISHes, or RELEASEs) go in one script call
        # for all its products: redis-py's and Redis's work per call is paid once a round.
        self._many = {} if planes.clustered else {
            script.sha: self.data.register_script(for_many(source))
            for script, source in ((self._take, TAKE), (self._finish, FINISH),
                                   (self._release, RELEASE))}

    @staticmethod
    def policy_of(config: Settings) -> Policy:
        return Policy(hold_ttl_ms=config.hold_ttl_seconds * 1000,
                      order_ttl_ms=config.order_payment_ttl_seconds * 1000,
                      max_qty_per_customer=config.max_qty_per_customer)

    def drain_product(self, product_id: int) -> int:
        """Drain one product until its queue is empty (or another drainer has it)."""
        applied = self.round([product_id])
        while self.held:
            applied += self.round([])
        return applied

    def round(self, fresh: list[int]) -> int:
        """TAKE a batch of every held product and of ``fresh`` ones (taking their free
        leases), apply them all in one transaction, answer them; returns their size."""
        # Held products first, then fresh ones, each once: the ready list may name a
        # product twice (a push's wake-up and the sweep's, say).
        candidates = list(dict.fromkeys(self.held + fresh))
        was_held = set(self.held)
        size = self.share(len(candidates))
        taken = {pid: self.taken.pop(pid) for pid in candidates if pid in self.taken}
        to_take = [pid for pid in candidates if pid not in taken]
        if to_take:
            # Should anything fail from here on, release_all gives up every lease TAKE
            # may have taken (RELEASE leaves another drainer's alone).
            self.held = candidates
            replies = self._run_each(self._take, [
                (take_keys(pid), [self.token, size, self.config.lease_ms,
                                  keys.job_prefix(pid), 1]) for pid in to_take])
            for pid, raw in zip(to_take, replies, strict=True):
                if raw is None and pid in was_held:  # (another drainer has it)
                    log.warning("product %d: lease lost", pid)
                if raw:  # (empty: the queue ran dry; the script released lease and wake)
                    taken[pid] = raw
        batches = {pid: taken[pid] for pid in candidates if pid in taken}
        self.held = list(batches)
        return self.step(batches) if batches else 0

    def share(self, products: int) -> int:
        """A product's batch size in a round of ``products``: every product gets its
        share of a round of at most ROUND_BATCHES full batches."""
        return max(1, min(self.config.batch_size,
                          ROUND_BATCHES * self.config.batch_size // max(1, products)))

    def hand_back(self) -> None:
        """Release the held leases and requeue their products; wake flags stay set."""
        if not self.held:
            return
        self._run_each(self._release, [([keys.lease(pid)], [self.token]) for pid in self.held])
        self.conn.rpush(keys.READY, *self.held)  # (a taken batch waits in flight: TAKE's)
        self.held, self.taken = [], {}

    def release_all(self) -> None:
        """After a failure: give up the leases; the sweep wakes a drainer for what is left."""
        for pid in self.held:
            with contextlib.suppress(Exception):
                self._release(keys=[keys.lease(pid)], args=[self.token])
        self.held, self.taken = [], {}

    def step(self, batches: dict[int, list[bytes]]) -> int:
        """Apply a round's batches in one transaction, then answer them: one round trip to
        Redis for every product's results, replies, cache and counters."""
        started = time.perf_counter()
        envelopes: dict[int, list[Envelope]] = {}
        requests: dict[int, list[Request]] = {}
        unreadable: dict[int, dict[str, Result]] = {}
        for pid, raw in batches.items():
            envelopes[pid], unreadable[pid] = _decode(raw)
            requests[pid] = _unique(envelopes[pid])
        self.rounds += 1
        waited = None
        if self.rounds % QUEUE_WAIT_SAMPLE == 1:  # one round in ten: one more round trip
            waited = stats.queue_wait_seconds(
                self.data, [env[0].id for env in envelopes.values() if env],
                self.config.job_ttl_seconds)
        outcomes = apply_batches(requests, self.policy)
        committed = time.perf_counter()
        calls, answers = [], {}
        take = self.share(len(outcomes))  # the next round's batches, taken by FINISH
        for pid, outcome in outcomes.items():
            outcome.results.update(unreadable[pid])
            answers[pid] = self.serialize(envelopes[pid], outcome)
            calls.append(self.answer(pid, envelopes[pid], outcome, answers[pid], take))
        size = sum(len(b) for b in envelopes.values())
        # On one Redis, a single round trip; on a cluster, the scripts (and the sharded
        # replies, sent after them) go to the data plane, the counters to the control one.
        pipe = self.data.pipeline(transaction=False)
        control = pipe if self.data is self.conn else self.conn.pipeline(transaction=False)
        finishes = self._queue_calls(pipe, self._finish, calls)
        if control is pipe:  # one Redis: the replies follow the results they announce
            self._publish(pipe, "PUBLISH", answers, envelopes)
        tally = stats.tally((env.op, result.status, result.body)
                            for pid, outcome in outcomes.items() for env in envelopes[pid]
                            if (result := outcome.results.get(env.id)) is not None)
        stats.record_batch(
            control, size=size, apply_seconds=committed - started,
            commit_seconds=max((o.commit_seconds for o in outcomes.values()), default=0.0),
            queue_wait_seconds=waited, outcomes=tally)
        dead = sum(len(outcome.dead) for outcome in outcomes.values())
        if dead:
            control.incrby(keys.DEAD_LETTERS, dead)
        granted = tally.get(f"hold:{stats.OK}", 0)  # (the log line's figures)
        refused = sum(n for key, n in tally.items() if key.startswith("hold:")) \
            - granted - tally.get(f"hold:{stats.ERROR}", 0)
        control.zadd(keys.DRAINERS, {self.name: int(time.time() * 1000)})  # heartbeat
        control.llen(keys.READY)
        replies = pipe.execute(raise_on_error=False)
        gone = set()  # products whose queue was empty (FINISH released them), or lost
        finished = self._replies(self._finish, calls, replies[:finishes])
        for pid, reply in zip(outcomes, finished, strict=True):
            if isinstance(reply, list):
                self.taken[pid] = reply
            elif reply == 0:  # the next drainer replays the batch: its results are stored
                log.warning("product %d: lease lost", pid)
                gone.add(pid)
            elif reply == 2:
                gone.add(pid)
        self.held = [pid for pid in self.held if pid not in gone]
        if control is not pipe:
            replies = control.execute()
            sharded = self.data.pipeline(transaction=False)
            if self._publish(sharded, "SPUBLISH", answers, envelopes):
                sharded.execute(raise_on_error=False)  # a lost reply is found by polling
        self.others_waiting = int(replies[-1])
        log.info("batch applied", extra={
            "products": len(batches), "product_id": next(iter(batches)), "size": size,
            "granted": granted, "refused": refused,
            "apply_ms": round((committed - started) * 1000, 2),
            "answer_ms": round((time.perf_counter() - committed) * 1000, 2)})
        return size

    @staticmethod
    def _publish(pipe: Any, command: str, answers: dict[int, dict[str, bytes]],
                 envelopes: dict[int, list[Envelope]]) -> int:
        """The round's replies, one message per waiting gateway for all the round's
        products (not one per product batch); on a cluster by SPUBLISH, so that only the
        node owning that gateway's channel carries them. Returns the messages queued.
        Each result goes in as the JSON ``serialize`` made of it (an orjson Fragment)."""
        replies: dict[str, list[Any]] = defaultdict(list)
        for pid, batch in envelopes.items():
            for env in batch:
                if env.reply:
                    replies[env.reply].append([env.id, orjson.Fragment(answers[pid][env.id])])
        for channel, payload in replies.items():
            pipe.execute_command(command, channel, orjson.dumps(payload))
        return len(replies)

    def _run_each(self, script: Any, calls: list[tuple[Sequence[str], list[Any]]]) -> list[Any]:
        """``script`` for each (keys, args), in one round trip (see ``_queue_calls``);
        their replies in order."""
        pipe = self.data.pipeline(transaction=False)
        self._queue_calls(pipe, script, calls)
        return self._replies(script, calls, pipe.execute(raise_on_error=False))

    def _queue_calls(self, pipe: Any, script: Any,
                     calls: list[tuple[Sequence[str], list[Any]]]) -> int:
        """Queue ``script`` for each (keys, args) on ``pipe``: on one Redis as one call of
        its ``for_many`` form, on a cluster one call each. Returns the calls queued."""
        many = self._merged(script, calls)
        if many is not None:
            evalsha(pipe, many.sha, *many_call(calls))
            return 1
        for call_keys, call_args in calls:
            evalsha(pipe, script.sha, call_keys, call_args)
        return len(calls)

    def _merged(self, script: Any, calls: list[tuple[Sequence[str], list[Any]]]) -> Any:
        """The ``for_many`` form of ``script`` if these calls go as one (one Redis, more
        than one call), else None."""
        return self._many.get(script.sha) if len(calls) > 1 else None

    def _replies(self, script: Any, calls: list[tuple[Sequence[str], list[Any]]],
                 replies: list[Any]) -> list[Any]:
        """The replies of ``_queue_calls``' calls, one per (keys, args); a call Redis did
        not know the script of (a new or restarted Redis) is loaded and run again."""
        many = self._merged(script, calls)
        if many is not None:
            (reply,) = replies
            if isinstance(reply, NoScriptError):
                reply = many(*many_call(calls))
            elif isinstance(reply, Exception):
                raise reply
            return list(reply)
        replies = list(replies)
        for n, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                replies[n] = script(keys=calls[n][0], args=calls[n][1])
            elif isinstance(reply, Exception):
                raise reply
        return replies

    @staticmethod
    def serialize(batch: list[Envelope], outcome: Outcome) -> dict[str, bytes]:
        """The JSON of every result a committed batch stores: its requests', those of
        earlier requests it revised, and the answers to its unreadable envelopes."""
        results: dict[str, bytes] = {}
        for env in batch:
            results[env.id] = orjson.dumps(outcome.results[env.id].as_dict())
        for job_id, result in outcome.revised.items():
            results[job_id] = orjson.dumps(result.as_dict())
        for job_id in outcome.results.keys() - results.keys():  # unreadable envelopes
            results[job_id] = orjson.dumps(outcome.results[job_id].as_dict())
        return results

    def answer(self, product_id: int, batch: list[Envelope], outcome: Outcome,
               results: dict[str, bytes], take: int = 0) -> tuple[Sequence[str], list[Any]]:
        """The FINISH call for a committed batch: ``results`` (see ``serialize``; the
        replies are sent for the whole round: _publish), cache, counters, control flags,
        and up to ``take`` requests queued meanwhile taken as the product's next batch."""
        admitted = sum(int(e.args.get("qty", 0)) for e in batch if e.op == "hold")
        adders = sum(1 for e in batch if adds_units(e.op, e.args))
        fields = product_fields(outcome.product) if outcome.product else {}
        delete = [keys.control(product_id, e.op) for e in batch if e.op in CONTROL_OPS]
        return (finish_keys(product_id),
                finish_args(self.token, self.config.lease_ms, self.config.job_cache_seconds,
                            product_id, admitted, fields, results, {},
                            sorted(set(delete)), adders, take))

def _unique(batch: list[Envelope]) -> list[Request]:
    """The batch's requests, each request id once even if it was queued twice."""
    requests, seen = [], set()
    for env in batch:
        if env.id not in seen:
            seen.add(env.id)
            requests.append(Request(id=env.id, op=env.op, args=env.args, idem=env.idem))
    return requests


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
