"""Prometheus metrics of one gateway process, plus the workers' shared batch counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers import keys
from workers.drain import BATCH_BUCKETS

MAX_TRACKED_PRODUCTS = 1000
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class QueueCollector(Collector):
    """Queue depths and batch counters, read from Redis just before each scrape."""

    def __init__(self) -> None:
        self.depths: dict[int, tuple[int, int]] = {}
        self.batches: dict[str, float] = {}

    async def refresh(self, conn: aioredis.Redis, product_ids: set[int]) -> None:
        ids = sorted(product_ids)
        async with conn.pipeline(transaction=False) as pipe:
            for pid in ids:
                pipe.llen(keys.queue(pid))
                pipe.llen(keys.inflight(pid))
            pipe.hgetall(keys.BATCH_STATS)
            values = await pipe.execute()
        self.depths = {pid: (values[2 * n], values[2 * n + 1]) for n, pid in enumerate(ids)}
        self.batches = {k.decode(): float(v) for k, v in values[-1].items()}

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("flashsale_queue_depth",
                                  "Requests waiting in a product's queue",
                                  labels=["product_id", "state"])
        for pid, (queued, inflight) in self.depths.items():
            depth.add_metric([str(pid), "queued"], queued)
            depth.add_metric([str(pid), "inflight"], inflight)
        yield depth
        stats = self.batches
        batches = CounterMetricFamily("flashsale_batches", "Batches applied by all workers")
        batches.add_metric([], stats.get("batches", 0))
        yield batches
        requests = CounterMetricFamily("flashsale_batch_requests",
                                       "Requests applied in batches by all workers")
        requests.add_metric([], stats.get("requests", 0))
        yield requests
        sizes = GaugeMetricFamily("flashsale_batch_size_le",
                                  "Batches whose size is <= le and above the next smaller "
                                  "bound (not cumulative)", labels=["le"])
        for bound in (*BATCH_BUCKETS, "inf"):
            sizes.add_metric([str(bound)], stats.get(f"size_le_{bound}", 0))
        yield sizes
        worker = CounterMetricFamily("flashsale_worker_holds",
                                     "Holds decided by the workers", labels=["outcome"])
        worker.add_metric(["granted"], stats.get("holds_granted", 0))
        worker.add_metric(["refused"], stats.get("holds_refused_worker", 0))
        yield worker


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flashsale_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("flashsale_http_request_duration_seconds",
                                 "HTTP request latency", ["route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.holds = Counter("flashsale_holds", "Hold requests answered by this gateway",
                             ["outcome"], registry=self.registry)
        self.holds_refused_fast = self.holds.labels("refused_sold_out_fast_path")
        self.queues = QueueCollector()
        self.registry.register(self.queues)
        self.products: set[int] = set()
        self._children: dict[tuple[str, str, int], tuple[Any, ...]] = {}

    def track(self, product_id: int) -> None:
        """Report this product's queue depth (a bounded set: the hot ones come first)."""
        if len(self.products) < MAX_TRACKED_PRODUCTS:
            self.products.add(product_id)

    def observe(self, request: web.Request, status: int, seconds: float) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource else "unmatched"
        key = (request.method, route, status)
        children = self._children.get(key)
        if children is None:  # label lookups take a lock: do them once per combination
            children = self._children[key] = self._label(*key)
        for counter in children[1:]:
            counter.inc()
        children[0].observe(seconds)

    def _label(self, method: str, route: str, status: int) -> tuple[Any, ...]:
        children: list[Any] = [self.latency.labels(route),
                               self.requests.labels(method, route, str(status))]
        if route == "/api/holds" and method == "POST" and status in (201, 409):
            children.append(self.holds.labels("granted" if status == 201 else "refused"))
        return tuple(children)

    async def render(self, conn: aioredis.Redis) -> bytes:
        await self.queues.refresh(conn, self.products)
        return generate_latest(self.registry)


def metrics_middleware(metrics: Metrics, log_request) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            metrics.observe(request, status, elapsed)
            log_request(request, status, elapsed)

    return middleware
