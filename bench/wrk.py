"""The scenarios driven by wrk, a load generator written in C (``--driver wrk``).

Why: on a 2-core machine the Python client uses half a core or more, taken from the
targets it measures, and the issue's bars are checked with a load generator that is not
the project's. wrk (Debian package ``wrk``) opens every connection before its first
request, times each request from its write to its answer, and keeps the latencies in a
histogram, whose percentiles ``done()`` reads over all threads at once. One wrk process
runs one thread per gateway (``bench/wrk.lua`` points each thread at its gateway), the
clients split evenly over them: a client keeps its connection to one gateway, as with
the Python client.

What differs from the Python client (the report says which driver ran):
- a latency is that of every answer: in a sellout, the few refusals that end it too;
- a 202 is counted, not followed, and its hold is not counted as granted;
- a shed 503 is sent again at once, not after its Retry-After;
- in the many scenario every client takes the products in turn, where a Python client
  keeps to one product (or its share) until refused.

A sellout or many run ends when each thread has seen a run of refusals long enough that
every product it sends to is sold out; the thread then sends nothing more and stops once
every request it sent is answered, so no grant goes unseen and the stock check is the
Python client's. wrk itself would wait out its ``-d``: once every thread has stopped it
is interrupted. Soldout and read runs last their seconds. A rate is taken as the Python
client takes it: the answers counted, over the time from the first request sent to the
last of those answers (``wrk.lua`` reads a monotonic clock), so a sellout's rate leaves
out the run of refusals each thread waits for before it stops (with 100 products and
the peer's slower refusals, a large part of its run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.client import Http
from bench.scenarios import many_checked, many_products, sellout_checked
from bench.stats import LatencySummary, rate

SCRIPT = Path(__file__).with_name("wrk.lua")
RESULT_PREFIX = "BENCH_RESULT "
STOPPED = "BENCH_STOPPED"
BACKLOG_S = 1.0


class WrkMissing(RuntimeError):
    """wrk is not installed."""


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run saw, over all its threads."""

    duration_s: float  # from wrk's start to the last thread's stop (or its -d)
    requests: int
    statuses: dict[int, int]
    hold_ids: int  # ids of the 201s it kept (BENCH_HOLD_IDS), duplicates included
    unique_hold_ids: int
    errors: dict[str, int]  # connect, read, write, timeout
    latency: LatencySummary
    first_us: int = 0  # the first request sent (CLOCK_MONOTONIC, µs; 0: none)
    last_us: dict[int, int] = dataclasses.field(default_factory=dict)  # last answer by status

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)

    def rate(self, status: int) -> float | None:
        """Answers of ``status`` per second, from the first request sent to the last
        answer of ``status`` (``stats.rate``, as the Python client counts); over the
        whole run if wrk did not report those instants."""
        n = self.count(status)
        last = self.last_us.get(status, 0)
        if self.first_us and last > self.first_us:
            return rate(n, self.first_us / 1e6, last / 1e6)
        return round(n / self.duration_s, 1) if n and self.duration_s > 0 else None

    def common(self) -> dict[str, Any]:
        """The fields every scenario of the Python client reports (``Recorder.common``)."""
        server = sum(n for s, n in self.statuses.items() if 500 <= s != 503)
        other = sum(n for s, n in self.statuses.items()
                    if s not in (200, 201, 202, 409, 503) and s < 500)
        return {
            "requests": self.requests,
            "ok": self.count(200) + self.count(201),
            "refused_409": self.count(409),
            "server_5xx": server,
            "shed_503": self.count(503),
            "transport_errors": sum(self.errors.values()),
            "other_status": other,
            "accepted_202": self.count(202),
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "errors": {k: v for k, v in self.errors.items() if v},
            "elapsed_s": round(self.duration_s, 3),
            "latency_ms": self.latency.as_dict(),
            "driver": "wrk",
        }


def parse(stdout: str) -> WrkRun:
    """The run as ``bench/wrk.lua``'s ``done()`` printed it."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            doc = orjson.loads(line[len(RESULT_PREFIX):])
            break
    else:
        raise RuntimeError(f"wrk printed no result line:\n{stdout[-2000:]}")
    lat = doc["latency_us"]
    count = int(lat["count"])

    def ms(key: str) -> float | None:
        return round(lat[key] / 1000, 2) if count else None

    return WrkRun(
        duration_s=doc["duration_us"] / 1e6, requests=int(doc["requests"]),
        statuses={int(s): int(n) for s, n in doc["statuses"].items()},
        hold_ids=int(doc["hold_ids"]), unique_hold_ids=int(doc["unique_hold_ids"]),
        errors={k: int(v) for k, v in doc["errors"].items()},
        latency=LatencySummary(count, ms("p50"), ms("p95"), ms("p99"), ms("max")),
        first_us=int(doc.get("first_us", 0)),
        last_us={int(s): int(t) for s, t in doc.get("last_us", {}).items()})


def host_port(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"wrk drives plain http:// gateways, not {url!r}")
    return f"{parts.hostname}:{parts.port or 80}"


def command(exe: str, urls: list[str], clients: int, seconds: float,
            timeout_s: float) -> list[str]:
    """One thread per gateway, ``clients`` connections split evenly over them (wrk gives
    each thread clients // threads: the scenarios' 200 or thousands split exactly)."""
    threads = len(urls)
    return [exe, f"-t{threads}", f"-c{max(clients, threads)}",
            f"-d{max(1, math.ceil(seconds))}s", "--timeout", f"{max(1, math.ceil(timeout_s))}s",
            "-s", str(SCRIPT), urls[0]]


async def run(urls: list[str], *, method: str, path: str, products: list[int],
              clients: int, seconds: float, timeout_s: float, stop_after: int = 0,
              hold_ids: bool = False) -> WrkRun:
    """Run wrk once against ``urls``; raises WrkMissing, or RuntimeError if it fails."""
    exe = shutil.which("wrk")
    if exe is None:
        raise WrkMissing("--driver wrk needs wrk (Debian: apt-get install wrk)")
    env = {**os.environ, "BENCH_GATEWAYS": ",".join(host_port(u) for u in urls),
           "BENCH_METHOD": method, "BENCH_PATH": path,
           "BENCH_PRODUCTS": ",".join(str(p) for p in products),
           "BENCH_STOP_AFTER": str(stop_after), "BENCH_HOLD_IDS": "1" if hold_ids else "0"}
    cmd = command(exe, urls, clients, seconds, timeout_s)
    found = await asyncio.to_thread(_run, cmd, env, len(urls))
    if not stop_after:
        # Its time up, wrk left requests in flight: the gateways answer them (to nobody)
        # before the next scenario, which would otherwise start in their backlog.
        await asyncio.sleep(BACKLOG_S)
    return found


def _run(cmd: list[str], env: dict[str, str], threads: int) -> WrkRun:
    """wrk's main thread sleeps for the whole -d even when every thread has stopped: once
    they all said so, it is interrupted (SIGINT: it reports and exits), and the run's
    duration is the time until then, not wrk's."""
    started = time.perf_counter()
    ended: float | None = None
    stopped, lines = 0, []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith(STOPPED):
                stopped += 1
                if stopped == threads:
                    ended = time.perf_counter()
                    proc.send_signal(signal.SIGINT)
            else:
                lines.append(line)
        err = proc.stderr.read()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {err[-2000:]}")
    found = parse("".join(lines))
    if ended is not None:
        found = dataclasses.replace(found, duration_s=ended - started)
    return found


def refusal_run(products: int, clients: int, threads: int) -> int:
    """Refusals in a row after which a thread's products are all sold out: it takes them
    in turn, and its connections' answers may come back in any order."""
    return 2 * products + clients // max(1, threads)


async def sellout(http: Http, stock: int, clients: int, timeout_s: float) -> dict[str, Any]:
    """``scenarios.sellout`` with wrk: C connections hold one unit at a time until refused."""
    product_id = await http.create_product(stock, "sellout")
    found = await run(http.target.urls, method="POST", path="/api/holds",
                      products=[product_id], clients=clients, seconds=timeout_s,
                      timeout_s=http.request_timeout_s, hold_ids=True,
                      stop_after=refusal_run(1, clients, len(http.target.urls)))
    measured = {"holds_per_s": found.rate(201), **found.common(),
                "timed_out": found.duration_s >= timeout_s}
    return await sellout_checked(http, product_id, stock, clients, measured,
                                 found.unique_hold_ids)


async def soldout(http: Http, product_id: int, clients: int, seconds: float) -> dict[str, Any]:
    """``scenarios.soldout`` with wrk: C connections hold on a sold-out product."""
    found = await run(http.target.urls, method="POST", path="/api/holds",
                      products=[product_id], clients=clients, seconds=seconds,
                      timeout_s=http.request_timeout_s)
    return {"scenario": "soldout", "product_id": product_id, "clients": clients,
            "refusals_per_s": found.rate(409), "granted_after_soldout": found.count(201),
            **found.common()}


async def read(http: Http, product_id: int, clients: int, seconds: float) -> dict[str, Any]:
    """``scenarios.read`` with wrk: C connections read one product."""
    found = await run(http.target.urls, method="GET", path="/api/products/{id}",
                      products=[product_id], clients=clients, seconds=seconds,
                      timeout_s=http.request_timeout_s)
    return {"scenario": "read", "product_id": product_id, "clients": clients,
            "reads_per_s": found.rate(200), **found.common()}


async def many(http: Http, products: int, total_stock: int, clients: int,
               timeout_s: float) -> dict[str, Any]:
    """``scenarios.many`` with wrk: every connection takes the K products in turn until
    all are sold out."""
    ids, per_product = await many_products(http, products, total_stock)
    found = await run(http.target.urls, method="POST", path="/api/holds", products=ids,
                      clients=clients, seconds=timeout_s, timeout_s=http.request_timeout_s,
                      hold_ids=True,
                      stop_after=refusal_run(products, clients, len(http.target.urls)))
    measured = {"holds_per_s": found.rate(201), **found.common(), "granted": found.count(201),
                "unique_hold_ids": found.unique_hold_ids,
                "timed_out": found.duration_s >= timeout_s}
    # wrk cannot tell which product a grant was for: units granted beyond the whole stock
    oversold = max(0, found.unique_hold_ids - per_product * products)
    return await many_checked(http, ids, per_product, clients, measured, oversold)
