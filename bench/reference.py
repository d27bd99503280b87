"""What the database alone can do: holds on one row, one commit each or 100 per commit.

Measured with pymysql on one connection, in a scratch database dropped afterwards, so
the HTTP numbers can be read against what the same MariaDB does on the same machine now.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql

BATCH = 100
MAX_HOLDS = 1_000_000  # a bound on each loop besides its time

SCHEMA = (
    """CREATE TABLE ref_products (
        id INT PRIMARY KEY, stock BIGINT NOT NULL, reserved BIGINT NOT NULL,
        CHECK (reserved >= 0), CHECK (reserved <= stock)) ENGINE=InnoDB""",
    """CREATE TABLE ref_holds (
        id VARCHAR(64) PRIMARY KEY, product_id INT NOT NULL, qty INT NOT NULL,
        created_at BIGINT NOT NULL, INDEX (product_id)) ENGINE=InnoDB""",
)
RESERVE = ("UPDATE ref_products SET reserved = reserved + %s "
           "WHERE id = %s AND stock - reserved >= %s")
# All placeholders: pymysql's executemany only folds rows into one INSERT this way.
INSERT = "INSERT INTO ref_holds (id, product_id, qty, created_at) VALUES (%s, %s, %s, %s)"


def connect_kwargs(url: str, database: str | None = None) -> dict[str, Any]:
    """pymysql.connect() arguments for ``mysql://user:pass@host:port/db``."""
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1", "port": parts.port or 3306,
        "user": unquote(parts.username or "root"), "password": unquote(parts.password or ""),
        "connect_timeout": 5, "charset": "utf8mb4",
    }
    name = database if database is not None else parts.path.lstrip("/")
    if name:
        kwargs["database"] = name
    return kwargs


def server_settings(url: str) -> dict[str, str]:
    """The durability settings that decide the per-commit cost."""
    conn = pymysql.connect(**connect_kwargs(url, ""))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            version = str(cur.fetchone()[0])
            cur.execute("SHOW VARIABLES WHERE Variable_name IN "
                        "('innodb_flush_log_at_trx_commit', 'sync_binlog', 'log_bin')")
            found = {str(k): str(v) for k, v in cur.fetchall()}
    finally:
        conn.close()
    return {"version": version, **found}


def measure(url: str, seconds: float) -> dict[str, Any]:
    """Holds/s with one commit per hold and with ``BATCH`` holds per commit."""
    database = f"bench_ref_{secrets.token_hex(6)}"
    admin = pymysql.connect(**connect_kwargs(url, ""), autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        conn = pymysql.connect(**connect_kwargs(url, database), autocommit=False)
        try:
            with conn.cursor() as cur:
                for statement in SCHEMA:
                    cur.execute(statement)
                cur.execute("INSERT INTO ref_products VALUES (1, %s, 0), (2, %s, 0)",
                            (MAX_HOLDS * BATCH, MAX_HOLDS * BATCH))
            conn.commit()
            single = _one_per_commit(conn, 1, seconds)
            batched = _batched(conn, 2, seconds)
        finally:
            conn.close()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE `{database}`")
    finally:
        admin.close()
    return {"seconds": seconds, "commit_per_hold_holds_per_s": single,
            f"batch_{BATCH}_holds_per_s": batched}


def _one_per_commit(conn: pymysql.connections.Connection, product: int,
                    seconds: float) -> float:
    """Conditional UPDATE + INSERT + COMMIT for each hold."""
    prefix, done = secrets.token_hex(4), 0
    start = time.perf_counter()
    end = start + seconds
    with conn.cursor() as cur:
        while done < MAX_HOLDS and time.perf_counter() < end:
            if cur.execute(RESERVE, (1, product, 1)) != 1:
                raise RuntimeError("reference product ran out of stock")
            cur.execute(INSERT, (f"r{prefix}{done}", product, 1, time.time_ns() // 1_000_000))
            conn.commit()
            done += 1
    return round(done / (time.perf_counter() - start), 1)


def _batched(conn: pymysql.connections.Connection, product: int, seconds: float) -> float:
    """One conditional UPDATE for ``BATCH`` units + one multi-row INSERT + COMMIT."""
    prefix, done = secrets.token_hex(4), 0
    start = time.perf_counter()
    end = start + seconds
    with conn.cursor() as cur:
        while done < MAX_HOLDS and time.perf_counter() < end:
            if cur.execute(RESERVE, (BATCH, product, BATCH)) != 1:
                raise RuntimeError("reference product ran out of stock")
            now = time.time_ns() // 1_000_000
            cur.executemany(INSERT, [(f"b{prefix}{done + i}", product, 1, now)
                                     for i in range(BATCH)])
            conn.commit()
            done += BATCH
    return round(done / (time.perf_counter() - start), 1)
