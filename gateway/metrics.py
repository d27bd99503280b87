"""Prometheus metrics: this gateway's own, and the whole service's read from Redis.

Every gateway exposes the workers' figures (``workers.stats``: batch histograms, request
outcomes, dead letters) and the queues' state, read from Redis at scrape time, so one
scrape target per gateway sees the whole service. Those series are the same on every
gateway: aggregate them with ``max``, not ``sum`` (docs/OPERATIONS.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from flashsale.config import Settings
from workers import keys, stats
from workers.planes import HEARTBEAT_MS

MAX_TRACKED_PRODUCTS = 1000  # products whose queues this gateway looks at
TOP_PRODUCTS = 20  # of those, the deepest queues get per-product series
READY_SCAN = 100  # products on the ready list also looked at
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WORKER_HISTOGRAMS = {  # workers.stats name -> (metric, help)
    "batch_size": ("flashsale_batch_size", "Requests per batch applied by the workers"),
    "apply_seconds": ("flashsale_batch_apply_duration_seconds",
                      "Time to apply one batch in one transaction, commit included"),
    "commit_seconds": ("flashsale_batch_commit_duration_seconds",
                       "Time of one batch's writes and COMMIT (one round trip on MySQL)"),
    "queue_wait_seconds": ("flashsale_queue_wait_seconds",
                           "How long a batch's oldest request waited in its queue"),
}


class ServiceCollector(Collector):
    """The workers' figures and the queues, read from Redis just before each scrape."""

    def __init__(self, job_ttl_seconds: int) -> None:
        self.job_ttl_seconds = job_ttl_seconds
        self.snapshot = stats.Snapshot()
        self.dead_letters = 0.0
        self.depths: dict[int, tuple[int, int]] = {}  # top products: (queued, inflight)
        self.ages: dict[int, float] = {}
        self.ready = self.drainers = self.workers = self.waiting_jobs = 0

    async def refresh(self, control: aioredis.Redis, data: Any, tracked: set[int]) -> None:
        """Read everything: the counters from the control plane, the queues from the data
        plane (the same Redis unless the data plane is a cluster)."""
        now_ms = int(time.time() * 1000)
        async with control.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.BATCH_STATS)
            pipe.get(keys.DEAD_LETTERS)
            pipe.lrange(keys.READY, 0, READY_SCAN - 1)
            pipe.llen(keys.READY)
            pipe.zcount(keys.DRAINERS, now_ms - HEARTBEAT_MS, "+inf")
            pipe.scard(keys.DRAIN_WORKERS)
            pipe.llen(keys.DRAIN_JOBS)
            head = await pipe.execute()
        raw, dead, ready_ids, self.ready, self.drainers, self.workers, self.waiting_jobs = head
        self.snapshot = stats.read(raw)
        self.dead_letters = float(dead or 0)
        products = sorted(tracked | {int(pid) for pid in ready_ids if pid.isdigit()})
        lengths = await _each(data, products, lambda pipe, pid: (
            pipe.llen(keys.queue(pid)), pipe.llen(keys.inflight(pid))))
        depths = {pid: (lengths[2 * n], lengths[2 * n + 1]) for n, pid in enumerate(products)}
        top = sorted((pid for pid, d in depths.items() if sum(d)),
                     key=lambda pid: -sum(depths[pid]))[:TOP_PRODUCTS]
        self.depths = {pid: depths[pid] for pid in top}
        heads = await _each(data, top, lambda pipe, pid: (
            pipe.lindex(keys.inflight(pid), 0), pipe.lindex(keys.queue(pid), 0)))
        oldest = {pid: job_id for n, pid in enumerate(top)
                  if (job_id := stats.head_job_id(heads[2 * n], heads[2 * n + 1]))}
        pttls = await _each(data, list(oldest.values()),
                            lambda pipe, job_id: pipe.pttl(keys.job(job_id)))
        self.ages = {}
        for pid, pttl in zip(oldest, pttls, strict=True):
            age = stats.oldest_age_seconds(int(pttl), self.job_ttl_seconds)
            if age is not None:
                self.ages[pid] = age

    def collect(self) -> Iterator[Metric]:
        yield from self._histograms()
        yield from self._outcomes()
        dead = CounterMetricFamily("flashsale_dead_letters",
                                   "Requests the workers could not apply and set aside")
        dead.add_metric([], self.dead_letters)
        yield dead
        depth = GaugeMetricFamily(
            "flashsale_queue_depth",
            f"Requests queued and in flight, for the {TOP_PRODUCTS} deepest product queues",
            labels=["product_id", "state"])
        for pid, (queued, inflight) in self.depths.items():
            depth.add_metric([str(pid), "queued"], queued)
            depth.add_metric([str(pid), "inflight"], inflight)
        yield depth
        age = GaugeMetricFamily(
            "flashsale_queue_oldest_age_seconds",
            "Age of the oldest request waiting, for the deepest product queues",
            labels=["product_id"])
        for pid, seconds in self.ages.items():
            age.add_metric([str(pid)], seconds)
        yield age
        yield GaugeMetricFamily("flashsale_ready_products",
                                "Products waiting for a drainer", value=self.ready)
        yield GaugeMetricFamily("flashsale_drainers",
                                "Drain jobs at work (live heartbeat)", value=self.drainers)
        yield GaugeMetricFamily("flashsale_drain_workers",
                                "rq workers listening on the drain queue", value=self.workers)
        yield GaugeMetricFamily("flashsale_drain_jobs_waiting",
                                "Drain jobs enqueued and not yet started",
                                value=self.waiting_jobs)

    def _histograms(self) -> Iterator[Metric]:
        for name, (metric, help_text) in WORKER_HISTOGRAMS.items():
            buckets, total = self.snapshot.histograms[name]
            family = HistogramMetricFamily(metric, help_text)
            family.add_metric([], buckets, total)
            yield family

    def _outcomes(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "flashsale_worker_requests",
            "Requests applied by the workers, by operation and outcome (ok, refused, error)",
            labels=["op", "outcome"])
        refusals = CounterMetricFamily(
            "flashsale_worker_refusals",
            "Requests the workers refused (4xx), by operation and reason",
            labels=["op", "reason"])
        totals: dict[tuple[str, str], float] = {}
        for (op, result), count in sorted(self.snapshot.outcomes.items()):
            kind = result if result in (stats.OK, stats.ERROR) else stats.REFUSED
            totals[(op, kind)] = totals.get((op, kind), 0.0) + count
            if kind == stats.REFUSED:
                refusals.add_metric([op, result], count)
        for op in stats.OPS:  # known series from 0, so that rate() sees their first rise
            for kind in (stats.OK, stats.REFUSED, stats.ERROR):
                totals.setdefault((op, kind), 0.0)
        for (op, kind), count in sorted(totals.items()):
            requests.add_metric([op, kind], count)
        yield requests
        yield refusals


async def _each(conn: Any, items: list[Any], add: Any) -> list[Any]:
    """One pipeline of ``add(pipe, item)`` for every item (none when there is none)."""
    if not items:
        return []
    async with conn.pipeline(transaction=False) as pipe:
        for item in items:
            add(pipe, item)
        return list(await pipe.execute())


class Metrics:
    """This gateway's metrics registry; ``render`` is the body of ``GET /metrics``."""

    def __init__(self, job_ttl_seconds: int = Settings.job_ttl_seconds) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flashsale_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("flashsale_http_request_duration_seconds",
                                 "Time to answer an HTTP request, by route", ["route"],
                                 registry=self.registry)
        self.holds = Counter("flashsale_holds", "Hold requests answered by this gateway",
                             ["outcome"], registry=self.registry)
        self.holds_refused_fast = self.holds.labels("refused_sold_out_fast_path")
        for outcome in ("granted", "refused"):
            self.holds.labels(outcome)
        self.rate_limited = Counter("flashsale_rate_limited_requests",
                                    "Holds and orders refused 429 by the rate limit "
                                    "(RATE_LIMIT_PER_MINUTE) at this gateway",
                                    registry=self.registry)
        self.shed = Counter("flashsale_shed_requests",
                            "Writes turned away 503 (Retry-After) before being queued, "
                            "because this gateway had its fill of requests waiting",
                            registry=self.registry)
        self.reads_held = Counter("flashsale_reads_held",
                                  "Reads of a connection this gateway parsed a turn of its "
                                  "event loop later, past the reads it parses per turn",
                                  registry=self.registry)
        self.service = ServiceCollector(job_ttl_seconds)
        self.registry.register(self.service)
        self.products: set[int] = set()
        self._children: dict[tuple[str, str, int], tuple[Any, ...]] = {}

    def track(self, product_id: int) -> None:
        """Look at this product's queue at each scrape (a bounded set: the first ones)."""
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

    async def render(self, control: aioredis.Redis, data: Any = None) -> bytes:
        """The exposition; ``data`` is the data plane's client when it is not ``control``."""
        await self.service.refresh(control, control if data is None else data,
                                   self.products)
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
