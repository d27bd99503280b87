"""gateway.metrics on fakeredis: the exposition a gateway serves, parsed as Prometheus would."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.metrics import TOP_PRODUCTS, Metrics, metrics_middleware
from workers import keys, stats

JOB_TTL = 3600


@pytest.fixture
async def conn() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


def families(text: bytes) -> dict[str, list[Sample]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def types(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


async def record(conn: fakeredis.FakeAsyncRedis, size: int,
                 outcomes: dict[str, int] | None = None) -> None:
    pipe = conn.pipeline(transaction=False)
    stats.record_batch(pipe, size=size, apply_seconds=0.003, commit_seconds=0.001,
                       queue_wait_seconds=0.2, outcomes=outcomes or {})
    await pipe.execute()


async def queue(conn: fakeredis.FakeAsyncRedis, pid: int, depth: int, inflight: int = 0,
                age_s: float = 0.0) -> None:
    for n in range(depth + inflight):
        job_id = keys.new_id("job", pid)
        target = keys.inflight(pid) if n < inflight else keys.queue(pid)
        await conn.rpush(target, f"{job_id} {{}}")
        await conn.set(keys.job(job_id), "queued", px=int((JOB_TTL - age_s) * 1000))


async def test_worker_histograms_are_cumulative_with_inf_and_count(conn) -> None:
    for size in (1, 3, 3, 80, 1500):
        await record(conn, size)
    text = await Metrics(JOB_TTL).render(conn)
    assert types(text)["flashsale_batch_size"] == "histogram"
    samples = families(text)["flashsale_batch_size"]
    buckets = [(s.labels["le"], s.value) for s in samples if s.name.endswith("_bucket")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert buckets[-1] == ("+Inf", 5)
    assert value(samples, "flashsale_batch_size_count") == 5
    assert value(samples, "flashsale_batch_size_sum") == 1587
    assert dict(buckets)["5.0"] == 3
    for name in ("flashsale_batch_apply_duration_seconds",
                 "flashsale_batch_commit_duration_seconds", "flashsale_queue_wait_seconds"):
        assert types(text)[name] == "histogram"
        assert value(families(text)[name], name + "_count") == 5


async def test_outcomes_refusals_and_dead_letters(conn) -> None:
    await record(conn, 4, {"hold:ok": 2, "hold:insufficient_stock": 1, "webhook:error": 1})
    await conn.set(keys.DEAD_LETTERS, 3)
    found = families(await Metrics(JOB_TTL).render(conn))
    requests = found["flashsale_worker_requests"]
    assert value(requests, "flashsale_worker_requests_total", op="hold", outcome="ok") == 2
    assert value(requests, "flashsale_worker_requests_total", op="hold", outcome="refused") == 1
    assert value(requests, "flashsale_worker_requests_total", op="webhook", outcome="error") == 1
    assert value(requests, "flashsale_worker_requests_total", op="order", outcome="ok") == 0
    refusals = found["flashsale_worker_refusals"]
    assert value(refusals, "flashsale_worker_refusals_total", op="hold",
                 reason="insufficient_stock") == 1
    assert value(found["flashsale_dead_letters"], "flashsale_dead_letters_total") == 3


async def test_only_the_deepest_queues_get_per_product_series(conn) -> None:
    metrics = Metrics(JOB_TTL)
    for pid in range(1, 31):
        metrics.track(pid)
        await queue(conn, pid, depth=pid, age_s=pid)
    metrics.track(99)  # tracked, empty: no series
    await conn.rpush(keys.READY, 77)  # queued by another gateway: on the ready list
    await queue(conn, 77, depth=5, inflight=200, age_s=42.0)
    found = families(await metrics.render(conn))
    depth = found["flashsale_queue_depth"]
    products = {s.labels["product_id"] for s in depth}
    assert len(products) == TOP_PRODUCTS
    assert products == {"77", *(str(pid) for pid in range(12, 31))}
    assert value(depth, "flashsale_queue_depth", product_id="77", state="inflight") == 200
    assert value(depth, "flashsale_queue_depth", product_id="77", state="queued") == 5
    ages = found["flashsale_queue_oldest_age_seconds"]
    assert value(ages, "flashsale_queue_oldest_age_seconds", product_id="77") == (
        pytest.approx(42.0, abs=1.0))
    assert value(ages, "flashsale_queue_oldest_age_seconds", product_id="30") == (
        pytest.approx(30.0, abs=1.0))
    assert value(found["flashsale_ready_products"], "flashsale_ready_products") == 1


async def test_drainers_and_workers(conn) -> None:
    now = int(time.time() * 1000)
    await conn.zadd(keys.DRAINERS, {"live": now, "dead": now - 120_000})
    await conn.sadd(keys.DRAIN_WORKERS, "w1", "w2")
    found = families(await Metrics(JOB_TTL).render(conn))
    assert value(found["flashsale_drainers"], "flashsale_drainers") == 1
    assert value(found["flashsale_drain_workers"], "flashsale_drain_workers") == 2


async def test_http_latency_histogram_per_route(conn, aiohttp_client) -> None:
    metrics = Metrics(JOB_TTL)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=await metrics.render(conn))

    app = web.Application(middlewares=[metrics_middleware(metrics, lambda *a: None)])
    app.router.add_get("/api/products/{product_id}", hello)
    app.router.add_get("/metrics", scrape)
    client: TestClient = await aiohttp_client(app)
    for pid in (1, 2, 3):
        assert (await client.get(f"/api/products/{pid}")).status == 200
    assert (await client.get("/nowhere/at/all")).status == 404
    found = families(await (await client.get("/metrics")).read())
    latency = found["flashsale_http_request_duration_seconds"]
    route = "/api/products/{product_id}"
    assert value(latency, "flashsale_http_request_duration_seconds_count", route=route) == 3
    assert value(latency, "flashsale_http_request_duration_seconds_bucket", route=route,
                 le="+Inf") == 3
    assert {s.labels.get("route") for s in latency} == {route, "unmatched"}  # bounded
    requests = found["flashsale_http_requests"]
    assert value(requests, "flashsale_http_requests_total", method="GET", route=route,
                 status="200") == 3
