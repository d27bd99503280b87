"""Servers a test starts for itself: private, disposable, restartable.

Fault tests stop, kill and restart the database (or Redis) under a running service. They
must never touch the shared servers that the other tests, and other people's runs, use.
So they start their own: on a free loopback port, with its data in a temporary directory,
stopped (and its data removed) when the test is done, whether it passed or not.

    from tests.private_servers import PrivateMariaDB, require_mariadb

    @pytest.fixture(scope="module")
    def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMariaDB]:
        binaries = require_mariadb()  # skips, or fails under CI, when MariaDB is missing
        with PrivateMariaDB(tmp_path_factory.mktemp("mariadb"), binaries) as server:
            yield server  # started and answering queries

    def test_something(mariadb: PrivateMariaDB) -> None:
        mariadb.create_database("app")
        url = mariadb.url("app")  # mysql://root@127.0.0.1:<port>/app
        mariadb.restart(crash=True, down_seconds=2.0)  # SIGKILL, 2 s down, start again

Building blocks for other servers (one process each, or several for a cluster):
``ServerProcess`` runs one server process with its output in a log file, ``wait_until``
polls a readiness check, ``find_binaries`` / ``require_binaries`` locate executables.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pymysql

from bench.procs import free_port, tail
from tests.services import missing_service

__all__ = [
    "MariaDBBinaries",
    "PrivateMariaDB",
    "PrivateServerError",
    "ServerProcess",
    "find_binaries",
    "find_mariadb",
    "free_port",
    "require_binaries",
    "require_mariadb",
    "wait_until",
]

LOOPBACK = "127.0.0.1"
STOP_GRACE = 30.0  # seconds a server may take to shut down cleanly before SIGKILL
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; stay clear of it


class PrivateServerError(Exception):
    """A private server could not be set up or did not come up; carries its log's tail."""


# --- building blocks -----------------------------------------------------------------------


def find_binaries(*names: str, search: Sequence[str] = ()) -> dict[str, str] | None:
    """Absolute paths of executables ``names``; None when any of them is missing.

    Each name is looked up on PATH, then in the directories ``search`` (servers often live
    in /usr/sbin, which is not on every user's PATH).
    """
    path = os.pathsep.join([os.environ.get("PATH", ""), *search])
    found = {name: shutil.which(name, path=path) for name in names}
    if any(location is None for location in found.values()):
        return None
    return {name: str(location) for name, location in found.items()}


def require_binaries(*names: str, search: Sequence[str] = ()) -> dict[str, str]:
    """Like ``find_binaries``, but skips the test (fails it under CI) when one is missing."""
    found = find_binaries(*names, search=search)
    if found is None:
        missing = [n for n in names if find_binaries(n, search=search) is None]
        missing_service(f"server binaries not found: {', '.join(missing)}")
    return found


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
    diagnostics: Callable[[], str] | None = None,
) -> None:
    """Poll ``ready()`` until it is true; raise PrivateServerError after ``timeout`` s.

    ``alive`` (e.g. ``process.running``) stops the wait early when the server has died;
    ``diagnostics`` (e.g. ``process.log_tail``) is appended to the error message.
    """
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        problem = None
        if alive is not None and not alive():
            problem = f"{what}: the server exited"
        elif time.monotonic() > deadline:
            problem = f"{what}: not ready within {timeout:.0f} s"
        if problem is not None:
            details = diagnostics() if diagnostics is not None else ""
            raise PrivateServerError(f"{problem}\n{details}".rstrip())
        time.sleep(interval)


_RUNNING: set[ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a test run ends without its teardown: no server outlives pytest."""
    for process in list(_RUNNING):
        process.kill()


class ServerProcess:
    """One server process, in a session of its own, its output appended to ``log_path``.

    It can be started again after it stopped: each start appends to the same log.
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"ServerProcess({self.name!r}, {state})"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last run; None while running or before the first start."""
        return self._popen.poll() if self._popen is not None else None

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Start the process; it must not be running already."""
        if self.running():
            raise PrivateServerError(f"{self.name} is already running (pid {self.pid})")
        self._release()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C is for pytest, which stops us
        )
        _RUNNING.add(self)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``grace`` s; waits for the exit."""
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self._wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._wait(None)
        self._release()

    def kill(self) -> None:
        """SIGKILL, as a crash or an out-of-memory kill would; waits for the exit."""
        if self.running():
            self._signal(signal.SIGKILL)
            self._wait(None)
        self._release()

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log {self.log_path}:\n{tail(self.log_path, lines)}"

    def _signal(self, signum: int) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(signum)

    def _wait(self, timeout: float | None) -> None:
        assert self._popen is not None
        self._popen.wait(timeout=timeout)

    def _release(self) -> None:
        """Close the log file once the process is gone (each start opens it again)."""
        if self._popen is not None and self._popen.poll() is not None:
            _RUNNING.discard(self)
        if self._log is not None and not self.running():
            self._log.close()
            self._log = None


# --- MariaDB -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MariaDBBinaries:
    install_db: str  # mariadb-install-db: creates the system tables of a new data directory
    server: str  # mariadbd


def find_mariadb() -> MariaDBBinaries | None:
    """The MariaDB binaries on this machine, or None."""
    found = find_binaries("mariadb-install-db", "mariadbd", search=("/usr/sbin", "/usr/bin"))
    if found is None:
        return None
    return MariaDBBinaries(install_db=found["mariadb-install-db"], server=found["mariadbd"])


def require_mariadb() -> MariaDBBinaries:
    """The MariaDB binaries; skips the test when missing, and fails it under CI."""
    found = find_mariadb()
    if found is None:
        missing_service(
            "MariaDB server binaries (mariadb-install-db, mariadbd) are not installed"
        )
    return found


class _Started:
    """``with Server(...) as server``: started on entry, closed on exit, even when the
    start fails half-way."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self


class PrivateMariaDB(_Started):
    """A MariaDB server of the test's own, on a free port of 127.0.0.1, user root, no password.

    ``base_dir`` (an empty temporary directory) holds its data directory and its log.
    ``start`` creates the data directory the first time, starts ``mariadbd`` and returns
    once it answers queries; ``stop``/``kill``/``restart`` keep the port and the data, so a
    service configured with ``url()`` finds the same server again. Use it as a context
    manager, or call ``close`` in a ``finally``: it stops the server and deletes its data.
    """

    STARTUP_TIMEOUT = 60.0  # crash recovery included
    INSTALL_TIMEOUT = 120.0
    BIND_ATTEMPTS = 3  # another process may take the free port between choosing and binding

    def __init__(
        self,
        base_dir: Path,
        binaries: MariaDBBinaries | None = None,
        *,
        port: int | None = None,
        server_args: Sequence[str] = (),
    ) -> None:
        """``server_args`` are extra ``mariadbd`` options, e.g. ``["--max-connections=50"]``."""
        found = binaries or find_mariadb()
        if found is None:
            raise PrivateServerError("mariadb-install-db or mariadbd is not installed")
        self.binaries = found
        self.base_dir = base_dir
        self.datadir = base_dir / "data"
        self.log_path = base_dir / "mariadbd.log"
        self.port = port or free_port()
        self._port_given = port is not None
        self.server_args = list(server_args)
        self._socket_dir: Path | None = None
        self._process: ServerProcess | None = None
        self._started_once = False

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"PrivateMariaDB({LOOPBACK}:{self.port}, {state}, {self.datadir})"

    # --- addresses ---

    @property
    def host(self) -> str:
        return LOOPBACK

    def url(self, database: str = "") -> str:
        """``mysql://root@127.0.0.1:<port>/<database>``, as DATABASE_URL takes it."""
        return f"mysql://root@{LOOPBACK}:{self.port}/{database}"

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.Connection[Any]:
        """A pymysql connection (autocommit) as root; ``kwargs`` override the defaults."""
        options: dict[str, Any] = {"host": LOOPBACK, "port": self.port, "user": "root",
                                   "password": "", "connect_timeout": 2, "autocommit": True}
        if database:
            options["database"] = database
        options.update(kwargs)
        return pymysql.connect(**options)

    def query(self, sql: str, args: Any = None, *, database: str | None = None
              ) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh connection; returns its rows."""
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def create_database(self, name: str) -> str:
        """Create database ``name`` (utf8mb4) if absent; returns its ``url``."""
        self.query(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
        return self.url(name)

    # --- life cycle ---

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def answers(self) -> bool:
        """True when the server accepts a connection and runs ``SELECT 1``."""
        try:
            self.query("SELECT 1")
        except pymysql.Error:
            return False
        return True

    def start(self) -> None:
        """Start the server (creating its data directory first if needed); returns when it
        answers queries. Raises PrivateServerError with its log when it does not come up."""
        if self.running():
            raise PrivateServerError(f"{self!r} is already running")
        if not (self.datadir / "mysql").is_dir():
            self._install()
        for attempt in range(1, self.BIND_ATTEMPTS + 1):
            process = self._process = ServerProcess(
                f"mariadbd:{self.port}", self._server_argv(), self.log_path, cwd=self.base_dir)
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            process.start()
            try:
                self.wait_ready(self.STARTUP_TIMEOUT)
            except PrivateServerError:
                process.kill()
                if self._may_move(logged) and attempt < self.BIND_ATTEMPTS:
                    self.port = free_port()
                    continue
                raise
            self._started_once = True
            return

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until the running server answers queries."""
        process = self._process
        wait_until(self.answers, timeout=timeout, what=f"MariaDB on port {self.port}",
                   alive=process.running if process else None, diagnostics=self.log_tail)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """A clean shutdown (SIGTERM): what an operator's restart does. Waits for the exit."""
        if self._process is not None:
            self._process.stop(grace)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-work; InnoDB recovers committed data at next start."""
        if self._process is not None:
            self._process.kill()

    def restart(self, *, crash: bool = False, down_seconds: float = 0.0) -> None:
        """Stop (``crash``: kill) the server, leave it down ``down_seconds``, start it again
        on the same port with the same data; returns once it answers queries."""
        if crash:
            self.kill()
        else:
            self.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start()

    def close(self, *, keep_data: bool = False) -> None:
        """Stop the server (SIGKILL if a clean stop takes too long) and delete its data
        directory (the log stays, for the test report). Safe to call more than once."""
        try:
            self.stop()
        finally:
            if not keep_data:
                shutil.rmtree(self.datadir, ignore_errors=True)
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None


    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log (install and every run), for failure messages."""
        return f"--- MariaDB log {self.log_path}:\n{tail(self.log_path, lines)}"

    # --- internals ---

    def _install(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        argv = [self.binaries.install_db, "--no-defaults", f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal", "--skip-test-db",
                *self._user_args()]
        with self.log_path.open("ab") as log:
            try:
                done = subprocess.run(argv, cwd=self.base_dir, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      timeout=self.INSTALL_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                raise PrivateServerError(
                    f"mariadb-install-db still running after {self.INSTALL_TIMEOUT:.0f} s\n"
                    + self.log_tail()) from None
        if done.returncode != 0:
            raise PrivateServerError(
                f"mariadb-install-db exited with {done.returncode}\n" + self.log_tail())

    def _server_argv(self) -> list[str]:
        return [
            self.binaries.server,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            f"--bind-address={LOOPBACK}",
            f"--socket={self._socket_path()}",
            f"--pid-file={self.datadir / 'mariadbd.pid'}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--innodb-flush-log-at-trx-commit=1",  # a commit is durable when acknowledged
            "--innodb-buffer-pool-size=64M",
            "--max-connections=300",
            *self._user_args(),
            *self.server_args,
        ]

    def _socket_path(self) -> Path:
        path = self.base_dir / "mariadbd.sock"
        if len(str(path)) <= SOCKET_PATH_MAX:
            return path
        if self._socket_dir is None:  # pytest's temporary paths can be long
            self._socket_dir = Path(tempfile.mkdtemp(prefix="mariadb-"))
        return self._socket_dir / "s.sock"

    @staticmethod
    def _user_args() -> list[str]:
        # mariadbd refuses to run as root unless told to; as anyone else it runs as them.
        return ["--user=root"] if os.geteuid() == 0 else []

    def _may_move(self, logged: int) -> bool:
        """The first start failed because the port was taken: try another free port."""
        if self._started_once or self._port_given:
            return False  # a service already knows this port
        with self.log_path.open("rb") as log:
            log.seek(logged)
            return b"Address already in use" in log.read()


# --- Redis Cluster -------------------------------------------------------------------------


class PrivateRedisCluster(_Started):
    """A local Redis Cluster of ``masters`` primaries (no replicas), on free loopback ports.

    Each node is ``redis-server --cluster-enabled yes`` with its data in ``base_dir``; the
    cluster bus port is chosen here (the default, port + 10000, can pass 65535).
    ``redis-cli --cluster create`` joins them. ``url`` names one node, as
    ``REDIS_CLUSTER_URL`` does; ``reshard`` moves slots between nodes while clients run.

        with PrivateRedisCluster(tmp_path / "cluster") as cluster:
            settings = dict(REDIS_CLUSTER_URL=cluster.url)
    """

    STARTUP_TIMEOUT = 30.0

    def __init__(self, base_dir: Path, masters: int = 3) -> None:
        self.binaries = require_binaries("redis-server", "redis-cli")
        self.base_dir = base_dir
        self.ports: list[int] = []
        self.nodes: list[ServerProcess] = []
        self.masters = masters

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.ports[0]}"

    def __exit__(self, *exc: object) -> None:
        self.close()


    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(self.masters):
            port, bus = free_port(), free_port()
            node_dir = self.base_dir / f"node-{port}"
            node_dir.mkdir()
            process = ServerProcess(f"redis-cluster-{port}", [
                self.binaries["redis-server"], "--port", str(port), "--bind", LOOPBACK,
                "--cluster-enabled", "yes", "--cluster-port", str(bus),
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000", "--dir", str(node_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            ], node_dir / "redis.log")
            process.start()
            self.ports.append(port)
            self.nodes.append(process)
        for port, process in zip(self.ports, self.nodes, strict=True):
            wait_until(functools.partial(self._pong, port),
                       timeout=self.STARTUP_TIMEOUT, what=f"redis node {port}",
                       alive=process.running, diagnostics=process.log_tail)
        created = subprocess.run(
            [self.binaries["redis-cli"], "--cluster", "create",
             *[f"{LOOPBACK}:{p}" for p in self.ports], "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        if created.returncode != 0:
            raise PrivateServerError(f"redis-cli --cluster create failed:\n{created.stdout}"
                                     f"\n{created.stderr}")
        wait_until(self._ok, timeout=self.STARTUP_TIMEOUT, what="redis cluster state ok",
                   diagnostics=lambda: self._cli(self.ports[0], "cluster", "info").stdout)

    def _pong(self, port: int) -> bool:
        return self._cli(port, "ping").stdout.strip() == "PONG"

    def _ok(self) -> bool:
        return all("cluster_state:ok" in self._cli(p, "cluster", "info").stdout
                   for p in self.ports)

    def _cli(self, port: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binaries["redis-cli"], "-h", LOOPBACK, "-p", str(port),
                               *args], capture_output=True, text=True, timeout=30,
                              check=False)

    def node_of_slot(self, slot: int) -> int:
        """The port of the primary that serves ``slot`` now."""
        for line in self._cli(self.ports[0], "cluster", "nodes").stdout.splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise PrivateServerError(f"no node serves slot {slot}")

    def node_id(self, port: int) -> str:
        return self._cli(port, "cluster", "myid").stdout.strip()

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate one slot, keys and all, to the node on ``to_port``, as
        ``redis-cli --cluster reshard`` does (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE):
        clients meanwhile get ASK and MOVED redirections."""
        source = self.node_of_slot(slot)
        if source == to_port:
            return
        source_id, target_id = self.node_id(source), self.node_id(to_port)
        self._check(self._cli(to_port, "cluster", "setslot", str(slot), "importing",
                              source_id))
        self._check(self._cli(source, "cluster", "setslot", str(slot), "migrating",
                              target_id))
        while True:
            listed = self._cli(source, "cluster", "getkeysinslot", str(slot), "100")
            names = [k for k in listed.stdout.splitlines() if k]
            if not names:
                break
            self._check(self._cli(source, "migrate", LOOPBACK, str(to_port), "", "0", "5000",
                                  "keys", *names))
        for port in self.ports:
            self._check(self._cli(port, "cluster", "setslot", str(slot), "node", target_id))

    @staticmethod
    def _check(done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0 or done.stdout.startswith(("ERR", "(error)")):
            raise PrivateServerError(f"{done.args}: {done.stdout} {done.stderr}")

    def reshard(self, from_port: int, to_port: int, slots: int) -> None:
        """``redis-cli --cluster reshard``: move ``slots`` slots between two nodes."""
        done = subprocess.run(
            [self.binaries["redis-cli"], "--cluster", "reshard", f"{LOOPBACK}:{from_port}",
             "--cluster-from", self.node_id(from_port), "--cluster-to", self.node_id(to_port),
             "--cluster-slots", str(slots), "--cluster-yes"],
            capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise PrivateServerError(f"reshard failed:\n{done.stdout}\n{done.stderr}")

    def close(self) -> None:
        for process in self.nodes:
            process.kill()
        self.nodes = []
        shutil.rmtree(self.base_dir, ignore_errors=True)
