"""``GET /metrics`` after real traffic: Prometheus conventions, ``promtool check metrics``
(Debian's prometheus package), and the workers' figures on every gateway."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port
from tests.e2e.harness import Api, ServiceFactory, ServiceInstance
from tests.random_refs import random_event_id
from tests.services import missing_service

pytestmark = pytest.mark.e2e

MAX_PRODUCT_SERIES = 20


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_service("no promtool (Debian package prometheus; .ci/run installs it)")
    return path


async def scrape(api: Api, gateway: int) -> str:
    reply = await api.get("/metrics", gateway=gateway)
    assert reply.status == 200, reply
    assert reply.media_type == "text/plain", reply.headers.get("Content-Type")
    return reply.raw.decode()


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def sell_out(api: Api) -> int:
    """A product of 5 units: 8 holds (5 granted, 3 refused), an order and its payment."""
    product = await api.create_product(stock=5)
    pid = product["id"]
    replies = [await api.settle(r) for r in
               await asyncio.gather(*(api.hold(pid, 1) for _ in range(8)))]
    statuses = sorted(r.status for r in replies)
    assert statuses == [201] * 5 + [409] * 3, statuses
    hold = next(r.body for r in replies if r.status == 201)
    order = await api.settle(await api.order(hold["hold_id"]))
    assert order.status == 201, order
    paid = await api.webhook(order.body["order_id"], "paid", key=random_event_id())
    assert paid.status == 200, paid
    return pid


async def test_metrics_pass_promtool_and_carry_the_workers_figures(api: Api) -> None:
    await sell_out(api)
    deadline = time.monotonic() + 10
    while True:  # the workers' counters land in Redis right after each batch
        texts = [await scrape(api, n) for n in range(len(api.service.web_urls))]
        granted = [sample(t, "flashsale_worker_requests_total", op="hold", outcome="ok")
                   for t in texts]
        if min(granted) >= 5 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert min(granted) >= 5, granted
    for text in texts:
        check = subprocess.run([promtool(), "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert sample(text, "flashsale_batch_size_count") >= 1
        assert sample(text, "flashsale_batch_apply_duration_seconds_count") >= 1
        assert sample(text, "flashsale_batch_commit_duration_seconds_count") >= 1
        assert sample(text, "flashsale_queue_wait_seconds_count") >= 1
        assert sample(text, "flashsale_worker_requests_total", op="webhook", outcome="ok") >= 1
        assert "flashsale_dead_letters_total" in text
    # Each refusal was decided by a worker, or at once by a gateway (admission check).
    fast = sum(sample(t, "flashsale_holds_total", outcome="refused_sold_out_fast_path")
               for t in texts)
    worker = sample(texts[0], "flashsale_worker_refusals_total", op="hold",
                    reason="insufficient_stock")
    assert worker + fast >= 3, (worker, fast)
    # One scrape target per gateway sees the whole service: the same worker figures.
    sizes = [sample(t, "flashsale_batch_size_count") for t in texts]
    assert max(sizes) - min(sizes) <= 2, sizes


async def test_histograms_and_names_follow_prometheus_conventions(api: Api) -> None:
    await sell_out(api)
    for gateway in range(len(api.service.web_urls)):
        text = await scrape(api, gateway)
        kinds: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            kinds[family.name] = family.type
            assert family.name.startswith("flashsale_"), family.name
            if family.type == "counter":
                for s in family.samples:
                    assert s.name.endswith(("_total", "_created")), s.name
            if family.type == "histogram":
                check_histogram(family.name, family.samples)
            for s in family.samples:
                assert "_milliseconds" not in s.name and "_ms" not in s.name, s.name
        for name in ("flashsale_http_request_duration_seconds", "flashsale_batch_size",
                     "flashsale_batch_apply_duration_seconds",
                     "flashsale_batch_commit_duration_seconds",
                     "flashsale_queue_wait_seconds"):
            assert kinds.get(name) == "histogram", (name, kinds.get(name))
        for name in ("flashsale_http_requests", "flashsale_worker_requests",
                     "flashsale_worker_refusals", "flashsale_dead_letters",
                     "flashsale_reads_held"):
            assert kinds.get(name) == "counter", (name, kinds.get(name))
        products = {s.labels["product_id"] for f in text_string_to_metric_families(text)
                    for s in f.samples if "product_id" in s.labels}
        assert len(products) <= MAX_PRODUCT_SERIES, products


def check_histogram(name: str, samples: list) -> None:
    """Cumulative buckets ending at +Inf, whose value is ``_count``, per label set."""
    series: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    counts: dict[tuple, float] = {}
    for s in samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name == name + "_bucket":
            series[labels].append((float(s.labels["le"]), s.value))
        elif s.name == name + "_count":
            counts[labels] = s.value
    assert series, f"{name}: no buckets"
    for labels, buckets in series.items():
        values = [v for _, v in sorted(buckets)]
        assert values == sorted(values), f"{name}{labels}: not cumulative {buckets}"
        assert max(le for le, _ in buckets) == float("inf"), f"{name}{labels}: no +Inf"
        assert values[-1] == counts[labels], f"{name}{labels}: +Inf != _count"


DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "flashsale.json"


async def test_dashboard_queries_parse_and_use_exposed_metrics(api: Api, tmp_path: Path) -> None:
    """Every panel query of docs/grafana/flashsale.json is valid PromQL (promtool, as a
    recording rule) and names only metrics a gateway exposes."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 12, exprs
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"flashsale:dashboard_query_{n}",
         "expr": expr.replace("$__rate_interval", "1m")} for n, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run([promtool(), "check", "rules", str(path)], text=True,
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    await sell_out(api)
    exposed = {f.name for f in text_string_to_metric_families(await scrape(api, 0))}
    used = {re.sub(r"_(bucket|sum|count|total)$", "", name)
            for expr in exprs for name in re.findall(r"\bflashsale_[a-z_]+", expr)}
    assert used <= exposed, sorted(used - exposed)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("holds per second", "refusals", "latency", "queue depth", "age",
                  "batch size", "commit", "dead letters"):
        assert topic in titles, topic


async def announced_metrics_ports(instance: ServiceInstance) -> list[int]:
    """The ports the running workers said they serve their metrics on, lowest first (each
    worker logs its port once it is listening)."""
    workers = instance.running("worker")
    deadline = time.monotonic() + 30
    while True:
        ports = sorted(int(port) for worker in workers for port in re.findall(
            r"worker metrics on port (\d+)", worker.log_path.read_text()))
        if len(ports) >= len(workers) or time.monotonic() > deadline:
            assert len(ports) == len(workers), ports
            return ports
        await asyncio.sleep(0.1)


async def test_each_worker_serves_its_own_metrics(
        http: aiohttp.ClientSession, service_factory: ServiceFactory) -> None:
    first = free_port()
    instance = service_factory.get("worker-metrics", WORKER_METRICS_PORT=str(first))
    api = Api(http, instance)
    await sell_out(api)
    ports = await announced_metrics_ports(instance)
    assert len(ports) == 2, ports
    # Two workers: one takes the port it was given, the other the next free one after it
    # (first + 1 unless another process of the host holds that one).
    assert ports[0] == first and ports[1] > first, (first, ports)
    texts = []
    for port in ports:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            texts.append(await response.text())
    for text in texts:
        check = subprocess.run([promtool(), "check", "metrics"], input=text, text=True,
                               capture_output=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "# TYPE flashsale_worker_batch_size histogram" in text
        assert 'flashsale_worker_batch_size_bucket{le="+Inf"}' in text
        assert "process_cpu_seconds_total" in text
    rounds = sum(sample(t, "flashsale_worker_batch_size_count") for t in texts)
    holds = sum(sample(t, "flashsale_worker_applied_requests_total", op="hold", outcome="ok")
                for t in texts)
    assert rounds >= 1 and holds == 5, (rounds, holds)
