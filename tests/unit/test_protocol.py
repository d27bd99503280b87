"""The per-product queue protocol (envelopes and Lua scripts) on fakeredis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import orjson
import pytest

from workers import keys
from workers.planes import HEARTBEAT_MS, READY_KEYS, push_ready_call
from workers.protocol import (
    FILL,
    FINISH,
    PUSH,
    PUSH_READY,
    READY,
    RELEASE,
    TAKE,
    Envelope,
    fill_keys,
    finish_args,
    finish_keys,
    for_many,
    many_call,
    push_args,
    push_keys,
    take_keys,
)

PID = 7
TOKEN = "drainer-token"
LEASE_MS = 5_000
JOB_TTL = 3_600
WAKE_MS = 15_000


@pytest.fixture
def r() -> Iterator[fakeredis.FakeRedis]:
    conn = fakeredis.FakeRedis()
    yield conn
    conn.close()


def job_id(n: int) -> str:
    return f"job_{PID}_{n:016x}"


def envelope(n: int, qty: int = 1, reply: str | None = None) -> Envelope:
    return Envelope(id=job_id(n), op="hold", reply=reply,
                    args={"product_id": PID, "qty": qty, "hold_id": f"hold_{PID}_{n:016x}"})


def cache_product(r: fakeredis.FakeRedis, available: int, queued: int = 0) -> None:
    r.hset(keys.product(PID), mapping={"id": PID, "stock": available, "available": available,
                                       "queued": queued})


def push(r: fakeredis.FakeRedis, env: Envelope, qty: int = 0, flags: str = "",
         missing: bytes = b"", sold_out: bytes = b"") -> list[int]:
    code = r.register_script(PUSH)(keys=push_keys(PID, env.id),
                                   args=push_args(env, qty, JOB_TTL, WAKE_MS, flags, missing,
                                                  sold_out))
    return [int(c) for c in code]


def push_ready(r: fakeredis.FakeRedis, env: Envelope, qty: int = 0, flags: str = "",
               missing: bytes = b"", sold_out: bytes = b"") -> list[int]:
    call_keys, call_args = push_ready_call(
        push_keys(PID, env.id), push_args(env, qty, JOB_TTL, WAKE_MS, flags, missing, sold_out),
        PID)
    code = r.register_script(PUSH_READY)(keys=call_keys, args=call_args)
    return [int(c) for c in code]


def take(r: fakeredis.FakeRedis, n: int = 10, token: str = TOKEN) -> list[bytes] | None:
    return r.register_script(TAKE)(keys=take_keys(PID),
                                   args=[token, n, LEASE_MS, keys.job_prefix(PID)])


def finish(r: fakeredis.FakeRedis, token: str = TOKEN, release: int = 0,
           fields: dict[str, Any] | None = None, results: dict[str, bytes] | None = None,
           replies: dict[str, bytes] | None = None, delete: list[str] | None = None,
           adders: int = 0, take: int = 0) -> Any:
    args = finish_args(token, LEASE_MS, JOB_TTL, PID, release, fields or {}, results or {},
                       replies or {}, delete or [], adders, take)
    done = r.register_script(FINISH)(keys=finish_keys(PID), args=args)
    return done if isinstance(done, list) else int(done)


def field(r: fakeredis.FakeRedis, name: str) -> Any:
    return r.hget(keys.product(PID), name)


# --- envelopes --------------------------------------------------------------------------

@pytest.mark.parametrize("env", [
    Envelope(id="job_1_00000000000000aa", op="hold", args={"product_id": 1, "qty": 2}),
    Envelope(id="job_1_00000000000000ab", op="order", args={"hold_id": "h x"},
             idem=("orders:k 1", "f" * 64), reply="fs:reply:gw-1"),
    Envelope(id="job_0_00000000000000ac", op="webhook",
             args={"idempotency_key": "évt", "order_id": "o", "status": "paid"},
             idem=("webhook:évt", "fp")),
], ids=["plain", "idem-and-reply", "unicode"])
def test_envelope_round_trip(env: Envelope) -> None:
    raw = env.encode()

    assert raw.startswith(env.id.encode() + b" ")
    assert Envelope.decode(raw) == env
    assert Envelope.decode(raw.decode()) == env


# --- push -------------------------------------------------------------------------------

def test_push_admits_queues_and_counts_the_units(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=5)

    assert push(r, envelope(1, qty=2), qty=2) == [1]
    assert push(r, envelope(2, qty=3), qty=3) == [0]

    assert field(r, "queued") == b"5"
    assert r.lrange(keys.queue(PID), 0, -1) == [envelope(1, 2).encode(), envelope(2, 3).encode()]
    assert r.get(keys.job(job_id(1))) == b"queued"
    assert 0 < r.ttl(keys.job(job_id(1))) <= JOB_TTL
    assert 0 < r.pttl(keys.wake(PID)) <= WAKE_MS


def test_push_refuses_what_queued_requests_already_claim(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=5, queued=4)

    assert push(r, envelope(1, qty=2), qty=2) == [2, 1]

    assert field(r, "queued") == b"4"
    assert r.llen(keys.queue(PID)) == 0
    assert r.exists(keys.job(job_id(1)), keys.wake(PID)) == 0


def test_push_never_reports_negative_availability(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=1, queued=3)

    assert push(r, envelope(1, qty=1), qty=1) == [2, 0]


def test_push_asks_for_a_drain_job_only_while_none_is_pending(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=100)

    codes = [push(r, envelope(n), qty=1)[0] for n in range(3)]
    r.delete(keys.wake(PID))  # the drainer finished and released the wake flag
    codes.append(push(r, envelope(3), qty=1)[0])

    assert codes == [1, 0, 0, 1]


def test_push_without_admission_needs_no_cached_product(r: fakeredis.FakeRedis) -> None:
    assert push(r, envelope(1), qty=0) == [1]

    assert r.llen(keys.queue(PID)) == 1
    assert r.exists(keys.product(PID)) == 0


def test_push_reports_an_uncached_product(r: fakeredis.FakeRedis) -> None:
    assert push(r, envelope(1), qty=1) == [3]

    assert r.llen(keys.queue(PID)) == 0
    assert r.exists(keys.job(job_id(1)), keys.wake(PID)) == 0


def restock(n: int, qty: int = 5) -> Envelope:
    return Envelope(id=job_id(n), op="restock", args={"product_id": PID, "qty": qty})


def test_a_keyed_job_id_is_queued_and_charged_once(r: fakeredis.FakeRedis) -> None:
    # Two gateways push the same Idempotency-Key's job: one envelope, one admission charge.
    cache_product(r, available=5)

    assert push(r, envelope(1, qty=2), qty=2, flags="k") == [1]
    assert push(r, envelope(1, qty=2), qty=2, flags="k") == [5]

    assert r.llen(keys.queue(PID)) == 1
    assert field(r, "queued") == b"2"


def test_a_keyed_refusal_is_stored_with_the_decision(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=1)
    template = b'{"status":409,"body":{"available":__AVAILABLE__}}'

    assert push(r, envelope(1, qty=2), qty=2, flags="k", sold_out=template) == [2, 1]

    assert r.get(keys.job(job_id(1))) == b'{"status":409,"body":{"available":1}}'
    assert push(r, envelope(1, qty=2), qty=2, flags="k", sold_out=template) == [5]


def test_a_keyed_request_for_a_missing_product_stores_its_404(r: fakeredis.FakeRedis) -> None:
    r.hset(keys.product(PID), "missing", 1)

    assert push(r, envelope(1), qty=0, flags="kp", missing=b'{"status":404}') == [4]

    assert r.get(keys.job(job_id(1))) == b'{"status":404}'


def test_an_order_for_a_missing_product_is_not_queued(r: fakeredis.FakeRedis) -> None:
    r.hset(keys.product(PID), "missing", 1)

    assert push(r, envelope(1), qty=0, flags="p") == [4]
    assert push(r, envelope(2), qty=0) == [1]  # without the flag, no check

    assert r.llen(keys.queue(PID)) == 1


def test_a_queued_restock_keeps_later_holds_from_early_refusal(r: fakeredis.FakeRedis) -> None:
    # API.md: hold 2 (granted), hold 2 (refused), restock 5 (queued), hold 2 -> queued,
    # since the restock before it may make it possible.
    cache_product(r, available=2)
    assert push(r, envelope(1, qty=2), qty=2) == [1]
    assert push(r, envelope(2, qty=2), qty=2) == [2, 0]
    assert push(r, restock(3)) == [0]

    assert push(r, envelope(4, qty=2), qty=2) == [0]
    assert field(r, "adders") == b"1"


def test_finish_and_an_empty_queue_clear_what_may_add_units(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=0)
    push(r, restock(1))
    push(r, restock(2))
    r.set(keys.lease(PID), TOKEN)
    assert take(r, n=1) == [restock(1).encode()]

    assert finish(r, fields={"stock": 10, "available": 10}, adders=1) == 1  # one left
    assert field(r, "adders") == b"1"
    assert take(r) == [restock(2).encode()]
    assert finish(r, fields={"stock": 20, "available": 20}) == 2  # none left: released
    assert field(r, "adders") == b"0"


def test_finish_releases_a_product_whose_queue_ran_dry(r: fakeredis.FakeRedis) -> None:
    """As TAKE would on its next call: lease and wake go, counters are reset, and the
    next push wakes a drainer; with requests queued meanwhile, the lease is renewed."""
    taken(r, 2, queued=2)

    assert finish(r, release=2, fields={"stock": 10, "available": 8}) == 2

    assert r.exists(keys.lease(PID), keys.wake(PID), keys.inflight(PID)) == 0
    assert (field(r, "queued"), field(r, "adders")) == (b"0", b"0")
    assert push(r, envelope(5), qty=1) == [1]  # the product needs a drainer again
    r.set(keys.lease(PID), TOKEN, px=1_000)
    assert take(r) is not None
    push(r, envelope(6), qty=1)  # queued while the batch is applied
    assert finish(r, release=1, fields={"stock": 10, "available": 7}) == 1
    assert r.get(keys.lease(PID)) == TOKEN.encode() and r.llen(keys.queue(PID)) == 1


def test_push_reports_a_product_known_to_be_missing(r: fakeredis.FakeRedis) -> None:
    r.hset(keys.product(PID), "missing", 1)

    assert push(r, envelope(1), qty=1) == [4]

    assert r.llen(keys.queue(PID)) == 0
    assert r.exists(keys.job(job_id(1))) == 0


# --- take -------------------------------------------------------------------------------

def test_take_moves_up_to_n_envelopes_in_flight(r: fakeredis.FakeRedis) -> None:
    for n in range(3):
        push(r, envelope(n))
    r.set(keys.lease(PID), TOKEN, px=1_000)  # (a lease that a stalled machine keeps)

    batch = take(r, n=2)

    assert batch == [envelope(0).encode(), envelope(1).encode()]
    assert r.lrange(keys.inflight(PID), 0, -1) == batch
    assert r.lrange(keys.queue(PID), 0, -1) == [envelope(2).encode()]
    assert r.get(keys.job(job_id(0))) == b"processing"
    assert r.get(keys.job(job_id(2))) == b"queued"
    assert 0 < r.ttl(keys.job(job_id(0))) <= JOB_TTL  # KEEPTTL: the job still expires
    assert r.pttl(keys.lease(PID)) > 1_000  # the lease was renewed (to LEASE_MS)


def test_take_does_not_create_job_keys_that_expired(r: fakeredis.FakeRedis) -> None:
    push(r, envelope(0))
    r.delete(keys.job(job_id(0)))
    r.set(keys.lease(PID), TOKEN)

    assert take(r) == [envelope(0).encode()]
    assert r.exists(keys.job(job_id(0))) == 0


def test_take_returns_the_in_flight_batch_again_after_a_crash(r: fakeredis.FakeRedis) -> None:
    for n in range(3):
        push(r, envelope(n))
    r.set(keys.lease(PID), "crashed")
    first = take(r, n=2, token="crashed")
    r.delete(keys.lease(PID))  # its lease expired
    r.set(keys.lease(PID), TOKEN)

    again = take(r, n=2)

    assert again == first
    assert r.lrange(keys.inflight(PID), 0, -1) == first  # not duplicated
    assert r.llen(keys.queue(PID)) == 1


def test_take_on_an_empty_queue_releases_lease_and_wake(r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=5, queued=3)
    r.set(keys.lease(PID), TOKEN)
    r.set(keys.wake(PID), "1")

    assert take(r) == []

    assert r.exists(keys.lease(PID), keys.wake(PID)) == 0
    assert field(r, "queued") == b"0"


def test_take_on_an_empty_queue_does_not_create_the_product_hash(
        r: fakeredis.FakeRedis) -> None:
    r.set(keys.lease(PID), TOKEN)

    assert take(r) == []
    assert r.exists(keys.product(PID)) == 0


@pytest.mark.parametrize("lease", [None, "someone-else"], ids=["no-lease", "other-lease"])
def test_take_without_our_lease_returns_none_and_moves_nothing(
        r: fakeredis.FakeRedis, lease: str | None) -> None:
    push(r, envelope(0))
    if lease:
        r.set(keys.lease(PID), lease)

    assert take(r) is None

    assert r.llen(keys.queue(PID)) == 1
    assert r.exists(keys.inflight(PID)) == 0
    assert r.get(keys.job(job_id(0))) == b"queued"
    assert r.get(keys.lease(PID)) == (lease.encode() if lease else None)


# --- finish -----------------------------------------------------------------------------

def taken(r: fakeredis.FakeRedis, count: int, queued: int) -> list[bytes]:
    cache_product(r, available=10, queued=queued)
    for n in range(count):
        push(r, envelope(n, reply="fs:reply:gw-a" if n % 2 == 0 else "fs:reply:gw-b"))
    r.set(keys.lease(PID), TOKEN, px=1_000)
    batch = take(r)
    assert batch is not None and len(batch) == count
    return batch


def test_finish_stores_results_answers_and_refreshes_the_product(
        r: fakeredis.FakeRedis) -> None:
    taken(r, 3, queued=4)
    push(r, envelope(3))  # queued meanwhile: the lease stays for the next batch
    sub = r.pubsub()
    sub.subscribe("fs:reply:gw-a", "fs:reply:gw-b")
    while sub.get_message(timeout=0.01) is not None:  # subscription confirmations
        pass
    results = {job_id(n): orjson.dumps({"status": 201, "body": {"n": n}}) for n in range(3)}
    replies = {"fs:reply:gw-a": orjson.dumps([[job_id(0), 201], [job_id(2), 201]]),
               "fs:reply:gw-b": orjson.dumps([[job_id(1), 201]])}
    r.set(keys.control(PID, "expire"), "1")

    done = finish(r, release=2, fields={"stock": 10, "available": 7}, results=results,
                  replies=replies, delete=[keys.control(PID, "expire")])

    assert done == 1
    for n in range(3):
        assert r.get(keys.job(job_id(n))) == results[job_id(n)]
        assert JOB_TTL - 5 < r.ttl(keys.job(job_id(n))) <= JOB_TTL
    published = {}
    while (msg := sub.get_message(timeout=0.1)) is not None:
        published[msg["channel"].decode()] = msg["data"]
    sub.close()
    assert published == replies
    assert r.exists(keys.inflight(PID), keys.control(PID, "expire")) == 0
    assert (field(r, "stock"), field(r, "available"), field(r, "queued")) == (b"10", b"7", b"2")
    assert r.pttl(keys.lease(PID)) > 100  # renewed for the next batch


def test_finish_takes_the_next_batch_as_take_would(r: fakeredis.FakeRedis) -> None:
    """With ``take``, the requests queued while a batch was applied become the next
    batch in the same call: in flight, marked processing, under the renewed lease."""
    taken(r, 2, queued=2)
    for n in (5, 6, 7):
        push(r, envelope(n))

    batch = finish(r, release=2, fields={"stock": 10, "available": 8},
                   results={job_id(0): b"{}", job_id(1): b"{}"}, take=2)

    assert batch == [envelope(5).encode(), envelope(6).encode()]
    assert r.get(keys.job(job_id(0))) == b"{}"  # the batch before it is answered
    assert r.lrange(keys.inflight(PID), 0, -1) == batch
    assert r.lrange(keys.queue(PID), 0, -1) == [envelope(7).encode()]
    assert [r.get(keys.job(job_id(n))) for n in (5, 6, 7)] == [b"processing"] * 2 + [b"queued"]
    assert JOB_TTL - 5 < r.ttl(keys.job(job_id(5))) <= JOB_TTL
    assert r.pttl(keys.lease(PID)) > LEASE_MS - 1_000 and r.exists(keys.wake(PID))
    # A drainer that dies now leaves it as TAKE would: the next one takes it again.
    assert take(r) == batch

    assert finish(r, fields={"stock": 10, "available": 6}, take=10) == [envelope(7).encode()]
    assert finish(r, fields={"stock": 10, "available": 5}, take=10) == 2  # none left
    assert r.exists(keys.lease(PID), keys.wake(PID), keys.inflight(PID)) == 0


def test_finish_never_takes_queued_below_zero(r: fakeredis.FakeRedis) -> None:
    taken(r, 1, queued=1)
    push(r, envelope(1))

    assert finish(r, release=5, fields={"stock": 10, "available": 9}) == 1

    assert field(r, "queued") == b"0"


def test_finish_after_losing_the_lease_changes_nothing(r: fakeredis.FakeRedis) -> None:
    batch = taken(r, 2, queued=2)
    r.set(keys.lease(PID), "next-drainer")
    before = r.hgetall(keys.product(PID))

    done = finish(r, release=2, fields={"stock": 1, "available": 0},
                  results={job_id(0): b"{}"}, replies={"fs:reply:gw-a": b"[]"})

    assert done == 0
    assert r.lrange(keys.inflight(PID), 0, -1) == batch  # the next drainer replays it
    assert r.hgetall(keys.product(PID)) == before
    assert r.get(keys.job(job_id(0))) == b"processing"
    assert r.get(keys.lease(PID)) == b"next-drainer"


# --- fill and release -------------------------------------------------------------------

def test_fill_sets_the_cache_only_when_absent(r: fakeredis.FakeRedis) -> None:
    fill = r.register_script(FILL)
    r.hset(keys.product(PID), "missing", 1)  # a stale "no such product" marker

    assert fill(keys=fill_keys(PID), args=["stock", 5, "available", 5]) == 1
    assert fill(keys=fill_keys(PID), args=["stock", 1, "available", 0]) == 0

    assert r.hgetall(keys.product(PID)) == {b"stock": b"5", b"available": b"5"}


def test_fill_behind_queued_requests_refuses_no_hold_early(r: fakeredis.FakeRedis) -> None:
    # A restock may wait in the queue: the database's figure does not show it yet.
    r.rpush(keys.queue(PID), b"job_0 {}")
    r.register_script(FILL)(keys=fill_keys(PID), args=["stock", 0, "available", 0])

    assert push(r, envelope(1, qty=1), qty=1) == [1]


def test_release_deletes_only_our_own_lease(r: fakeredis.FakeRedis) -> None:
    release = r.register_script(RELEASE)
    r.set(keys.lease(PID), "other")

    assert release(keys=[keys.lease(PID)], args=[TOKEN]) == 0
    assert r.get(keys.lease(PID)) == b"other"
    assert release(keys=[keys.lease(PID)], args=["other"]) == 1
    assert r.exists(keys.lease(PID)) == 0


def test_a_push_sent_again_after_it_ran_queues_and_charges_nothing(r: fakeredis.FakeRedis
                                                                  ) -> None:
    # The gateway resends a push whose reply a restarting Redis dropped: the first one may
    # have run. Charged twice, the admission counter would refuse the last units at once
    # (409) while nobody is left to take them.
    cache_product(r, available=1)

    assert push(r, envelope(1), qty=1, flags="o") == [1]
    assert push(r, envelope(1), qty=1, flags="o") == [5]
    assert push(r, envelope(2), qty=1, flags="o") == [2, 0]

    assert r.llen(keys.queue(PID)) == 1
    assert field(r, "queued") == b"1"


def test_a_replayed_dead_letter_is_queued_again_under_its_job_id(r: fakeredis.FakeRedis
                                                                ) -> None:
    # flashsale dead-letters --replay pushes without 'o': the job key holds the first
    # attempt's answer, and the replay must still be queued.
    cache_product(r, available=5)
    r.set(keys.job(job_id(1)), b'{"status":500}')

    assert push(r, envelope(1), qty=1) == [1]
    assert r.llen(keys.queue(PID)) == 1


def test_a_rounds_replies_carry_each_result_as_serialized_once() -> None:
    """The reply to each gateway is the JSON of [[job id, result], ...] for its requests
    of the round: the results serialized for FINISH go in as they are."""
    from workers.apply import Outcome
    from workers.decide import Result
    from workers.drain import Drainer

    envs = {1: [Envelope(id=keys.new_id("job", 1), op="hold", args={"qty": 1}, reply="fs:a"),
                Envelope(id=keys.new_id("job", 1), op="hold", args={"qty": 2}, reply="fs:b")],
            2: [Envelope(id=keys.new_id("job", 2), op="hold", args={"qty": 3}, reply="fs:a"),
                Envelope(id=keys.new_id("job", 2), op="hold", args={"qty": 4})]}
    results = {env.id: Result(201 if n % 2 else 409, {"n": n, "text": "ü \" \\ <"})
               for n, env in enumerate(e for batch in envs.values() for e in batch)}
    outcomes = {pid: Outcome({e.id: results[e.id] for e in batch}, None)
                for pid, batch in envs.items()}
    answers = {pid: Drainer.serialize(envs[pid], outcomes[pid]) for pid in envs}
    sent: list[tuple[Any, ...]] = []

    class Pipe:
        def execute_command(self, *args: Any) -> None:
            sent.append(args)

    assert Drainer._publish(Pipe(), "PUBLISH", answers, envs) == 2
    expected = {
        "fs:a": [[envs[1][0].id, results[envs[1][0].id].as_dict()],
                 [envs[2][0].id, results[envs[2][0].id].as_dict()]],
        "fs:b": [[envs[1][1].id, results[envs[1][1].id].as_dict()]]}
    assert {channel: payload for _, channel, payload in sent} == {
        channel: orjson.dumps(replies) for channel, replies in expected.items()}


def test_push_ready_makes_the_product_it_wakes_ready_in_the_same_step(
        r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=3)

    assert push_ready(r, envelope(1), qty=1) == [1]  # no drainer at work: enqueue a job
    assert push_ready(r, envelope(2), qty=1) == [0]  # awake already

    assert r.lrange(keys.READY, 0, -1) == [str(PID).encode()]
    assert r.hget(keys.WOKEN, PID) == b"1"
    assert r.llen(keys.queue(PID)) == 2


def test_push_ready_wants_no_job_when_one_waits_or_every_worker_drains(
        r: fakeredis.FakeRedis) -> None:
    cache_product(r, available=3)
    r.rpush(keys.DRAIN_JOBS, "a-job-not-started")
    assert push_ready(r, envelope(1), qty=1) == [6]

    r.delete(keys.DRAIN_JOBS, keys.wake(PID))
    r.sadd(keys.DRAIN_WORKERS, "worker-1")
    r.zadd(keys.DRAINERS, {"drainer-1": 10**13})  # a heartbeat in the future: alive
    assert push_ready(r, envelope(2), qty=1) == [6]

    assert r.lrange(keys.READY, 0, -1) == [str(PID).encode()] * 2


def test_push_ready_answers_as_push_then_ready(r: fakeredis.FakeRedis) -> None:
    """The same pushes through PUSH (then READY when woken) and through PUSH_READY leave
    the same answers and the same keys."""
    split = fakeredis.FakeRedis()
    template = b'{"status":409,"available":__AVAILABLE__}'
    steps: list[tuple[Envelope, int, str]] = [
        (envelope(1), 1, ""),  # not cached
        (envelope(1), 1, "o"),  # woken
        (envelope(1), 1, "o"),  # queued already
        (envelope(2), 2, "k"),  # sold out, keyed: the answer is stored
        (envelope(3), 1, ""),  # queued
        (envelope(4), 0, ""),  # no admission
    ]
    answers: list[tuple[list[int], list[int]]] = []
    for n, (env, qty, flags) in enumerate(steps):
        if n == 1:
            for conn in (r, split):
                cache_product(conn, available=2)
        code = push(split, env, qty=qty, flags=flags, sold_out=template)
        if code == [1]:
            ready = split.register_script(READY)(keys=READY_KEYS, args=[PID, HEARTBEAT_MS])
            code = [1] if ready else [6]
        answers.append((code, push_ready(r, env, qty=qty, flags=flags, sold_out=template)))

    assert [one for one, _ in answers] == [[3], [1], [5], [2, 1], [0], [0]]
    assert [one for one, _ in answers] == [joined for _, joined in answers]
    stored = sorted(r.keys())
    assert stored == sorted(split.keys())
    for key in stored:
        assert r.dump(key) == split.dump(key), key
    split.close()


# --- several products in one call (one Redis) ------------------------------------------

def _products_in_every_state(r: fakeredis.FakeRedis) -> None:
    """Product 1: ours, two queued; 2: ours, nothing queued; 3: another drainer's lease;
    4: ours, nothing queued nor cached; 5: ours, one in flight and three queued."""
    for pid in (1, 2, 3, 4, 5):
        if pid != 4:
            r.hset(keys.product(pid), mapping={"id": pid, "stock": 9, "available": 9,
                                               "queued": 3, "adders": 1})
        r.set(keys.lease(pid), TOKEN if pid != 3 else "other", px=LEASE_MS)
        r.set(keys.wake(pid), 1, px=WAKE_MS)
    for pid, n in ((1, 2), (5, 3)):
        for k in range(n):
            job = f"job_{pid}_{k:016x}"
            r.set(keys.job(job), "queued", ex=JOB_TTL)
            r.rpush(keys.queue(pid), f"{job} {{}}")
    r.rpush(keys.inflight(5), "job_5_00000000000000ff {}")


def _state(r: fakeredis.FakeRedis) -> dict[bytes, Any]:
    state: dict[bytes, Any] = {}
    for key in sorted(r.keys("*")):
        kind = r.type(key)
        value: Any = (r.hgetall(key) if kind == b"hash" else r.lrange(key, 0, -1)
                      if kind == b"list" else r.get(key))
        state[key] = (value, r.pttl(key) > 0)
    return state


# A stored result as the drainer sends it: JSON text, with what JSON escapes and non-ASCII.
RESULT = orjson.dumps({"status": 201, "body": {"name": 'Caf\u00e9 "\u2116 1" \\ \u00a0\n'}})


@pytest.mark.parametrize("script", ["take", "finish", "release"])
def test_many_products_in_one_call_do_what_one_call_each_does(script: str) -> None:
    """On one Redis a drainer sends a round's TAKEs, FINISHes or RELEASEs as one call of
    the script's ``for_many`` form: the same replies, in order, and the same keys after."""
    if script == "take":
        source = TAKE
        calls = [(take_keys(pid), [TOKEN, 2, LEASE_MS, keys.job_prefix(pid), 1])
                 for pid in (1, 2, 3, 4, 5)]
    elif script == "finish":
        source = FINISH
        calls = [(finish_keys(pid), finish_args(
            TOKEN, LEASE_MS, JOB_TTL, pid, 1, {"id": pid, "stock": 8, "available": 7},
            {f"job_{pid}_{0xaa:016x}": RESULT}, {}, [], 1, 2 if pid == 1 else 0))
            for pid in (1, 2, 3, 4, 5)]
    else:
        source = RELEASE
        calls = [([keys.lease(pid)], [TOKEN]) for pid in (1, 2, 3, 4, 5)]
    alone, together = fakeredis.FakeRedis(), fakeredis.FakeRedis()
    _products_in_every_state(alone)
    _products_in_every_state(together)

    one_each = [alone.register_script(source)(keys=k, args=a) for k, a in calls]
    in_one = together.register_script(for_many(source))(*many_call(calls))

    assert in_one == one_each
    assert _state(together) == _state(alone)
    # (the states answer differently: the test covers each kind of reply)
    assert len({str(reply) for reply in one_each}) == {"take": 4, "finish": 4, "release": 2}[script]


def test_for_many_refuses_a_script_it_cannot_rewrite() -> None:
    with pytest.raises(ValueError):
        for_many("return #KEYS")


def test_for_many_passes_each_argument_as_the_string_redis_py_would_send() -> None:
    r = fakeredis.FakeRedis()
    echo = r.register_script(for_many("return {A[1], A[2], A[3], K[1]}\n"))
    calls: list[tuple[list[str], list[Any]]] = [
        (["k:1"], ["text", 2**53 - 1, RESULT]), (["k:2"], ["\u00e9", -7, b""])]

    assert echo(*many_call(calls)) == [
        [b"text", str(2**53 - 1).encode(), RESULT, b"k:1"], ["\u00e9".encode(), b"-7", b"", b"k:2"]]


@pytest.mark.parametrize("argument", [2**53, -(2**53), 10**5000, object(), b"\xff"],
                         ids=["2**53", "-2**53", "5001 digits", "object", "not UTF-8"])
def test_many_call_refuses_what_a_script_could_not_be_sent(argument: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        many_call([(["k:1"], [argument])])


@pytest.mark.parametrize("argument", [1.5, float("nan"), float("inf"), None, True])
def test_for_many_fails_on_an_argument_redis_py_would_refuse(argument: Any) -> None:
    r = fakeredis.FakeRedis()
    echo = r.register_script(for_many("return A[1]\n"))
    with pytest.raises(Exception, match="neither a string nor an integer"):
        echo(*many_call([(["k:1"], [argument])]))
