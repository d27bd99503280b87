"""Deployments the benchmark starts itself: the service from its Procfile, and its peers.

Each deployment gets a fresh MySQL database and an empty Redis logical database, runs its
processes in their own process groups with output to log files, and is torn down
(processes stopped, database dropped, Redis database flushed) when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import pymysql
import redis
from honcho.environ import parse_procfile

from bench.client import Target
from bench.reference import connect_kwargs

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout bench/ lives in
HEALTHY_WITHIN_S = 40.0
RELEASE_WITHIN_S = 120.0
STOP_GRACE_S = 5.0
# The e2e harness takes Redis databases 8..15; the bench looks in 1..7 first.
REDIS_DB_CHOICES = (*range(1, 8), *range(8, 16))
CONFIG_VARS = ("PORT", "DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "WEBHOOK_SECRET",
               "HOLD_TTL_SECONDS", "ORDER_PAYMENT_TTL_SECONDS", "DEFAULT_WAIT_SECONDS",
               "MAX_QTY_PER_HOLD")
# Holds must outlive a whole run (or sold-out products would come back to life).
SERVICE_ENV = {"HOLD_TTL_SECONDS": "3600", "ORDER_PAYMENT_TTL_SECONDS": "3600"}


class StartError(Exception):
    """A deployment did not come up; the message carries the tail of its logs."""


def find_procfile(given: str | None) -> Path:
    """``--procfile``, else ./Procfile, else the one next to this checkout's bench/."""
    for candidate in (given, "Procfile", REPO_ROOT / "Procfile"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise StartError("no Procfile found: run from the project directory or pass --procfile")


def read_procfile(path: Path) -> dict[str, str]:
    """Process type -> command line, parsed as honcho (which `flashsale run` uses) does."""
    return dict(parse_procfile(path.read_text()).processes)


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a process log, for failure reports."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(url: str, database: str) -> str:
    """The same MySQL server URL, naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


def with_redis_db(url: str, index: int) -> str:
    """The same Redis server URL, naming another logical database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{index}", parts.query, ""))


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in kB, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found


def group_members(pgid: int) -> list[int]:
    """The pids of a process group (the Procfile line's shell and what it runs)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by a process group."""
    ticks = 0
    for pid in group_members(pgid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_mb(pgid: int) -> dict[str, float | int]:
    """Resident and peak resident memory of the largest process of a group, in MB."""
    best: dict[str, int] = {}
    pid = pgid
    for member in group_members(pgid):
        found = status_kb(member)
        if found.get("VmRSS", 0) > best.get("VmRSS", 0):
            best, pid = found, member
    return {"pid": pid, "rss_mb": round(best.get("VmRSS", 0) / 1024, 1),
            "peak_rss_mb": round(best.get("VmHWM", 0) / 1024, 1)}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    one_off: bool = False  # a release / migrate step, expected to exit

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)


@dataclass
class Deployment:
    """Processes of one target plus what to clean up after them."""

    target: Target
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    database: str | None = None
    redis_db: int | None = None
    cwd: Path = REPO_ROOT

    def spawn(self, name: str, command: str | list[str], env: dict[str, str],
              one_off: bool = False) -> Proc:
        """A Procfile line (a string, run by the shell as honcho does) or an argv list."""
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(command, shell=isinstance(command, str), cwd=self.cwd,
                                 env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log_path, log_file, one_off)
        self.procs.append(proc)
        return proc

    def diagnostics(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.popen.pid}, "
                         f"{'running' if p.alive() else f'exit {p.popen.returncode}'})\n"
                         f"{p.tail()}" for p in self.procs)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        pending = list(self.target.urls)
        while pending:
            dead = [p.name for p in self.procs if not p.alive() and not p.one_off]
            if dead:
                raise StartError(f"{', '.join(dead)} exited while starting\n"
                                 + self.diagnostics())
            pending = [url for url in pending if not healthy(url)]
            if pending and time.monotonic() > deadline:
                raise StartError(f"no 200 from {pending} within {HEALTHY_WITHIN_S:.0f} s\n"
                                 + self.diagnostics())
            if pending:
                time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()
            proc.log_file.close()
        self.procs = []


def healthy(base_url: str) -> bool:
    """Whether ``GET /healthz`` answers 200."""
    try:
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


class Launcher:
    """Starts deployments on the local MariaDB and Redis and tears them all down."""

    def __init__(self, mysql_url: str, redis_url: str, log_root: Path,
                 procfile: str | None = None) -> None:
        self.mysql_url = mysql_url
        self.redis_url = redis_url
        self.log_root = log_root
        self.procfile = procfile
        self.deployments: list[Deployment] = []

    def _base_env(self, database: str, redis_db: int, data_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in CONFIG_VARS and not k.startswith("FLASHSALE_")}
        venv_bin = str(Path(sys.executable).parent)
        env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   DATABASE_URL=with_database(self.mysql_url, database),
                   REDIS_URL=with_redis_db(self.redis_url, redis_db),
                   ADMIN_TOKEN=secrets.token_urlsafe(18), FLASHSALE_DATA_DIR=str(data_dir),
                   PYTHONPATH=str(REPO_ROOT))
        return env

    def _new(self, name: str, stores: bool = True) -> tuple[Deployment, dict[str, str]]:
        """A deployment with (when ``stores``) its own fresh database and Redis database."""
        log_dir = self.log_root / name
        log_dir.mkdir(parents=True, exist_ok=True)
        database = f"bench_{name}_{secrets.token_hex(4)}" if stores else None
        redis_db = self._claim_redis_db() if stores else None
        deployment = Deployment(Target(name, []), log_dir, database=database,
                                redis_db=redis_db)
        self.deployments.append(deployment)
        if database is not None:
            self._create_database(database)
        env = self._base_env(database or "unused", redis_db or 0, log_dir / "data")
        deployment.target.admin_token = env["ADMIN_TOKEN"]
        return deployment, env

    def service(self, webs: int, workers: int, schedulers: int = 1) -> Deployment:
        """The Procfile's release once, then web x ``webs``, worker x ``workers``, scheduler."""
        procfile = find_procfile(self.procfile)
        commands = read_procfile(procfile)
        deployment, env = self._new("service")
        deployment.cwd = procfile.parent
        env.update(SERVICE_ENV)
        release = deployment.spawn("release", commands["release"], env, one_off=True)
        try:
            code = release.popen.wait(timeout=RELEASE_WITHIN_S)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            raise StartError(f"release ended with {code}\n{deployment.diagnostics()}")
        for n in range(webs):
            port = free_port()
            proc = deployment.spawn(f"web.{n + 1}", commands["web"], {**env, "PORT": str(port)})
            deployment.target.urls.append(f"http://127.0.0.1:{port}")
            deployment.target.gateway_pids.append(proc.popen.pid)
        for n in range(workers):
            proc = deployment.spawn(f"worker.{n + 1}", commands["worker"], env)
            deployment.target.worker_pids.append(proc.popen.pid)
        for n in range(schedulers):
            deployment.spawn(f"scheduler.{n + 1}", commands["scheduler"], env)
        deployment.wait_healthy()
        return deployment

    def lockserver(self, webs: int, mode: str = "queued") -> Deployment:
        """The lock-per-request peer: its tables, then ``webs`` server processes."""
        deployment, env = self._new("lockserver")
        env.update(SERVICE_ENV, LOCK_MODE=mode)
        exe = [sys.executable, "-m", "bench.lockserver"]
        migrate = deployment.spawn("migrate", [*exe, "--migrate"], env, one_off=True)
        if migrate.popen.wait(timeout=RELEASE_WITHIN_S) != 0:
            raise StartError(f"lockserver --migrate failed\n{deployment.diagnostics()}")
        self._spawn_servers(deployment, exe, env, webs)
        return deployment

    def hello(self, webs: int) -> Deployment:
        """The bare aiohttp baseline: no database, no Redis."""
        deployment, env = self._new("hello", stores=False)
        self._spawn_servers(deployment, [sys.executable, "-m", "bench.hello"], env, webs)
        return deployment

    def _spawn_servers(self, deployment: Deployment, exe: list[str], env: dict[str, str],
                       webs: int) -> None:
        for n in range(webs):
            port = free_port()
            proc = deployment.spawn(f"web.{n + 1}", [*exe, "--port", str(port)], env)
            deployment.target.urls.append(f"http://127.0.0.1:{port}")
            deployment.target.gateway_pids.append(proc.popen.pid)
        deployment.wait_healthy()

    def close(self) -> None:
        """Stop every deployment, drop its database, flush its Redis database."""
        while self.deployments:
            deployment = self.deployments.pop()
            deployment.stop()
            if deployment.redis_db is not None:
                with contextlib.suppress(redis.RedisError), self._redis(
                        deployment.redis_db) as client:
                    client.flushdb()
            if deployment.database is not None:
                with contextlib.suppress(pymysql.Error):
                    self._sql(f"DROP DATABASE IF EXISTS `{deployment.database}`")

    def _redis(self, index: int) -> redis.Redis:
        return redis.Redis.from_url(with_redis_db(self.redis_url, index))

    def _claim_redis_db(self) -> int:
        taken = {d.redis_db for d in self.deployments if d.redis_db is not None}
        for index in REDIS_DB_CHOICES:
            if index in taken:
                continue
            with self._redis(index) as client:
                if client.dbsize() == 0:
                    return index
        raise StartError("no empty Redis database among 1..15")

    def _create_database(self, database: str) -> None:
        self._sql(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")

    def _sql(self, statement: str) -> None:
        conn = pymysql.connect(**connect_kwargs(self.mysql_url, ""), autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()
