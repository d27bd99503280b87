"""One benchmark invocation: targets found or started, scenarios repeated, results combined."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymysql

from bench import BENCH_VERSION, reference, report, scenarios, wrk
from bench.client import Http, Kind, Target, new_session
from bench.procs import Deployment, Launcher, cpu_seconds, memory_mb
from bench.report import HELLO, LOCKSERVER, SERVICE, scenario_key
from bench.stats import median

ALL_SCENARIOS = ("sellout", "soldout", "read", "many", "reference")
DRIVERS = {"python": scenarios, "wrk": wrk}  # who sends the load: the same four scenarios


@dataclass
class Options:
    """Everything the command line decides (see ``bench.__main__`` for the meaning)."""

    url: str = "http://127.0.0.1:8000"
    admin_token: str | None = None
    target: str = SERVICE
    start: bool = False
    compare: bool = False
    lockserver_url: str | None = None
    lockserver_token: str | None = None
    hello_url: str | None = None
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    clients: tuple[int, ...] = (200,)
    stock: int = 5000
    products: tuple[int, ...] = (1, 10, 100)
    many_stock: int | None = None  # units the many scenario splits (default: stock)
    many_clients: int = 200
    soldout_seconds: float = 5.0
    read_seconds: float = 5.0
    reference_seconds: float = 3.0
    repeat: int = 3
    timeout: float = 300.0
    request_timeout: float = 60.0
    lock_mode: str = "queued"
    webs: int = 2
    workers: int = 2
    mysql_url: str = "mysql://root@127.0.0.1:3306/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_dir: str | None = None
    procfile: str | None = None
    driver: str = "python"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def split_urls(value: str) -> list[str]:
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


class Bench:
    """Runs the chosen scenarios against each target, ``repeat`` times, and reports."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.drive = DRIVERS[options.driver]
        # Created only when something is started here (each deployment makes its folder).
        log_root = Path(options.log_dir or Path(tempfile.gettempdir())
                        / f"flashsale-bench-{secrets.token_hex(4)}")
        self.launcher = Launcher(options.mysql_url, options.redis_url, log_root,
                                 options.procfile)
        self.targets: dict[str, Target] = {}
        self.deployments: dict[str, Deployment] = {}
        self.results: dict[str, list[dict[str, dict[str, Any]]]] = {}
        self.reference_runs: list[dict[str, Any]] = []
        self.footprints: list[dict[str, float]] = []

    # --- set-up ---

    def prepare(self) -> None:
        """Find or start every target this invocation needs."""
        o = self.options
        main_urls = split_urls(o.url)
        if o.start:
            log(f"starting {o.target} (logs in {self.launcher.log_root})")
            deployment = (self.launcher.service(o.webs, o.workers) if o.target == SERVICE
                          else self.launcher.lockserver(o.webs, o.lock_mode))
            self._adopt(deployment)
        else:
            self.targets[o.target] = Target(o.target, main_urls, o.admin_token)
        if o.compare and o.target == SERVICE:
            if o.lockserver_url:
                self.targets[LOCKSERVER] = Target(LOCKSERVER, split_urls(o.lockserver_url),
                                                  o.lockserver_token)
            else:
                log("starting the lock-per-request peer")
                self._adopt(self.launcher.lockserver(o.webs, o.lock_mode))
        if "read" in o.scenarios and (o.compare or o.hello_url):
            if o.hello_url:
                self.targets[HELLO] = Target(HELLO, split_urls(o.hello_url))
            else:
                log("starting the bare aiohttp baseline")
                self._adopt(self.launcher.hello(o.webs))

    def _adopt(self, deployment: Deployment) -> None:
        self.deployments[deployment.target.name] = deployment
        self.targets[deployment.target.name] = deployment.target

    def close(self) -> None:
        self.launcher.close()

    # --- running ---

    async def run(self) -> dict[str, Any]:
        o = self.options
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        session = new_session(o.request_timeout)
        try:
            order = [name for name in (SERVICE, LOCKSERVER) if name in self.targets]
            for n in range(o.repeat):
                # Alternate who goes first, so slow drift on the machine favours nobody.
                for name in order if n % 2 == 0 else order[::-1]:
                    log(f"run {n + 1}/{o.repeat}: {name}")
                    http = Http(session, self.targets[name], o.request_timeout)
                    self.results.setdefault(name, []).append(await self._one_target(http))
                if HELLO in self.targets:
                    log(f"run {n + 1}/{o.repeat}: hello")
                    http = Http(session, self.targets[HELLO], o.request_timeout)
                    self.results.setdefault(HELLO, []).append(await self._reads(http, 1))
                if "reference" in o.scenarios:
                    log(f"run {n + 1}/{o.repeat}: database reference")
                    self.reference_runs.append(await asyncio.to_thread(
                        reference.measure, o.mysql_url, o.reference_seconds))
        finally:
            await session.close()
        return self.summary(started_at)

    async def _one_target(self, http: Http) -> dict[str, dict[str, Any]]:
        o, found = self.options, {}
        product_id: int | None = None
        for clients in o.clients:
            if "sellout" in o.scenarios:
                result = await self._measured(http, self.drive.sellout(
                    http, o.stock, clients, o.timeout))
                found[scenario_key("sellout", clients)] = result
                product_id = result["product_id"]
            if "soldout" in o.scenarios:
                if product_id is None:
                    product_id = await self._sold_out_product(http)
                found[scenario_key("soldout", clients)] = await self._soldout(
                    http, product_id, clients)
        if "read" in o.scenarios:
            found.update(await self._reads(http, product_id))
        if "many" in o.scenarios:
            for k in o.products:
                found[scenario_key("many", o.many_clients, k)] = await self._measured(
                    http, self.drive.many(http, k, o.many_stock or o.stock, o.many_clients,
                                         o.timeout))
        return found

    async def _reads(self, http: Http, product_id: int | None) -> dict[str, dict[str, Any]]:
        if product_id is None:
            product_id = await http.create_product(self.options.stock, "read")
        found = {}
        for clients in self.options.clients:
            found[scenario_key("read", clients)] = await self._measured(http, self.drive.read(
                http, product_id, clients, self.options.read_seconds))
        return found

    async def _measured(self, http: Http,
                        scenario: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """Run a scenario, adding the CPU it cost this client and (if started here) the target.

        When the client is near 100 % of a core it, not the target, set the pace; the
        target's CPU per request still compares targets fairly then.
        """
        deployment = self.deployments.get(http.target.name)
        pgids = [] if deployment is None else [p.popen.pid for p in deployment.procs
                                               if not p.one_off]
        gateways = set(http.target.gateway_pids)
        wall0, own0 = time.perf_counter(), own_cpu_seconds()
        before = {pgid: cpu_seconds(pgid) for pgid in pgids}
        result = await scenario
        wall = time.perf_counter() - wall0
        result["client_cpu_pct"] = round(100 * (own_cpu_seconds() - own0) / wall, 1)
        if pgids:
            used = {pgid: cpu_seconds(pgid) - before[pgid] for pgid in pgids}
            server = sum(used.values())
            gateway = sum(s for pgid, s in used.items() if pgid in gateways)
            requests = max(1, int(result.get("requests") or 0))
            result["server_cpu_pct"] = round(100 * server / wall, 1)
            result["server_cpu_ms_per_request"] = round(1000 * server / requests, 3)
            # The gateways' share alone (the rest: workers and scheduler).
            result["gateway_cpu_ms_per_request"] = round(1000 * gateway / requests, 3)
        return result

    async def _sold_out_product(self, http: Http) -> int:
        """A product of one unit, held once: sold out without a full sellout."""
        product_id = await http.create_product(1, "soldout")
        outcome = await http.hold(scenarios.hold_body(product_id))
        if outcome.kind != Kind.OK:
            raise RuntimeError(f"could not take the only unit of {product_id}: {outcome}")
        await asyncio.sleep(scenarios.CACHE_SETTLE_S)
        return product_id

    async def _soldout(self, http: Http, product_id: int, clients: int) -> dict[str, Any]:
        """The soldout scenario; on a started service, also what it cost workers and DB."""
        workers = self.deployments.get(http.target.name)
        watch = http.target.name == SERVICE and workers is not None
        before = self._footprint(http.target) if watch else {}
        t0 = time.perf_counter()
        result = await self._measured(http, self.drive.soldout(
            http, product_id, clients, self.options.soldout_seconds))
        if watch:
            after = self._footprint(http.target)
            self.footprints.append({"seconds": round(time.perf_counter() - t0, 2),
                                    **{k: round(after[k] - before[k], 2) for k in before}})
        return result

    def _footprint(self, target: Target) -> dict[str, float]:
        found = {"worker_cpu_s": sum(cpu_seconds(pid) for pid in target.worker_pids)}
        with contextlib.suppress(pymysql.Error):
            found["db_statements_server_wide"] = float(_questions(self.options.mysql_url))
        return found

    # --- results ---

    def summary(self, started_at: str) -> dict[str, Any]:
        o = self.options
        targets = {name: report.combine_target(runs) for name, runs in self.results.items()}
        memory = {name: [memory_mb(pid) for pid in d.target.gateway_pids]
                  for name, d in self.deployments.items()}
        server: dict[str, str] = {}
        if self.reference_runs:
            with contextlib.suppress(pymysql.Error):
                server = reference.server_settings(o.mysql_url)
        footprint = ({k: median([f[k] for f in self.footprints])
                      for k in self.footprints[0]} if self.footprints else {})
        summary: dict[str, Any] = {
            "bench_version": BENCH_VERSION, "started_at": started_at, "repeat": o.repeat,
            "settings": {"clients": list(o.clients), "stock": o.stock,
                         "products": list(o.products), "many_clients": o.many_clients,
                         "many_stock": o.many_stock or o.stock,
                         "soldout_seconds": o.soldout_seconds, "read_seconds": o.read_seconds,
                         "started": sorted(self.deployments), "webs": o.webs,
                         "lock_mode": o.lock_mode,
                         "workers": o.workers, "scenarios": list(o.scenarios),
                         "driver": o.driver},
            "urls": {name: t.urls for name, t in self.targets.items()},
            "targets": targets,
            "reference": report.combine_reference(self.reference_runs),
            "reference_runs": self.reference_runs,
            "database": server,
            "memory": memory,
            "soldout_footprint": footprint,
            "runs": self.results,
        }
        summary["exited"] = {f"{name}/{proc.name}": proc.popen.returncode
                             for name, d in self.deployments.items() for proc in d.procs
                             if not proc.one_off and not proc.alive()}
        summary["goals"] = [g.as_dict() for g in report.goals(targets, memory)]
        summary["correct"] = all_correct(targets)
        summary["log_dir"] = str(self.launcher.log_root) if self.deployments else None
        return summary


def own_cpu_seconds() -> float:
    """This process's CPU and that of its children waited for (wrk, once it has exited;
    the started targets only count once stopped, after every measurement)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def all_correct(targets: dict[str, dict[str, Any]]) -> bool:
    """No oversold, leaked or duplicate unit anywhere, and no grant on a sold-out product."""
    for results in targets.values():
        for result in results.values():
            if result.get("correct") is False:
                return False
            if int(result.get("granted_after_soldout") or 0):
                return False
    return True


def _questions(mysql_url: str) -> int:
    conn = pymysql.connect(**reference.connect_kwargs(mysql_url, ""))
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
            row = cur.fetchone()
    finally:
        conn.close()
    return int(row[1]) if row else 0
