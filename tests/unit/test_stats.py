"""workers.stats: what a drainer adds per batch, and the histograms the gateway reads back."""

from __future__ import annotations

import fakeredis
import pytest
from prometheus_client import CollectorRegistry, Histogram

from flashsale.problems import customer_limit
from workers import keys, stats

INSUFFICIENT = {"type": "https://flashsale.dev/problems/insufficient-stock"}


def record(conn: fakeredis.FakeRedis, **observed: object) -> None:
    batch = {"size": 1, "apply_seconds": 0.01, "commit_seconds": 0.001,
             "queue_wait_seconds": 0.1, "outcomes": {}, **observed}
    pipe = conn.pipeline(transaction=False)
    stats.record_batch(pipe, **batch)  # type: ignore[arg-type]
    pipe.execute()


def snapshot(conn: fakeredis.FakeRedis) -> stats.Snapshot:
    return stats.read(conn.hgetall(keys.BATCH_STATS))


@pytest.mark.parametrize(("status", "body", "expected"), [
    (201, {}, "ok"),
    (200, {}, "ok"),
    (202, {"outcome": "pending"}, "ok"),
    (409, INSUFFICIENT, "insufficient_stock"),
    (409, {"type": "https://flashsale.dev/problems/hold-expired"}, "hold_expired"),
    (409, {"type": customer_limit(4, 4, 1)["type"]}, "customer_limit"),
    (409, {"type": "https://flashsale.dev/problems/conflict"}, "conflict"),
    (404, {"type": "https://flashsale.dev/problems/not-found"}, "not_found"),
    (422, {"type": "https://flashsale.dev/problems/idempotency-key-reused"},
     "idempotency_key_reused"),
    (400, {"type": "https://flashsale.dev/problems/unknown-operation"}, "other"),
    (409, None, "other"),
    (500, {"type": "https://flashsale.dev/problems/set-aside"}, "error"),
    (0, None, "error"),
])
def test_outcome_of_a_result(status: int, body: dict[str, str] | None, expected: str) -> None:
    assert stats.outcome(status, body) == expected


def test_tally_counts_per_op_and_outcome() -> None:
    assert stats.tally([("hold", 201, {}), ("hold", 201, {}), ("hold", 409, INSUFFICIENT),
                        ("order", 500, None)]) == {
        "hold:ok": 2, "hold:insufficient_stock": 1, "order:error": 1}


def test_histograms_match_prometheus_client_for_the_same_observations() -> None:
    """The shared histogram is what one prometheus_client Histogram would have shown."""
    conn = fakeredis.FakeRedis()
    registry = CollectorRegistry()
    reference = Histogram("ref", "reference", buckets=stats.HISTOGRAMS["batch_size"],
                          registry=registry)
    sizes = [1, 1, 2, 3, 5, 7, 50, 51, 200, 999, 1000, 1001, 5000]
    for size in sizes:
        record(conn, size=size)
        reference.observe(size)
    buckets, total = snapshot(conn).histograms["batch_size"]
    want = {s.labels["le"]: s.value for metric in registry.collect() for s in metric.samples
            if s.name == "ref_bucket"}
    assert dict(buckets) == want
    assert buckets[-1] == ("+Inf", len(sizes))
    assert total == sum(sizes)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), "cumulative"


def test_every_histogram_is_recorded_with_its_sum() -> None:
    conn = fakeredis.FakeRedis()
    record(conn, size=3, apply_seconds=0.004, commit_seconds=0.0002, queue_wait_seconds=75.0)
    record(conn, size=4, apply_seconds=0.5, commit_seconds=0.003, queue_wait_seconds=0.0)
    histograms = snapshot(conn).histograms
    assert set(histograms) == set(stats.HISTOGRAMS)
    assert histograms["apply_seconds"][1] == pytest.approx(0.504)
    wait = dict(histograms["queue_wait_seconds"][0])
    assert wait["0.005"] == 1 and wait["60.0"] == 1 and wait["+Inf"] == 2
    commit = dict(histograms["commit_seconds"][0])
    assert commit["0.0005"] == 1 and commit["0.005"] == 2


def test_outcomes_add_up_and_stay_bounded() -> None:
    conn = fakeredis.FakeRedis()
    record(conn, outcomes={"hold:ok": 3, "hold:insufficient_stock": 2, "order:ok": 0})
    record(conn, outcomes={"hold:ok": 1, "evil-op-123:ok": 1, "hold:made-up": 4})
    assert snapshot(conn).outcomes == {
        ("hold", "ok"): 4, ("hold", "insufficient_stock"): 2, ("other", "ok"): 1,
        ("hold", "other"): 4}


def test_read_ignores_fields_it_does_not_know() -> None:
    conn = fakeredis.FakeRedis()
    conn.hset(keys.BATCH_STATS, mapping={"batches": 7, "size_le_10": 7, "h:batch_size:3.0": 9})
    record(conn, size=10)
    buckets, _ = snapshot(conn).histograms["batch_size"]
    assert buckets[-1] == ("+Inf", 1)


def test_empty_hash_reads_as_zero_histograms() -> None:
    histograms = stats.read({}).histograms
    for name, bounds in stats.HISTOGRAMS.items():
        buckets, total = histograms[name]
        assert len(buckets) == len(bounds) + 1 and buckets[-1] == ("+Inf", 0) and total == 0


def test_queue_wait_and_oldest_age_from_the_job_ttl() -> None:
    conn = fakeredis.FakeRedis()
    job_id = keys.new_id("job", 7)
    conn.set(keys.job(job_id), "queued", px=3600_000 - 2_500)
    younger = keys.new_id("job", 8)
    conn.set(keys.job(younger), "processing", px=3600_000 - 500)
    gone = keys.new_id("job", 7)
    assert stats.queue_wait_seconds(conn, [younger, job_id, gone], 3600) == pytest.approx(
        2.5, abs=0.1)
    assert stats.queue_wait_seconds(conn, [gone], 3600) == 0.0
    assert stats.queue_wait_seconds(conn, [], 3600) == 0.0
    assert stats.oldest_age_seconds(-2, 3600) is None
    assert stats.oldest_age_seconds(-1, 3600) is None


def test_the_oldest_request_is_the_in_flight_batch_s_first() -> None:
    assert stats.head_job_id(b"job_7_a {}", b"job_7_b {}") == "job_7_a"
    assert stats.head_job_id(None, b"job_7_b {}") == "job_7_b"
    assert stats.head_job_id(None, None) is None
    assert stats.head_job_id(None, b"garbage-without-a-space") is None
