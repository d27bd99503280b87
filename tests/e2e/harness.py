"""Black-box harness: runs the service from its Procfile and talks to it over HTTP only.

A ``ServiceInstance`` is one deployment: a fresh MySQL database, its own Redis logical
database, ``release`` run once, then ``web`` x2, ``worker`` x2 and ``scheduler`` x1 started
from the Procfile command lines exactly as an operator (or honcho) would. ``ServiceFactory``
hands out instances, reusing one per distinct configuration. ``Api`` is an HTTP client that
spreads requests over both gateways and follows 202 responses through ``/api/jobs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import pymysql
import pytest
import redis
from multidict import CIMultiDict
from redis.cluster import RedisCluster

from bench import procs
from bench.procs import free_port, tail
from tests import services
from tests.random_refs import random_database_name, random_product_name

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCFILE = REPO_ROOT / "Procfile"

STARTUP_TIMEOUT = 30.0  # every web answering /healthz 200
RELEASE_TIMEOUT = 90.0  # the schema migration
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL
REDIS_DB_INDEXES = range(8, 16)
# Marks a Redis database as an instance's, with the pid of the test process that claimed
# it: two factories of one session (e2e and fuzz), or two test runs on one machine, never
# share a database, and a database left behind by a killed run is taken back.
CLAIM_KEY = "e2e:claimed-by"
WEBS, WORKERS, SCHEDULERS = 2, 2, 1

# API.md: the product cache reflects a committed operation within 1 s; 1 s of slack for a
# busy two-core machine running a dozen service processes next to the tests.
CACHE_DELAY = 2.0
JOB_TIMEOUT = 30.0
WAIT = "wait=30"  # Prefer value that makes write requests answer with their final result

DEFAULT_ENV = {
    "HOLD_TTL_SECONDS": "120",
    "ORDER_PAYMENT_TTL_SECONDS": "900",
    "DEFAULT_WAIT_SECONDS": "5",
    "MAX_QTY_PER_HOLD": "10",
}
# Never inherited from the developer's shell: every instance states its whole configuration.
CONFIG_VARS = (
    "PORT",
    "DATABASE_URL",
    "REDIS_URL",
    "ADMIN_TOKEN",
    "WEBHOOK_SECRET",
    "CUSTOMER_JWT_SECRET",
    "MAX_QTY_PER_CUSTOMER",
    "RATE_LIMIT_PER_MINUTE",
    "REDIS_CLUSTER_URL",
    *DEFAULT_ENV,
)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class ServiceStartError(Exception):
    """An instance could not be brought up; the message carries the processes' output."""


def read_procfile(path: Path | None = None) -> dict[str, str]:
    """Process type -> command line, as honcho reads it."""
    return procs.read_procfile(path or PROCFILE)


def venv_bin() -> Path:
    """The directory of the installed ``flashsale`` console script."""
    local = REPO_ROOT / ".venv" / "bin"
    return local if local.is_dir() else Path(sys.executable).parent


# --- processes -------------------------------------------------------------------------


@dataclass
class Process:
    """One Procfile process, in its own process group so signals reach all of it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> bool:
        """True when the process ended within ``timeout`` seconds."""
        try:
            self.popen.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        """Kill whatever is left of the group and release the log file."""
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self.log_file.close()

    def cpu_seconds(self) -> float:
        """CPU time used so far by every process of the group (Linux)."""
        return procs.cpu_seconds(self.popen.pid)

    def describe(self, lines: int = 60) -> str:
        state = "running" if self.alive() else f"exited with {self.popen.returncode}"
        header = f"--- {self.name} (pid {self.pid}, {state}) {self.log_path}"
        return f"{header}\n{tail(self.log_path, lines)}"


def stop_processes(processes: list[Process], grace: float = STOP_GRACE) -> None:
    """SIGTERM everything at once, SIGKILL what is still running after ``grace`` seconds."""
    for process in processes:
        if process.alive():
            process.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        process.wait(deadline - time.monotonic())
    for process in processes:
        process.close()


# --- one deployment ----------------------------------------------------------------------


@dataclass
class ServiceInstance:
    """One deployment of the service: its environment, processes and gateway URLs."""

    name: str
    env: dict[str, str]
    log_dir: Path
    commands: dict[str, str] = field(default_factory=read_procfile)
    processes: list[Process] = field(default_factory=list)
    web_urls: list[str] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)

    @property
    def admin_token(self) -> str:
        return self.env["ADMIN_TOKEN"]

    @property
    def webhook_secret(self) -> str | None:
        return self.env.get("WEBHOOK_SECRET")

    def __repr__(self) -> str:
        return f"ServiceInstance({self.name!r}, {self.web_urls})"

    @contextlib.contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        """SIGSTOP every running process of ``kind`` (e.g. the workers, so that what is
        pushed meanwhile stays queued), SIGCONT on the way out."""
        processes = self.running(kind)
        for process in processes:
            process.signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for process in processes:
                process.signal(signal.SIGCONT)

    def data_redis(self) -> Any:
        """A client of the instance's data plane: its Redis Cluster, else its Redis."""
        if self.env.get("REDIS_CLUSTER_URL"):
            return RedisCluster.from_url(self.env["REDIS_CLUSTER_URL"])
        return redis.Redis.from_url(self.env["REDIS_URL"])

    def key(self, name: str) -> str:
        """``name`` (made by workers.keys in this process) as the instance spells it."""
        prefix = self.env.get("REDIS_KEY_PREFIX")
        return f"{prefix}:{name.partition(':')[2]}" if prefix else name

    def setting(self, name: str) -> int:
        """An integer setting of this instance, e.g. ``setting("HOLD_TTL_SECONDS")``."""
        return int(self.env[name])

    def spawn(self, kind: str, extra_env: Mapping[str, str] | None = None) -> Process:
        """Start the Procfile's ``kind`` command line, output captured to a log file."""
        if kind not in self.commands:
            raise ServiceStartError(f"the Procfile has no {kind!r} process: {self.commands}")
        number = self._counts[kind] = self._counts.get(kind, 0) + 1
        name = f"{kind}.{number}"
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        env = {**self.env, **(extra_env or {})}
        popen = subprocess.Popen(
            self.commands[kind],
            shell=True,  # a Procfile line is a shell command line, as honcho runs it
            cwd=PROCFILE.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = Process(name, popen, log_path, log_file)
        self.processes.append(process)
        return process

    def run_command(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run an operator command (e.g. ``flashsale refunds``) against this instance."""
        return subprocess.run(
            command,
            shell=True,
            cwd=PROCFILE.parent,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def running(self, kind: str) -> list[Process]:
        return [p for p in self.processes if p.name.startswith(f"{kind}.") and p.alive()]

    def start(self) -> None:
        """release once, then the long-running processes; returns when every web is healthy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        release = self.spawn("release")
        if not release.wait(RELEASE_TIMEOUT):
            raise ServiceStartError(
                f"release still running after {RELEASE_TIMEOUT:.0f} s\n" + self.diagnostics()
            )
        if release.popen.returncode != 0:
            raise ServiceStartError(
                f"release exited with {release.popen.returncode}\n" + self.diagnostics()
            )
        for _ in range(WEBS):
            port = free_port()
            self.spawn("web", {"PORT": str(port)})
            self.web_urls.append(f"http://127.0.0.1:{port}")
        for _ in range(WORKERS):
            self.spawn("worker")
        for _ in range(SCHEDULERS):
            self.spawn("scheduler")
        self.wait_healthy()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.web_urls)
        while pending:
            exited = [
                p for p in self.processes if not p.name.startswith("release.") and not p.alive()
            ]
            if exited:
                names = ", ".join(p.name for p in exited)
                raise ServiceStartError(f"{names} exited during startup\n" + self.diagnostics())
            pending = [url for url in pending if not procs.healthy(url)]
            if pending and time.monotonic() > deadline:
                raise ServiceStartError(
                    f"no 200 from {', '.join(u + '/healthz' for u in pending)} "
                    f"within {timeout:.0f} s\n" + self.diagnostics()
                )
            if pending:
                time.sleep(0.2)

    def stop(self) -> None:
        processes, self.processes = self.processes, []
        stop_processes(processes)

    def diagnostics(self, lines: int = 60) -> str:
        """The tail of every process's output, for failure messages."""
        header = f"=== service instance {self.name!r}, logs in {self.log_dir}"
        return "\n".join([header, *(p.describe(lines) for p in self.processes)])


# --- instances on demand ---------------------------------------------------------------


@dataclass
class _Resources:
    database: str
    redis_db: int


class ServiceFactory:
    """Hands out running instances; one per distinct (label, environment overrides)."""

    def __init__(self, mysql_url: str, redis_url: str, log_root: Path,
                 cluster_url: str | None = None) -> None:
        self.mysql_url = mysql_url
        self.redis_url = redis_url
        self.log_root = log_root
        # With a Redis Cluster, every instance's data plane lives there under its own
        # REDIS_KEY_PREFIX (the control plane stays on a database of redis_url).
        self.cluster_url = cluster_url
        self._instances: dict[tuple[Any, ...], ServiceInstance] = {}
        self._resources: dict[str, _Resources] = {}
        self._failures: dict[tuple[Any, ...], str] = {}

    def get(self, label: str = "default", **overrides: str) -> ServiceInstance:
        """A running instance with ``overrides`` on top of ``DEFAULT_ENV``; started once.

        A startup failure fails the calling test with the processes' output, and every
        later test that asks for the same instance at once, without another attempt.
        """
        key = (label, tuple(sorted(overrides.items())))
        if key not in self._instances and key not in self._failures:
            try:
                self._instances[key] = self._start(label, overrides)
            except ServiceStartError as exc:
                self._failures[key] = str(exc)
        if key in self._failures:
            pytest.fail(self._failures[key], pytrace=False)
        return self._instances[key]

    def discard(self, instance: ServiceInstance) -> None:
        """Stop an instance before the session ends (e.g. one a fault test has damaged)."""
        for key, known in list(self._instances.items()):
            if known is instance:
                del self._instances[key]
        self._teardown(instance)

    def close(self) -> None:
        """Stop every instance and drop its database, even when one teardown fails."""
        errors: list[Exception] = []
        while self._instances:
            _, instance = self._instances.popitem()
            try:
                self._teardown(instance)
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def _start(self, label: str, overrides: Mapping[str, str]) -> ServiceInstance:
        database = random_database_name("fs_e2e")
        redis_db = self._claim_redis_db()
        name = f"{label}-{database.removeprefix('fs_e2e_')}"
        log_dir = self.log_root / name
        if self.cluster_url is not None:
            overrides = {"REDIS_CLUSTER_URL": self.cluster_url,
                         "REDIS_KEY_PREFIX": "e2e-" + database.removeprefix("fs_e2e_")[:24],
                         **overrides}
        env = instance_env(
            database_url=procs.with_database(self.mysql_url, database),
            redis_url=procs.with_redis_db(self.redis_url, redis_db),
            data_dir=log_dir / "data",
            overrides=overrides,
        )
        instance = ServiceInstance(name=name, env=env, log_dir=log_dir)
        self._resources[name] = _Resources(database, redis_db)
        try:
            self._create_database(database)
            self._flush_redis(redis_db)
            instance.start()
        except BaseException:
            self._teardown(instance)
            raise
        return instance

    def _teardown(self, instance: ServiceInstance) -> None:
        instance.stop()
        resources = self._resources.pop(instance.name, None)
        if resources is not None:
            self._flush_redis(resources.redis_db, keep_claim=False)
            self._drop_database(resources.database)

    def _claim_redis_db(self) -> int:
        """An index in 8..15 that no live test process has claimed (CLAIM_KEY), emptied
        and claimed for this one."""
        taken = {r.redis_db for r in self._resources.values()}
        for index in REDIS_DB_INDEXES:
            if index in taken:
                continue
            with redis.Redis.from_url(procs.with_redis_db(self.redis_url, index)) as client:
                owner = client.get(CLAIM_KEY)
                if owner is not None and _process_alive(int(owner)):
                    continue  # another factory's (the fuzz tier's, another run's)
                client.flushdb()  # what a killed run left behind
                if client.set(CLAIM_KEY, os.getpid(), nx=True):
                    return index
        raise ServiceStartError("all Redis databases 8..15 are claimed by live test processes")

    def _flush_redis(self, index: int, keep_claim: bool = True) -> None:
        with redis.Redis.from_url(procs.with_redis_db(self.redis_url, index)) as client:
            client.flushdb()
            if keep_claim:
                client.set(CLAIM_KEY, os.getpid())

    def _mysql(self) -> pymysql.connections.Connection:
        kwargs = services.mysql_connect_kwargs(self.mysql_url)
        kwargs.pop("database", None)
        return pymysql.connect(**kwargs)

    def _create_database(self, database: str) -> None:
        self._sql(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")

    def _drop_database(self, database: str) -> None:
        self._sql(f"DROP DATABASE IF EXISTS `{database}`")

    def _sql(self, statement: str) -> None:
        connection = self._mysql()
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()


def instance_env(
    *, database_url: str, redis_url: str, data_dir: Path, overrides: Mapping[str, str]
) -> dict[str, str]:
    """The full process environment of one instance (``PORT`` is added per web process)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in CONFIG_VARS and not k.startswith("FLASHSALE_")
    }
    env.update(DEFAULT_ENV)
    env.update(
        PATH=f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        ADMIN_TOKEN=secrets.token_urlsafe(24),
        FLASHSALE_DATA_DIR=str(data_dir),  # keeps any local file out of the work tree
    )
    env.update(overrides)
    return env


# --- HTTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One HTTP response, read in full. For a followed job, the job's ``result``."""

    status: int
    body: Any
    headers: CIMultiDict[str]
    raw: bytes = b""
    from_job: bool = False  # a job's result: a status and a body, no headers

    @property
    def media_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def __repr__(self) -> str:
        shown = self.raw[:500] if self.raw else self.body
        return f"Reply({self.status}, {self.media_type or 'job result'}, {shown!r})"

    __str__ = __repr__


class Api:
    """HTTP client of one instance; alternates between its gateways (client round robin)."""

    def __init__(self, session: aiohttp.ClientSession, service: ServiceInstance) -> None:
        self.session = session
        self.service = service
        self._next = 0

    def base_url(self, gateway: int | None = None) -> str:
        urls = self.service.web_urls
        if gateway is None:
            gateway, self._next = self._next, self._next + 1
        return urls[gateway % len(urls)]

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        gateway: int | None = None,
    ) -> Reply:
        """Send ``body`` as JSON, or ``data`` as given (then set Content-Type yourself)."""
        sent = CIMultiDict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        url = self.base_url(gateway) + path
        async with self.session.request(method, url, data=data, headers=sent) as response:
            raw = await response.read()
            received = CIMultiDict(response.headers)
        parsed: Any = None
        media_type = received.get("Content-Type", "").split(";")[0].strip().lower()
        if raw and (media_type == "application/json" or media_type.endswith("+json")):
            parsed = json.loads(raw)
        return Reply(response.status, parsed, received, raw)

    async def get(self, path: str, *, gateway: int | None = None) -> Reply:
        return await self.request("GET", path, gateway=gateway)

    async def post(
        self,
        path: str,
        body: Any,
        *,
        prefer: str | None = WAIT,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        gateway: int | None = None,
    ) -> Reply:
        """POST JSON; ``prefer`` and ``key`` become ``Prefer`` and ``Idempotency-Key``."""
        sent = dict(headers or {})
        if prefer is not None:
            sent["Prefer"] = prefer
        if key is not None:
            sent["Idempotency-Key"] = key
        return await self.request("POST", path, body=body, headers=sent, gateway=gateway)

    # --- jobs ---

    async def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        """Poll ``GET /api/jobs/{id}`` until ``done``; returns the job document."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            reply = await self.get(f"/api/jobs/{job_id}")
            assert reply.status == 200, f"GET /api/jobs/{job_id}: {reply}"
            job: dict[str, Any] = reply.body
            assert job["status"] in ("queued", "processing", "done"), job
            if job["status"] == "done":
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not done after {timeout} s: {job}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def settle(self, reply: Reply, timeout: float = JOB_TIMEOUT) -> Reply:
        """The final outcome: ``reply`` itself, or for a 202 the job's result once done."""
        if reply.status != 202 or "job_id" not in (reply.body or {}):
            return reply
        job = await self.wait_job(reply.body["job_id"], timeout)
        result = job["result"]
        return Reply(result["status"], result["body"], CIMultiDict(), from_job=True)

    # --- admin ---

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.service.admin_token}"}

    async def create_product(
        self,
        *,
        stock: int = 10,
        price_cents: int = 1999,
        currency: str = "USD",
        name: str | None = None,
    ) -> dict[str, Any]:
        """Create a product through the admin API (following a 202); returns the product."""
        body = {
            "name": name or random_product_name(),
            "price_cents": price_cents,
            "currency": currency,
            "stock": stock,
        }
        reply = await self.settle(
            await self.post("/api/admin/products", body, headers=self.admin_headers())
        )
        assert reply.status == 201, f"create product: {reply}"
        product: dict[str, Any] = reply.body
        assert isinstance(product["id"], int) and product["id"] > 0, product
        return product

    # --- products ---

    async def product(self, product_id: int) -> dict[str, Any]:
        reply = await self.get(f"/api/products/{product_id}")
        assert reply.status == 200, f"GET product {product_id}: {reply}"
        product: dict[str, Any] = reply.body
        return product

    async def wait_product(
        self, product_id: int, timeout: float = CACHE_DELAY, **expected: int
    ) -> dict[str, Any]:
        """Poll the product until its fields equal ``expected`` (e.g. ``available=3``)."""
        deadline = time.monotonic() + timeout
        while True:
            product = await self.product(product_id)
            if all(product.get(k) == v for k, v in expected.items()):
                return product
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"product {product_id} still {product} after {timeout} s, want {expected}"
                )
            await asyncio.sleep(0.1)

    # --- holds, orders, webhooks ---

    async def hold(
        self, product_id: int, qty: int = 1, *, prefer: str | None = WAIT, key: str | None = None
    ) -> Reply:
        body = {"product_id": product_id, "qty": qty}
        return await self.post("/api/holds", body, prefer=prefer, key=key)

    async def new_hold(self, product_id: int, qty: int = 1) -> dict[str, Any]:
        """A hold that must be granted; returns its body."""
        reply = await self.settle(await self.hold(product_id, qty))
        assert reply.status == 201, f"hold on product {product_id}: {reply}"
        hold: dict[str, Any] = reply.body
        return hold

    async def order(
        self, hold_id: str, *, prefer: str | None = WAIT, key: str | None = None
    ) -> Reply:
        return await self.post("/api/orders", {"hold_id": hold_id}, prefer=prefer, key=key)

    async def new_order(self, product_id: int, qty: int = 1) -> dict[str, Any]:
        """Hold then order ``qty`` units; returns the order body."""
        hold = await self.new_hold(product_id, qty)
        reply = await self.settle(await self.order(hold["hold_id"]))
        assert reply.status == 201, f"order for hold {hold['hold_id']}: {reply}"
        order: dict[str, Any] = reply.body
        return order

    async def webhook(
        self,
        order_id: str,
        status: str,
        *,
        key: str,
        extra: Mapping[str, Any] | None = None,
        sign: bool = True,
        timestamp: int | None = None,
        secret: str | None = None,
        signature: str | None = None,
    ) -> Reply:
        """POST a payment webhook, signed with the instance's secret when it has one."""
        raw = json.dumps(
            {"idempotency_key": key, "order_id": order_id, "status": status, **(extra or {})}
        ).encode()
        headers = {"Content-Type": "application/json"}
        secret = secret or self.service.webhook_secret
        if signature is not None:
            headers["X-Webhook-Signature"] = signature
        elif sign and secret:
            headers["X-Webhook-Signature"] = sign_webhook(secret, raw, timestamp)
        return await self.request("POST", "/api/payments/webhook", data=raw, headers=headers)


def sign_webhook(secret: str, raw_body: bytes, timestamp: int | None = None) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`` (API.md)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + raw_body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


# --- assertions --------------------------------------------------------------------------

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def parse_timestamp(value: str) -> float:
    """Unix time of an RFC 3339 UTC timestamp such as ``2026-11-24T10:00:00.123Z``."""
    assert isinstance(value, str) and RFC3339_UTC.match(value), f"not RFC 3339 UTC: {value!r}"
    return datetime.fromisoformat(value).timestamp()


def assert_problem(reply: Reply, status: int, title: str | None = None) -> dict[str, Any]:
    """``reply`` is an RFC 9457 problem document with ``status`` (and ``title``)."""
    assert reply.status == status, f"want {status}, got {reply}"
    if not reply.from_job:
        assert reply.media_type == "application/problem+json", (
            f"Content-Type {reply.headers.get('Content-Type')!r} for {reply}"
        )
    problem = reply.body
    assert isinstance(problem, dict), reply
    for member in ("type", "title", "detail"):
        assert isinstance(problem.get(member), str), f"problem without {member!r}: {problem}"
    assert problem.get("status") == status, problem
    if title is not None:
        assert problem["title"] == title, problem
    return problem


def assert_errors_name(problem: Mapping[str, Any], *fields: str) -> None:
    """The problem's ``errors`` member names every one of ``fields``.

    API.md does not fix the shape of ``errors`` (an object keyed by field, as marshmallow
    gives, or a list of entries), so this only asks that each field is named in it.
    """
    assert "errors" in problem, f"422 without errors: {problem}"
    errors = problem["errors"]
    assert errors, f"empty errors: {problem}"
    text = json.dumps(errors)
    for name in fields:
        assert name in text, f"{name!r} not named in errors {errors}"


def assert_location(reply: Reply, path: str) -> None:
    """``Location`` is ``path`` (an absolute URL with that path is accepted too)."""
    location = reply.headers.get("Location")
    assert location is not None, f"no Location header: {reply}"
    assert location == path or (location.startswith("http") and location.endswith(path)), (
        f"Location {location!r}, want {path!r}"
    )


def mutate_id(value: str) -> str:
    """Another id of the same shape: the last character changed."""
    last = "0" if value[-1] != "0" else "1"
    return value[:-1] + last
