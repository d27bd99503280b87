"""Where the real MariaDB and Redis of the integration and e2e tiers are, and whether they answer.

Both tiers need the two services. When one is missing, a developer's run skips those tests
with a reason, but a CI run (``CI`` set to anything but ``""``, ``0``, ``false`` or ``no``)
fails them: a green CI must never mean "nothing was tested".

    from tests.services import require_mysql, require_redis

    @pytest.fixture(scope="session")
    def mysql_url() -> str:
        return require_mysql()

The locations can be moved with ``TEST_MYSQL_URL`` and ``TEST_REDIS_URL``.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import pymysql
import pytest
import redis

# URL helpers shared with the benchmark's deployments; the integration tier uses them.
from bench.procs import with_database as with_database
from bench.procs import with_redis_db as with_redis_db

MYSQL_URL_ENV = "TEST_MYSQL_URL"
REDIS_URL_ENV = "TEST_REDIS_URL"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_SECONDS = 3


def in_ci() -> bool:
    """True when running under CI, where a missing service is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def mysql_url() -> str:
    """URL of the MariaDB test server (``TEST_MYSQL_URL``, default root@127.0.0.1:3306/test)."""
    return os.environ.get(MYSQL_URL_ENV) or DEFAULT_MYSQL_URL


def redis_url() -> str:
    """URL of the Redis test server (``TEST_REDIS_URL``, default 127.0.0.1:6379 db 0)."""
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def mysql_connect_kwargs(url: str) -> dict[str, Any]:
    """pymysql.connect() arguments for a ``mysql://user:pass@host:port/db`` URL."""
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "autocommit": True,
    }
    database = parts.path.lstrip("/")
    if database:
        kwargs["database"] = database
    return kwargs


def mysql_problem(url: str) -> str | None:
    """Why the MySQL server at ``url`` can't be used, or None when it answers a query."""
    try:
        connection = pymysql.connect(**mysql_connect_kwargs(url))
    except pymysql.Error as exc:
        return f"MariaDB at {url} is unreachable: {exc}"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except pymysql.Error as exc:
        return f"MariaDB at {url} does not answer queries: {exc}"
    finally:
        connection.close()
    return None


def redis_problem(url: str) -> str | None:
    """Why the Redis server at ``url`` can't be used, or None when it answers PING."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"Redis at {url} is unreachable: {exc}"
    return None


def missing_service(reason: str) -> NoReturn:
    """Fail the test under CI, skip it elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing service is a failure)", pytrace=False)
    pytest.skip(f"{reason} (skipped; with CI=true this fails)")


def require_mysql() -> str:
    """The MySQL test server URL; skips (or fails under CI) when it is not reachable."""
    url = mysql_url()
    problem = mysql_problem(url)
    if problem:
        missing_service(problem)
    return url


def require_redis() -> str:
    """The Redis test server URL; skips (or fails under CI) when it is not reachable."""
    url = redis_url()
    problem = redis_problem(url)
    if problem:
        missing_service(problem)
    return url
