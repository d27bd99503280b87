"""The load scenarios: sellout, soldout, read and many, each against one target.

Every scenario is bounded in time (its deadline) and every client loop in count; each
returns a plain dict of what it measured, ready for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.client import Http, Kind, Outcome
from bench.stats import rate, summarize

CACHE_SETTLE_S = 1.1  # API.md: the product cache reflects a commit within 1 s
CACHE_RETRIES = 4
CREATE_CONCURRENCY = 10
ERROR_BUDGET = 10_000  # a scenario stops early after this many 5xx/transport errors


@dataclass
class Recorder:
    """Counts and latencies of one scenario run, shared by all its clients."""

    label: str
    measured: Kind  # the outcome whose latency and rate this scenario reports
    started: float | None = None
    last_measured: float | None = None
    sent: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    latencies: list[float] = field(default_factory=list)
    hold_ids: list[str] = field(default_factory=list)
    granted_by_product: Counter[int] = field(default_factory=Counter)

    def begin(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def add(self, outcome: Outcome, product_id: int | None = None) -> None:
        self.sent += 1
        self.counts[outcome.kind] += 1
        self.statuses[outcome.status] += 1
        if outcome.error:
            self.errors[outcome.error] += 1
        if outcome.accepted:
            self.accepted += 1
        if outcome.kind == self.measured:
            self.latencies.append(outcome.latency_s)
            self.last_measured = time.perf_counter()
        if outcome.kind == Kind.OK and isinstance(outcome.body, dict) and product_id:
            self.hold_ids.append(str(outcome.body.get("hold_id")))
            self.granted_by_product[product_id] += 1

    async def pause_if_shed(self, outcome: Outcome) -> None:
        """A shed request is retried after its Retry-After, as a polite client does."""
        if outcome.kind == Kind.SHED:
            await asyncio.sleep(outcome.retry_after_s)

    @property
    def failures(self) -> int:
        return self.counts[Kind.SERVER_ERROR] + self.counts[Kind.TRANSPORT]

    def common(self) -> dict[str, Any]:
        """What every scenario reports: counts by kind, statuses, latency, elapsed."""
        elapsed = (None if self.started is None or self.last_measured is None
                   else round(self.last_measured - self.started, 3))
        return {
            "requests": self.sent,
            "ok": self.counts[Kind.OK],
            "refused_409": self.counts[Kind.REFUSED],
            "server_5xx": self.counts[Kind.SERVER_ERROR],
            "shed_503": self.counts[Kind.SHED],
            "transport_errors": self.counts[Kind.TRANSPORT],
            "other_status": self.counts[Kind.OTHER],
            "accepted_202": self.accepted,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "elapsed_s": elapsed,
            "latency_ms": summarize(self.latencies).as_dict(),
        }


@contextlib.asynccontextmanager
async def progress(recorder: Recorder, every_s: float = 1.0) -> AsyncIterator[None]:
    """A line on stderr every second while the block runs."""

    async def report() -> None:
        t0, last = time.perf_counter(), 0
        while True:
            await asyncio.sleep(every_s)
            done = recorder.counts[recorder.measured]
            print(f"  [{recorder.label}] {time.perf_counter() - t0:5.1f}s "
                  f"requests={recorder.sent} {recorder.measured}={done} "
                  f"(+{(done - last) / every_s:.0f}/s) 409={recorder.counts[Kind.REFUSED]} "
                  f"5xx={recorder.counts[Kind.SERVER_ERROR]} "
                  f"shed={recorder.counts[Kind.SHED]} "
                  f"err={recorder.counts[Kind.TRANSPORT]} 202={recorder.accepted}",
                  file=sys.stderr, flush=True)
            last = done

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def hold_body(product_id: int) -> bytes:
    return orjson.dumps({"product_id": product_id, "qty": 1})


async def take_until_refused(http: Http, rec: Recorder, product_ids: list[int],
                             deadline: float, max_requests: int) -> None:
    """One client: qty-1 holds on each product in turn until it is refused."""
    for product_id in product_ids:
        body = hold_body(product_id)
        for _ in range(max_requests):
            if time.monotonic() > deadline or rec.failures >= ERROR_BUDGET:
                return
            rec.begin()
            outcome = await http.hold(body)
            rec.add(outcome, product_id)
            if outcome.kind == Kind.REFUSED:
                break
            await rec.pause_if_shed(outcome)


async def for_a_while(rec: Recorder, until: float, max_requests: int,
                      request: Callable[[Any], Any], argument: Any) -> None:
    """One client: the same request again and again until ``until``."""
    for _ in range(max_requests):
        if time.monotonic() > until or rec.failures >= ERROR_BUDGET:
            return
        rec.begin()
        outcome = await request(argument)
        rec.add(outcome)
        await rec.pause_if_shed(outcome)


async def settled_product(http: Http, product_id: int, expect_available: int) -> dict[str, Any]:
    """The product once the cache has caught up (or as it is after a few tries)."""
    await asyncio.sleep(CACHE_SETTLE_S)
    doc = await http.product(product_id)
    for _ in range(CACHE_RETRIES):
        if doc.get("available") == expect_available:
            break
        await asyncio.sleep(0.5)
        doc = await http.product(product_id)
    return doc


def stock_check(stock: int, granted: int, unique: int, available: int | None) -> dict[str, Any]:
    """Oversold and leaked units of one sold-out product, from what clients were told.

    Oversold: grants beyond the stock. Leaked: units neither granted to a client nor
    available any more (e.g. reserved for a request the client saw fail).
    """
    oversold = max(0, unique - stock)
    leaked = None if available is None else max(0, stock - unique - available)
    return {"granted": granted, "unique_hold_ids": unique, "duplicate_hold_ids": granted - unique,
            "available_after": available, "oversold": oversold, "leaked": leaked}


async def sellout(http: Http, stock: int, clients: int, timeout_s: float) -> dict[str, Any]:
    """C clients take qty-1 holds on one product of ``stock`` units until refused."""
    product_id = await http.create_product(stock, "sellout")
    rec = Recorder(f"{http.target.name} sellout c={clients}", Kind.OK)
    deadline = time.monotonic() + timeout_s
    async with progress(rec):
        await asyncio.gather(*(take_until_refused(http.pinned(n), rec, [product_id], deadline,
                                                  stock + 10) for n in range(clients)))
    measured = {"holds_per_s": rate(rec.counts[Kind.OK], rec.started, rec.last_measured),
                **rec.common(), "timed_out": time.monotonic() > deadline}
    return await sellout_checked(http, product_id, stock, clients, measured,
                                 len(set(rec.hold_ids)))


async def sellout_checked(http: Http, product_id: int, stock: int, clients: int,
                          measured: dict[str, Any], unique: int) -> dict[str, Any]:
    """A sellout's result: what was measured (holds_per_s, the common fields, timed_out),
    and the stock check once the cache settled; ``unique``: distinct hold ids granted."""
    doc = await settled_product(http, product_id, 0)
    check = stock_check(stock, measured["ok"], unique, doc.get("available"))
    ok = (check["unique_hold_ids"] == stock and check["available_after"] == 0
          and check["duplicate_hold_ids"] == 0)
    return {"scenario": "sellout", "product_id": product_id, "clients": clients, "stock": stock,
            **measured, **check, "correct": ok}


async def soldout(http: Http, product_id: int, clients: int, seconds: float) -> dict[str, Any]:
    """C clients hammer a sold-out product for ``seconds``: every answer should be 409."""
    rec = Recorder(f"{http.target.name} soldout c={clients}", Kind.REFUSED)
    body = hold_body(product_id)
    until = time.monotonic() + seconds
    async with progress(rec):
        await asyncio.gather(*(for_a_while(rec, until, 10_000_000, http.pinned(n).hold, body)
                               for n in range(clients)))
    refused = rec.counts[Kind.REFUSED]
    return {"scenario": "soldout", "product_id": product_id, "clients": clients,
            "refusals_per_s": rate(refused, rec.started, rec.last_measured),
            "granted_after_soldout": rec.counts[Kind.OK], **rec.common()}


async def read(http: Http, product_id: int, clients: int, seconds: float) -> dict[str, Any]:
    """C clients read one product for ``seconds``."""
    rec = Recorder(f"{http.target.name} read c={clients}", Kind.OK)
    path = f"/api/products/{product_id}"
    until = time.monotonic() + seconds
    async with progress(rec):
        await asyncio.gather(*(for_a_while(rec, until, 10_000_000, http.pinned(n).read, path)
                               for n in range(clients)))
    return {"scenario": "read", "product_id": product_id, "clients": clients,
            "reads_per_s": rate(rec.counts[Kind.OK], rec.started, rec.last_measured),
            **rec.common()}


def spread(products: list[int], clients: int) -> list[list[int]]:
    """Which products each client works on: every product gets clients, every client work.

    With more clients than products, clients are dealt round-robin onto products; with
    fewer, each client takes a share of the products and sells them out one after another.
    """
    if clients >= len(products):
        return [[products[i % len(products)]] for i in range(clients)]
    return [products[i::clients] for i in range(clients)]


async def many_products(http: Http, products: int, total_stock: int) -> tuple[list[int], int]:
    """K fresh products sharing ``total_stock`` evenly; their ids and units each."""
    per_product = max(1, total_stock // products)
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def create(n: int) -> int:
        async with gate:
            return await http.create_product(per_product, f"many{products}-{n}")

    return list(await asyncio.gather(*(create(n) for n in range(products)))), per_product


async def many(http: Http, products: int, total_stock: int, clients: int,
               timeout_s: float) -> dict[str, Any]:
    """K hot products at once, the stock split evenly; total granted holds/s."""
    ids, per_product = await many_products(http, products, total_stock)
    rec = Recorder(f"{http.target.name} many k={products} c={clients}", Kind.OK)
    deadline = time.monotonic() + timeout_s
    async with progress(rec):
        # A product's clients are spread over the gateways (client n works on product
        # n mod K: its gateway follows n div K), so that every product is reached through
        # every gateway, as with clients behind a load balancer.
        group = products if clients >= products else 1
        await asyncio.gather(*(take_until_refused(http.pinned(n // group), rec, share,
                                                  deadline, per_product + 10)
                               for n, share in enumerate(spread(ids, clients))))
    oversold = sum(max(0, rec.granted_by_product[pid] - per_product) for pid in ids)
    measured = {"holds_per_s": rate(rec.counts[Kind.OK], rec.started, rec.last_measured),
                **rec.common(), "granted": rec.counts[Kind.OK],
                "unique_hold_ids": len(set(rec.hold_ids)),
                "timed_out": time.monotonic() > deadline}
    return await many_checked(http, ids, per_product, clients, measured, oversold)


async def many_checked(http: Http, ids: list[int], per_product: int, clients: int,
                       measured: dict[str, Any], oversold: int) -> dict[str, Any]:
    """A many run's result: what was measured, and the stock left once the cache settled.
    ``measured`` has holds_per_s, the common fields, granted and unique_hold_ids."""
    await asyncio.sleep(CACHE_SETTLE_S)
    docs = await asyncio.gather(*(http.product(pid) for pid in ids))
    available = sum(int(d.get("available", 0)) for d in docs)
    granted, unique = measured["granted"], measured["unique_hold_ids"]
    leaked = max(0, per_product * len(ids) - unique - available)
    return {"scenario": "many", "products": len(ids), "clients": clients,
            "stock_per_product": per_product, "stock": per_product * len(ids), **measured,
            "duplicate_hold_ids": granted - unique, "available_after": available,
            "oversold": oversold, "leaked": leaked,
            "correct": unique == per_product * len(ids) and available == 0
            and granted == unique}
