"""The drainer on real Redis and MariaDB: batches, crash recovery, exactly-once effects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

import models
from flashsale.config import Settings
from models import Hold, Order, Product, RequestRecord
from workers import drain as drain_module
from workers import keys, reads
from workers.apply import apply_batch
from workers.client import push
from workers.decide import Policy, Request
from workers.drain import Drainer
from workers.protocol import FILL, TAKE, Envelope, fill_keys, product_fields, take_keys

pytestmark = pytest.mark.integration

SETTINGS = Settings(batch_size=4, lease_ms=2_000, job_ttl_seconds=3_600)
POLICY = Policy(hold_ttl_ms=SETTINGS.hold_ttl_seconds * 1000,
                order_ttl_ms=SETTINGS.order_payment_ttl_seconds * 1000)
REPLY = "fs:reply:integration"


def hold_envelope(pid: int, qty: int, reply: str | None = None) -> Envelope:
    return Envelope(id=keys.new_id("job", pid), op="hold", reply=reply,
                    args={"product_id": pid, "qty": qty, "hold_id": keys.new_id("hold", pid)})


def fill_cache(conn: redis.Redis, pid: int) -> None:
    """What the gateway does on its first request for the product."""
    view = reads.product_view(pid)
    assert view is not None
    flat: list[Any] = []
    for name, value in product_fields(view).items():
        flat += [name, value]
    conn.register_script(FILL)(keys=fill_keys(pid), args=flat)


def push_holds(conn: redis.Redis, pid: int, qtys: list[int], admit: bool = True,
               reply: str | None = None) -> list[Envelope]:
    envelopes = [hold_envelope(pid, qty, reply) for qty in qtys]
    for env in envelopes:
        code = push(conn, pid, env, SETTINGS.job_ttl_seconds, qty=env.args["qty"] if admit else 0)
        assert code[0] in (0, 1, 6), code
    return envelopes


def take_as_crashed_drainer(conn: redis.Redis, pid: int, n: int,
                            lease_ms: int = 2_000) -> list[Envelope]:
    """A drainer takes a batch under its lease (the first steps of ``Drainer.run``)."""
    assert conn.set(keys.lease(pid), "crashed-drainer", nx=True, px=lease_ms)
    raw = conn.register_script(TAKE)(keys=take_keys(pid),
                                     args=["crashed-drainer", n, lease_ms,
                                           keys.job_prefix(pid)])
    assert raw
    return [Envelope.decode(item) for item in raw]


def job_result(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    raw = conn.get(keys.job(job_id))
    assert raw is not None and raw not in (b"queued", b"processing"), (job_id, raw)
    return orjson.loads(raw)


def cache(conn: redis.Redis, pid: int) -> dict[str, int]:
    fields = conn.hgetall(keys.product(pid))
    return {name: int(fields[name.encode()]) for name in ("stock", "available", "queued")}


def assert_drained(conn: redis.Redis, pid: int) -> None:
    assert conn.exists(keys.queue(pid), keys.inflight(pid), keys.lease(pid),
                       keys.wake(pid)) == 0


def assert_applied_once(envelopes: list[Envelope], pid: int) -> None:
    """One hold row per granted request, and ``reserved`` counts each exactly once."""
    rows = list(Hold.select().where(Hold.product == pid))
    assert sorted(h.request_id for h in rows) == sorted(e.id for e in envelopes)
    assert {h.id for h in rows} == {e.args["hold_id"] for e in envelopes}
    assert Product.get_by_id(pid).reserved == sum(e.args["qty"] for e in envelopes)
    assert RequestRecord.select().where(
        RequestRecord.id.in_([e.id for e in envelopes])).count() == len(envelopes)


def test_one_run_applies_every_queued_request_and_answers_it(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    pid = new_product(stock=10)
    fill_cache(redis_conn, pid)
    admitted = push_holds(redis_conn, pid, [2, 2, 2, 2], reply=REPLY)
    unadmitted = push_holds(redis_conn, pid, [2, 2], admit=False, reply=REPLY)
    envelopes = admitted + unadmitted
    assert cache(redis_conn, pid)["queued"] == 8
    sub = redis_conn.pubsub()
    sub.subscribe(REPLY)
    assert sub.get_message(timeout=1)["type"] == "subscribe"

    applied = Drainer(redis_conn, SETTINGS).drain_product(pid)

    assert applied == 6
    results = [job_result(redis_conn, e.id) for e in envelopes]
    assert [r["status"] for r in results] == [201] * 5 + [409]
    assert [r["body"]["hold_id"] for r in results[:5]] == \
        [e.args["hold_id"] for e in envelopes[:5]]
    assert results[5]["body"]["available"] == 0
    assert_applied_once(envelopes[:5], pid)
    assert cache(redis_conn, pid) == {"stock": 10, "available": 0, "queued": 0}
    assert_drained(redis_conn, pid)
    replies = []
    while (msg := sub.get_message(timeout=0.1)) is not None:
        replies += orjson.loads(msg["data"])
    sub.close()
    assert replies == [[e.id, r] for e, r in zip(envelopes, results, strict=True)]


def test_hold_order_and_payment_in_one_batch(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    pid = new_product(stock=5, price_cents=250)
    hold_env = hold_envelope(pid, 2)
    order_id = keys.new_id("ord", pid)
    order_env = Envelope(id=keys.new_id("job", pid), op="order",
                         args={"hold_id": hold_env.args["hold_id"], "order_id": order_id})
    pay_env = Envelope(id=keys.new_id("job", pid), op="webhook",
                       args={"idempotency_key": keys.new_id("evt", pid), "order_id": order_id,
                             "status": "paid", "fingerprint": "fp"})
    for env in (hold_env, order_env, pay_env):
        push(redis_conn, pid, env, SETTINGS.job_ttl_seconds)

    assert Drainer(redis_conn, SETTINGS).drain_product(pid) == 3

    order_result = job_result(redis_conn, order_env.id)
    assert job_result(redis_conn, hold_env.id)["status"] == 201
    assert (order_result["status"], order_result["body"]["amount_cents"]) == (201, 500)
    assert job_result(redis_conn, pay_env.id)["body"]["outcome"] == "applied"
    assert Order.get_by_id(order_id).status == "paid"
    product = Product.get_by_id(pid)
    assert (product.stock, product.reserved) == (3, 0)
    assert cache(redis_conn, pid)["available"] == 3


def test_a_batch_taken_by_a_drainer_that_died_before_commit_is_applied_exactly_once(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    pid = new_product(stock=10)
    fill_cache(redis_conn, pid)
    envelopes = push_holds(redis_conn, pid, [1, 2, 3, 1, 2])
    taken = take_as_crashed_drainer(redis_conn, pid, n=3, lease_ms=100)
    assert [e.id for e in taken] == [e.id for e in envelopes[:3]]
    assert redis_conn.get(keys.job(taken[0].id)) == b"processing"
    deadline = time.monotonic() + 2  # the dead drainer's lease runs out
    while redis_conn.exists(keys.lease(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert Hold.select().where(Hold.product == pid).count() == 0

    applied = Drainer(redis_conn, SETTINGS).drain_product(pid)

    assert applied == 5
    assert [job_result(redis_conn, e.id)["status"] for e in envelopes] == [201] * 5
    assert_applied_once(envelopes, pid)
    assert cache(redis_conn, pid) == {"stock": 10, "available": 1, "queued": 0}
    assert_drained(redis_conn, pid)


def test_a_batch_committed_by_a_drainer_that_died_before_finish_is_replayed(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    pid = new_product(stock=10)
    fill_cache(redis_conn, pid)
    envelopes = push_holds(redis_conn, pid, [2, 3, 1])
    taken = take_as_crashed_drainer(redis_conn, pid, n=10)
    committed = apply_batch(pid, [Request(id=e.id, op=e.op, args=e.args, idem=e.idem)
                                  for e in taken], POLICY)
    redis_conn.delete(keys.lease(pid))  # died: no FINISH, its lease gone
    assert redis_conn.get(keys.job(envelopes[0].id)) == b"processing"

    applied = Drainer(redis_conn, SETTINGS).drain_product(pid)

    assert applied == 3
    for env in envelopes:
        assert job_result(redis_conn, env.id) == committed.results[env.id].as_dict()
    assert_applied_once(envelopes, pid)
    assert cache(redis_conn, pid) == {"stock": 10, "available": 4, "queued": 0}
    assert_drained(redis_conn, pid)


def test_a_run_while_another_drainer_holds_the_lease_does_nothing(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    pid = new_product(stock=10)
    envelopes = push_holds(redis_conn, pid, [1, 1], admit=False)
    redis_conn.set(keys.lease(pid), "live-drainer", px=5_000)

    assert Drainer(redis_conn, SETTINGS).drain_product(pid) == 0

    assert redis_conn.lrange(keys.queue(pid), 0, -1) == [e.encode() for e in envelopes]
    assert redis_conn.get(keys.lease(pid)) == b"live-drainer"
    assert Hold.select().where(Hold.product == pid).count() == 0


# --- many products in one transaction ---------------------------------------------------

def transactions(conn: redis.Redis) -> int:
    """Rounds recorded so far: the count of the batch-size histogram (workers.stats)."""
    return sum(int(v) for k, v in conn.hgetall(keys.BATCH_STATS).items()
               if k.startswith(b"h:batch_size:") and not k.endswith(b":sum"))


def take_round(conn: redis.Redis, drainer: Drainer, pids: list[int]) -> int:
    for pid in pids:
        conn.rpush(keys.READY, pid)
    fresh = [int(p) for p in conn.lpop(keys.READY, len(pids)) or []]
    return drainer.round(fresh)


def test_one_round_applies_many_products_in_one_transaction(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    pids = [new_product(stock=3) for _ in range(5)]
    pushed = {pid: push_holds(redis_conn, pid, [1, 2, 1], admit=False) for pid in pids}
    drainer = Drainer(redis_conn, SETTINGS)
    before = transactions(redis_conn)

    assert take_round(redis_conn, drainer, pids) == 15

    assert transactions(redis_conn) == before + 1
    for pid in pids:
        results = [job_result(redis_conn, e.id)["status"] for e in pushed[pid]]
        assert results == [201, 201, 409]
        assert_applied_once(pushed[pid][:2], pid)
    assert drainer.held == []  # nothing was queued meanwhile: FINISH released them all
    for pid in pids:
        assert_drained(redis_conn, pid)


def test_a_round_of_many_products_goes_on_after_redis_forgets_its_scripts(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    """On one Redis a round's TAKEs and FINISHes are one script call each (for_many);
    a Redis that restarted knows neither script: each is loaded and run again."""
    pids = [new_product(stock=3) for _ in range(4)]
    pushed = {pid: push_holds(redis_conn, pid, [1, 1], admit=False) for pid in pids}
    drainer = Drainer(redis_conn, SETTINGS)
    sent: list[Any] = []
    execute = redis.client.Pipeline.execute

    def counted(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append([c[0][1] for c in pipe.command_stack if c[0][0] == "EVALSHA"])
        return execute(pipe, *args, **kwargs)

    redis_conn.script_flush()
    try:
        redis.client.Pipeline.execute = counted  # type: ignore[method-assign]
        assert take_round(redis_conn, drainer, pids) == 8
    finally:
        redis.client.Pipeline.execute = execute  # type: ignore[method-assign]

    # one TAKE call for the four products, then one FINISH call: both unknown, loaded
    assert [shas for shas in sent if shas] == [[drainer._many[drainer._take.sha].sha],
                                               [drainer._many[drainer._finish.sha].sha]]
    for pid in pids:
        assert [job_result(redis_conn, e.id)["status"] for e in pushed[pid]] == [201, 201]
        assert_applied_once(pushed[pid], pid)
        assert_drained(redis_conn, pid)


def test_a_product_with_requests_queued_meanwhile_stays_held(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    busy, quiet = new_product(stock=5), new_product(stock=5)
    first = push_holds(redis_conn, busy, [1], admit=False)
    push_holds(redis_conn, quiet, [1], admit=False)
    drainer = Drainer(redis_conn, SETTINGS)
    redis_conn.delete(keys.READY)
    original, run_each = drainer.step, drainer._run_each
    meanwhile: list[Envelope] = []
    scripts: list[str] = []

    def step_with_a_push_meanwhile(batches: dict[int, list[bytes]]) -> int:
        # arrives while the round applies
        meanwhile.extend(push_holds(redis_conn, busy, [2], admit=False))
        return original(batches)

    def counted(script: Any, calls: list[Any]) -> list[Any]:
        scripts.extend(script.sha for _ in calls)
        return run_each(script, calls)

    drainer.step = step_with_a_push_meanwhile  # type: ignore[method-assign]
    drainer._run_each = counted  # type: ignore[method-assign]
    assert drainer.round([busy, quiet]) == 2
    drainer.step = original  # type: ignore[method-assign]

    assert drainer.held == [busy]
    assert_drained(redis_conn, quiet)
    assert redis_conn.llen(keys.READY) == 0  # the push found the product awake
    # FINISH took the request queued meanwhile as the next batch, under the lease.
    assert [Envelope.decode(e).id for e in drainer.taken[busy]] == [meanwhile[0].id]
    assert redis_conn.get(keys.job(meanwhile[0].id)) == b"processing"
    assert scripts == [drainer._take.sha] * 2  # the fresh products' TAKE only
    assert drainer.round([]) == 1
    assert scripts == [drainer._take.sha] * 2  # no TAKE for it: its batch was taken
    assert drainer.held == [] and drainer.taken == {} and redis_conn.llen(keys.READY) == 0
    assert_drained(redis_conn, busy)
    assert_applied_once(first + meanwhile, busy)


def test_a_product_handed_back_with_its_next_batch_taken_is_applied_once_by_another(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    """More products are hot than a drainer holds: it hands its products back after a
    round, with the batches FINISH took in flight; the next drainer applies those."""
    pid = new_product(stock=5)
    first = push_holds(redis_conn, pid, [1], admit=False)
    drainer = Drainer(redis_conn, SETTINGS)
    redis_conn.delete(keys.READY)
    original = drainer.step
    meanwhile: list[Envelope] = []

    def step_with_a_push_meanwhile(batches: dict[int, list[bytes]]) -> int:
        meanwhile.extend(push_holds(redis_conn, pid, [1, 2], admit=False))
        return original(batches)

    drainer.step = step_with_a_push_meanwhile  # type: ignore[method-assign]
    assert drainer.round([pid]) == 1
    assert len(drainer.taken[pid]) == 2

    drainer.hand_back()

    assert drainer.held == [] and drainer.taken == {}
    assert redis_conn.lrange(keys.READY, 0, -1) == [str(pid).encode()]
    assert redis_conn.exists(keys.lease(pid)) == 0
    assert redis_conn.llen(keys.inflight(pid)) == 2
    other = Drainer(redis_conn, SETTINGS)
    fresh = [int(p) for p in redis_conn.lpop(keys.READY, 10) or []]
    applied = other.round(fresh)  # its TAKE finds the batch in flight
    while other.held:
        applied += other.round([])
    assert applied == 2
    assert [job_result(redis_conn, e.id)["status"] for e in first + meanwhile] == [201] * 3
    assert_applied_once(first + meanwhile, pid)
    assert_drained(redis_conn, pid)


def test_an_unreadable_envelope_in_a_batch_finish_took_is_answered_alone(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    """Bytes that are not an envelope (broken JSON, not UTF-8) queued while a batch is
    applied: the batch FINISH takes with them answers them 500 and applies the rest."""
    pid = new_product(stock=5)
    first = push_holds(redis_conn, pid, [1], admit=False)
    broken = keys.new_id("job", pid)
    drainer = Drainer(redis_conn, SETTINGS)
    original = drainer.step
    after: list[Envelope] = []

    def step_with_pushes_meanwhile(batches: dict[int, list[bytes]]) -> int:
        redis_conn.rpush(keys.queue(pid),
                         broken.encode() + b' {"op": "hold", "args": \xff\xfe' + "ü".encode())
        after.extend(push_holds(redis_conn, pid, [2], admit=False))
        return original(batches)

    drainer.step = step_with_pushes_meanwhile  # type: ignore[method-assign]
    assert drainer.round([pid]) == 1
    drainer.step = original  # type: ignore[method-assign]
    assert len(drainer.taken[pid]) == 2

    assert drainer.round([]) == 1  # the readable one

    assert job_result(redis_conn, broken)["status"] == 500
    assert job_result(redis_conn, broken)["body"]["type"].endswith("/set-aside")
    assert [job_result(redis_conn, e.id)["status"] for e in first + after] == [201, 201]
    assert_applied_once(first + after, pid)
    assert_drained(redis_conn, pid)


def test_a_product_the_ready_list_names_twice_is_taken_once(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    """A push's wake-up and the sweep's can both put a product on the ready list."""
    busy, idle = new_product(stock=5), new_product(stock=5)
    envelopes = push_holds(redis_conn, busy, [1, 2], admit=False)
    drainer = Drainer(redis_conn, SETTINGS)

    assert drainer.round([busy, idle, busy, idle]) == 2

    assert drainer.held == [] and drainer.taken == {}
    assert [job_result(redis_conn, e.id)["status"] for e in envelopes] == [201, 201]
    assert_applied_once(envelopes, busy)
    assert_drained(redis_conn, busy)
    assert_drained(redis_conn, idle)


def test_a_round_that_fails_after_its_take_gives_up_the_leases_it_took(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    """What drain() does on an exception (release_all) covers the fresh products too,
    so their batches wait for the next drainer, not for their leases to run out."""
    pid = new_product(stock=5)
    envelopes = push_holds(redis_conn, pid, [1], admit=False)
    drainer = Drainer(redis_conn, SETTINGS)
    original = drainer._run_each

    def take_then_fail(script: Any, calls: list[Any]) -> list[Any]:
        original(script, calls)
        raise redis.ConnectionError("connection lost after the TAKE ran")

    drainer._run_each = take_then_fail  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        drainer.round([pid])
    drainer.release_all()

    assert redis_conn.exists(keys.lease(pid)) == 0
    assert redis_conn.llen(keys.inflight(pid)) == 1
    assert Drainer(redis_conn, SETTINGS).drain_product(pid) == 1
    assert_applied_once(envelopes, pid)
    assert_drained(redis_conn, pid)


def test_a_product_that_fails_the_shared_transaction_fails_alone(
        redis_conn: redis.Redis, new_product: Callable[..., int]) -> None:
    good, bad = new_product(stock=5), new_product(stock=5)
    good_envs = push_holds(redis_conn, good, [1, 1], admit=False)
    # A hold whose stored row would break the schema (qty column is an INT).
    poison = Envelope(id=keys.new_id("job", bad), op="hold",
                      args={"product_id": bad, "qty": 2**40, "hold_id": keys.new_id("hold", bad)})
    push(redis_conn, bad, poison, SETTINGS.job_ttl_seconds)
    fine = push_holds(redis_conn, bad, [1], admit=False)
    Product.update(stock=2**41).where(Product.id == bad).execute()

    assert take_round(redis_conn, Drainer(redis_conn, SETTINGS), [good, bad]) == 4

    assert [job_result(redis_conn, e.id)["status"] for e in good_envs] == [201, 201]
    assert job_result(redis_conn, poison.id)["status"] in (409, 422)
    assert job_result(redis_conn, fine[0].id)["status"] == 201
    assert_applied_once(good_envs, good)


def as_drain_job(redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                 job_id: str) -> None:
    """``drain_module.drain()`` called from here runs as rq would run the job ``job_id``
    on ``redis_conn``, with this module's settings."""

    class Job:
        id = job_id
        connection = redis_conn

    monkeypatch.setattr(drain_module, "get_current_job", Job)
    monkeypatch.setattr(drain_module, "settings", lambda: SETTINGS)


def test_a_ready_list_member_that_is_no_product_id_is_dropped_and_the_rest_drained(
        redis_conn: redis.Redis, new_product: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only READY and the drainers write the ready list; a member written by hand must not
    end the drain job and lose the product ids popped with it."""
    first, second = new_product(stock=5), new_product(stock=5)
    envelopes = push_holds(redis_conn, first, [1], admit=False)
    envelopes += push_holds(redis_conn, second, [2], admit=False)
    redis_conn.delete(keys.READY)
    redis_conn.rpush(keys.READY, b"\xff\xfe", first, "1.5", second, "9" * 5000, "\u0661")
    as_drain_job(redis_conn, monkeypatch, "drain-job-test")
    monkeypatch.setattr(drain_module, "DRAIN_JOB_SECONDS", 1.0)

    assert drain_module.drain() == 2

    assert [job_result(redis_conn, e.id)["status"] for e in envelopes] == [201, 201]
    assert_drained(redis_conn, first)
    assert_drained(redis_conn, second)
    assert redis_conn.llen(keys.READY) == 0


# --- a drain job with nothing to do -------------------------------------------------------

def start_idle_drain_job(redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
                         ) -> tuple[threading.Thread, list[int]]:
    """A drain job (as rq runs it) in a thread of its own, once it waits for work: what
    it applied is in the list when the thread ends."""
    job_id = "drain-job-idle"
    as_drain_job(redis_conn, monkeypatch, job_id)
    applied: list[int] = []

    def run() -> None:
        try:
            applied.append(drain_module.drain())
        finally:
            models.db.close()  # (this thread's connection)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    waited = time.monotonic() + 10
    while redis_conn.zscore(keys.DRAINERS, job_id) is None:  # its heartbeat: it waits
        assert time.monotonic() < waited, "the drain job never started"
        time.sleep(0.01)
    return thread, applied


def test_a_burst_within_a_second_of_the_last_is_taken_by_the_job_still_waiting(
        redis_conn: redis.Redis, new_product: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The job lingers (LINGER_SECONDS): the next burst needs no new job from rq."""
    pid = new_product(stock=5)
    thread, applied = start_idle_drain_job(redis_conn, monkeypatch)
    time.sleep(0.5)  # nothing ready for half a second

    envelopes = push_holds(redis_conn, pid, [1, 2], admit=False)
    thread.join(timeout=10)

    assert not thread.is_alive()
    assert applied == [2]
    assert redis_conn.llen(keys.DRAIN_JOBS) == 0  # the pushes enqueued no job
    assert [job_result(redis_conn, e.id)["status"] for e in envelopes] == [201, 201]
    assert_drained(redis_conn, pid)
    assert redis_conn.zscore(keys.DRAINERS, "drain-job-idle") is None  # it left after


def test_products_made_ready_together_after_a_wait_share_one_round(
        redis_conn: redis.Redis, new_product: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken by the first product, the job gathers those made ready with it
    (GATHER_SECONDS, long here) into one transaction instead of a round of one."""
    first, second = new_product(stock=5), new_product(stock=5)
    monkeypatch.setattr(drain_module, "GATHER_SECONDS", 0.5)
    thread, applied = start_idle_drain_job(redis_conn, monkeypatch)
    before = transactions(redis_conn)

    envelopes = push_holds(redis_conn, first, [1], admit=False)
    envelopes += push_holds(redis_conn, second, [2], admit=False)
    thread.join(timeout=10)

    assert applied == [2]
    assert transactions(redis_conn) == before + 1
    assert [job_result(redis_conn, e.id)["status"] for e in envelopes] == [201, 201]
    assert_drained(redis_conn, first)
    assert_drained(redis_conn, second)


def test_a_waiting_drain_job_leaves_at_once_for_a_maintenance_job(
        redis_conn: redis.Redis, mysql_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep must not wait behind an idle drain job: the worker runs it next."""
    thread, applied = start_idle_drain_job(redis_conn, monkeypatch)
    time.sleep(0.2)

    queued = time.monotonic()
    redis_conn.rpush(keys.MAINTENANCE_JOBS, "a-sweep-job-id")
    thread.join(timeout=10)

    assert applied == [0]
    assert time.monotonic() - queued < drain_module.LINGER_SECONDS / 2
    assert redis_conn.zscore(keys.DRAINERS, "drain-job-idle") is None
