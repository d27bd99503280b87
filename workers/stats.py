"""The workers' figures, shared through Redis so that every gateway's /metrics shows them.

A drainer calls ``record_batch`` once per committed batch; it adds the batch to the hash
``keys.BATCH_STATS`` in the caller's pipeline (no extra round trip). The hash holds, per
histogram, one counter per bucket (not cumulative: an observation adds 1 to the first
bucket whose upper bound is >= the value, as ``prometheus_client.Histogram`` counts) and
the sum of the observations; and one counter per (operation, outcome). ``read`` turns the
hash back into cumulative buckets with ``+Inf``, whose last bucket is the count, so a
histogram read while a batch is being added is still consistent.

Field names: ``h:<histogram>:<le>``, ``h:<histogram>:sum``, ``c:<op>:<outcome>``.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
)
from prometheus_client import (
    Counter as PromCounter,
)
from prometheus_client.utils import INF, floatToGoString

from workers import keys

# Bucket upper bounds (+Inf is added). Seconds: the library's defaults, with finer
# buckets below 5 ms for the database (a batch commits in a few milliseconds) and
# coarser ones above 10 s for a queue that stalls.
DEFAULT_SECONDS = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != INF)
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "batch_size": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    "apply_seconds": (0.001, 0.0025, *DEFAULT_SECONDS),
    "commit_seconds": (0.0005, 0.001, 0.0025, *DEFAULT_SECONDS),
    "queue_wait_seconds": (*DEFAULT_SECONDS, 30.0, 60.0),
}

# Operations of the envelope protocol (workers.protocol) and the outcomes of a request.
OPS = ("hold", "order", "webhook", "restock", "create_product", "expire", "retry_webhooks")
OK, REFUSED, ERROR = "ok", "refused", "error"
# Why a request was refused, from the slug of its problem document's type.
REASONS = {
    "insufficient-stock": "insufficient_stock",
    "customer-limit": "customer_limit",
    "hold-expired": "hold_expired",
    "not-found": "not_found",
    "conflict": "conflict",
    "idempotency-key-reused": "idempotency_key_reused",
    "validation-failed": "invalid",
    "stock-limit": "stock_limit",
    "cannot-be-applied": "cannot_be_applied",
}
OTHER = "other"
OUTCOMES = (OK, ERROR, *REASONS.values(), OTHER)  # what a ``c:`` field may name


def outcome(status: int, body: Mapping[str, Any] | None) -> str:
    """``ok`` (2xx), ``error`` (5xx or no answer), else the reason of the refusal."""
    if 200 <= status < 300:
        return OK
    if status >= 500 or status < 200:
        return ERROR
    slug = str((body or {}).get("type", "")).rsplit("/", 1)[-1]
    return REASONS.get(slug, OTHER)


def tally(results: Iterable[tuple[str, int, Mapping[str, Any] | None]]) -> dict[str, int]:
    """The ``outcomes`` argument of ``record_batch`` from (op, status, body) per request."""
    counts: Counter[str] = Counter()
    for op, status, body in results:
        counts[f"{op}:{outcome(status, body)}"] += 1
    return dict(counts)


class WorkerMetrics:
    """This worker process's own figures, for its own ``/metrics`` (WORKER_METRICS_PORT):
    real prometheus_client histograms and counters, with the process collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.histograms = {
            name: Histogram(f"flashsale_worker_{metric}", text, buckets=HISTOGRAMS[name],
                            registry=self.registry)
            for name, (metric, text) in {
                "batch_size": ("batch_size", "Requests per round this worker applied"),
                "apply_seconds": ("batch_apply_duration_seconds",
                                  "Time to apply one round in one transaction, commit "
                                  "included"),
                "commit_seconds": ("batch_commit_duration_seconds",
                                   "Time of one round's writes and COMMIT"),
                "queue_wait_seconds": ("queue_wait_seconds",
                                       "How long a round's oldest request waited (sampled)"),
            }.items()}
        self.requests = PromCounter("flashsale_worker_applied_requests",
                                    "Requests this worker applied, by operation and outcome",
                                    ["op", "outcome"], registry=self.registry)

    def observe(self, observed: Mapping[str, float | None],
                outcomes: Mapping[str, int]) -> None:
        for name, value in observed.items():
            if value is not None:
                self.histograms[name].observe(value)
        for key, count in outcomes.items():
            op, _, result = key.partition(":")
            self.requests.labels(op if op in OPS else OTHER,
                                 result if result in OUTCOMES else OTHER).inc(count)


LOCAL = WorkerMetrics()


def record_batch(pipe: Any, *, size: int, apply_seconds: float, commit_seconds: float,
                 queue_wait_seconds: float | None, outcomes: Mapping[str, int]) -> None:
    """Add one committed batch to the shared figures, in ``pipe`` (a Redis pipeline).

    ``apply_seconds``: the whole transaction (lock, load, decide, write, commit);
    ``commit_seconds``: the writes and the COMMIT (one round trip on MySQL);
    ``queue_wait_seconds``: how long the batch's oldest request waited before the drainer
    took it (None: not measured this time, the drainer samples it); ``outcomes``: requests
    per ``"<op>:<outcome>"`` (see ``tally``). Unknown ops and outcomes are counted as
    ``other``, so a bug cannot create unbounded label values.
    """
    observed = {"batch_size": size, "apply_seconds": apply_seconds,
                "commit_seconds": commit_seconds, "queue_wait_seconds": queue_wait_seconds}
    LOCAL.observe(observed, outcomes)
    for name, value in observed.items():
        if value is None:
            continue
        pipe.hincrby(keys.BATCH_STATS, _bucket_field(name, value), 1)
        pipe.hincrbyfloat(keys.BATCH_STATS, f"h:{name}:sum", float(value))
    for key, count in outcomes.items():
        if count:
            op, _, result = key.partition(":")
            op = op if op in OPS else OTHER
            result = result if result in OUTCOMES else OTHER
            pipe.hincrby(keys.BATCH_STATS, f"c:{op}:{result}", int(count))


def _bucket_field(name: str, value: float) -> str:
    bounds = HISTOGRAMS[name]
    index = bisect.bisect_left(bounds, value)  # first bound >= value
    le = bounds[index] if index < len(bounds) else INF
    return f"h:{name}:{floatToGoString(le)}"


@dataclass
class Snapshot:
    """The shared figures as Prometheus wants them."""

    # histogram -> ([(le, cumulative count), ..., ("+Inf", count)], sum)
    histograms: dict[str, tuple[list[tuple[str, float]], float]] = field(default_factory=dict)
    # (op, outcome) -> requests
    outcomes: dict[tuple[str, str], float] = field(default_factory=dict)


def read(raw: Mapping[bytes | str, bytes | str]) -> Snapshot:
    """Decode ``HGETALL keys.BATCH_STATS`` (fields this module did not write are ignored)."""
    fields = {_text(k): float(_text(v)) for k, v in raw.items()}
    snapshot = Snapshot()
    for name, bounds in HISTOGRAMS.items():
        total, buckets = 0.0, []
        for le in (*(floatToGoString(b) for b in bounds), "+Inf"):
            total += fields.get(f"h:{name}:{le}", 0.0)
            buckets.append((le, total))
        snapshot.histograms[name] = (buckets, fields.get(f"h:{name}:sum", 0.0))
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        op, _, result = rest.partition(":")
        if kind == "c" and result:
            snapshot.outcomes[(op, result)] = value
    return snapshot


def oldest_age_seconds(job_pttl_ms: int, job_ttl_seconds: int) -> float | None:
    """How long ago a queued request was pushed, from the remaining life of its job key.

    PUSH sets the job key with the job TTL and TAKE keeps that TTL, so what has gone is
    the request's age. None when the key has no TTL (gone, or not a pushed request).
    """
    if job_pttl_ms < 0:
        return None
    return max(job_ttl_seconds * 1000 - job_pttl_ms, 0) / 1000


def queue_wait_seconds(conn: Any, job_ids: Iterable[str], job_ttl_seconds: int) -> float:
    """How long the oldest of ``job_ids`` has been queued (one round trip; 0 when their
    job keys are gone). A drainer passes the first request of each batch it took."""
    pipe = conn.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.pttl(keys.job(job_id))
    ages = [oldest_age_seconds(int(pttl), job_ttl_seconds) for pttl in pipe.execute()]
    return max((age for age in ages if age is not None), default=0.0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value



def head_job_id(inflight_head: bytes | None, queue_head: bytes | None) -> str | None:
    """The job id of a partition's oldest request, from the first element of its
    in-flight list (older) or else of its queue (``LINDEX key 0``)."""
    head = inflight_head or queue_head
    if not head or b" " not in head:
        return None
    return head.partition(b" ")[0].decode(errors="replace")
