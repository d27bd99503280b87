"""The sweep's re-wake on real Redis: it wakes stalled products, and only those.

A hot product moves between the ready list and a drainer's lease many times a second;
these tests move it at the moment the sweep reads, as a drainer does under load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from schedules import jobs
from workers import keys
from workers.client import push, sweep_stalled
from workers.planes import Planes
from workers.protocol import Envelope

pytestmark = pytest.mark.integration

PID = 424_242


def queue_one(conn: redis.Redis, pid: int = PID) -> None:
    """A request pushed as the gateway pushes it: the product is woken (put on the ready
    list, counted in fs:woken)."""
    envelope = Envelope(id=keys.new_id("job", pid), op="hold", args={"qty": 1})
    assert push(conn, pid, envelope, 3_600)[0] in (1, 6)


def meddling(conn: redis.Redis, before: Callable[[], Any] | None = None,
             after: Callable[[], Any] | None = None) -> redis.Redis:
    """The data plane of ``conn``, whose first pipeline (the sweep's read of the products'
    keys) runs ``before`` just before it executes and ``after`` just after."""
    client = redis.Redis(connection_pool=conn.connection_pool)
    make = client.pipeline
    done: list[bool] = []

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make(*args, **kwargs)
        run = pipe.execute

        def execute(*eargs: Any, **ekwargs: Any) -> Any:
            first = not done
            done.append(True)
            if first and before:
                before()
            replies = run(*eargs, **ekwargs)
            if first and after:
                after()
            return replies

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    client.pipeline = pipeline  # type: ignore[method-assign]
    return client


def ready(conn: redis.Redis) -> list[int]:
    return [int(pid) for pid in conn.lrange(keys.READY, 0, -1)]


def take_as_drainer(conn: redis.Redis, pid: int = PID) -> None:
    """What a drainer does with a ready product: pop it, and take its lease."""
    assert conn.lrem(keys.READY, 1, str(pid)) == 1
    assert conn.set(keys.lease(pid), "a-drainer", nx=True, px=5_000)


def hand_back_as_drainer(conn: redis.Redis, pid: int = PID) -> None:
    """What a drainer with too many products does: release the lease, requeue it."""
    assert conn.delete(keys.lease(pid)) == 1
    conn.rpush(keys.READY, pid)


def test_a_product_whose_drainer_died_is_woken(redis_conn: redis.Redis) -> None:
    queue_one(redis_conn)
    redis_conn.lpop(keys.READY)  # taken by a drainer that died; its lease ran out

    assert sweep_stalled(redis_conn, []) == 1

    assert ready(redis_conn) == [PID]
    assert redis_conn.exists(keys.wake(PID)) == 1


def test_a_product_taken_while_the_sweep_reads_is_not_woken(redis_conn: redis.Redis) -> None:
    """Read before the ready list, as the sweep used to, the product is on neither."""
    queue_one(redis_conn)
    planes = Planes(redis_conn, meddling(redis_conn, after=lambda: take_as_drainer(redis_conn)))

    assert sweep_stalled(planes, []) == 0

    assert ready(redis_conn) == []


def test_a_product_handed_back_while_the_sweep_reads_is_not_woken(
        redis_conn: redis.Redis) -> None:
    queue_one(redis_conn)
    take_as_drainer(redis_conn)
    planes = Planes(redis_conn,
                    meddling(redis_conn, before=lambda: hand_back_as_drainer(redis_conn)))

    assert sweep_stalled(planes, []) == 0

    assert ready(redis_conn) == [PID]  # once: the hand-back's


def test_a_product_handed_back_and_taken_again_while_the_sweep_reads_is_not_woken(
        redis_conn: redis.Redis) -> None:
    queue_one(redis_conn)
    take_as_drainer(redis_conn)

    def taken_again() -> None:
        redis_conn.rpush(keys.READY, PID)  # (the hand-back's requeue)
        take_as_drainer(redis_conn)

    planes = Planes(redis_conn, meddling(
        redis_conn, before=lambda: redis_conn.delete(keys.lease(PID)), after=taken_again))

    assert sweep_stalled(planes, []) == 0

    assert ready(redis_conn) == []


def test_idle_products_are_forgotten_and_busy_ones_kept(redis_conn: redis.Redis) -> None:
    queue_one(redis_conn, PID)
    queue_one(redis_conn, PID + 1)
    redis_conn.delete(keys.queue(PID), keys.wake(PID))  # drained: nothing left, no flag
    redis_conn.lrem(keys.READY, 0, str(PID))

    assert sweep_stalled(redis_conn, []) == 0

    assert redis_conn.hkeys(keys.WOKEN) == [str(PID + 1).encode()]


def test_a_product_with_its_wake_flag_set_is_kept(redis_conn: redis.Redis) -> None:
    """Its next push will not wake it (the flag is set), so the sweep must still look."""
    queue_one(redis_conn)
    redis_conn.delete(keys.queue(PID))
    redis_conn.lrem(keys.READY, 0, str(PID))

    sweep_stalled(redis_conn, [])

    assert redis_conn.hexists(keys.WOKEN, PID)


def test_a_product_woken_again_while_the_sweep_reads_is_kept(redis_conn: redis.Redis) -> None:
    queue_one(redis_conn)
    redis_conn.delete(keys.queue(PID), keys.wake(PID))
    redis_conn.lrem(keys.READY, 0, str(PID))
    planes = Planes(redis_conn, meddling(redis_conn, after=lambda: queue_one(redis_conn)))

    sweep_stalled(planes, [])

    assert redis_conn.hget(keys.WOKEN, PID) == b"2"
    assert ready(redis_conn) == [PID]


def test_a_product_never_counted_is_found_in_the_catalog_slice(
        redis_conn: redis.Redis) -> None:
    queue_one(redis_conn)
    redis_conn.lpop(keys.READY)
    redis_conn.delete(keys.WOKEN)  # (woken by an older release, or the control plane lost it)

    assert sweep_stalled(redis_conn, []) == 0
    assert sweep_stalled(redis_conn, [PID]) == 1

    assert ready(redis_conn) == [PID]


def test_the_catalog_slices_go_round_the_catalog(
        redis_conn: redis.Redis, new_product: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "CATALOG_SLICE", 2)
    first, second, third = (new_product(stock=1) for _ in range(3))
    planes = Planes(redis_conn, redis_conn)
    redis_conn.set(keys.SWEEP_CURSOR, first - 1)

    assert jobs.catalog_slice(planes) == [first, second]
    assert jobs.catalog_slice(planes) == [third]  # the end: the next slice starts over
    assert redis_conn.get(keys.SWEEP_CURSOR) == b"0"
    start = jobs.catalog_slice(planes)
    assert len(start) == 2 and start[0] < start[1] <= second

    for cursor in ("not a number", "9" * 5_000, "\u0663"):  # (int() refuses all three)
        redis_conn.set(keys.SWEEP_CURSOR, cursor)
        assert jobs.catalog_slice(planes) == start
    redis_conn.set(keys.SWEEP_CURSOR, "9" * 50)  # past every product: the end
    assert jobs.catalog_slice(planes) == []
    assert redis_conn.get(keys.SWEEP_CURSOR) == b"0"


def test_a_stray_member_of_the_woken_products_fails_no_sweep(redis_conn: redis.Redis) -> None:
    queue_one(redis_conn)
    redis_conn.lpop(keys.READY)
    redis_conn.hset(keys.WOKEN, mapping={"not-a-product": 1, "\u00e9\u00e9": 2, "9" * 50: 3})

    assert sweep_stalled(redis_conn, []) == 1

    assert redis_conn.hkeys(keys.WOKEN) == [str(PID).encode()]
