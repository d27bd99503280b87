"""The seed's design, written carefully: the lock-per-request peer the service must beat.

Each hold takes a Redis lock on its product, then in a worker thread runs
``SELECT ... FOR UPDATE`` + a conditional UPDATE + an INSERT + one COMMIT, and releases
the lock. It speaks the same contract shape as the service for what the benchmark uses:
``POST /api/admin/products``, ``POST /api/holds`` (201 / 409 / 404 / 422, never 202),
``GET /api/products/{id}`` (read from the database) and ``GET /healthz``.

"Carefully" means: blocking pymysql calls run in a thread pool with one connection per
thread, never on the event loop; within one process the requests for a product queue on
an ``asyncio.Lock`` so only one of them at a time polls Redis for the product's lock
(instead of every waiter spinning; ``LOCK_MODE=spin`` restores the spinning, jittered
1-10 ms); the lock is released with a compare-and-delete.
Holds are not expired here (the benchmark never waits that long).

    DATABASE_URL=mysql://root@127.0.0.1:3306/db REDIS_URL=redis://127.0.0.1:6379/3 \\
        python -m bench.lockserver --port 8100 [--migrate]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import random
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pymysql
import redis.asyncio as aioredis
from aiohttp import web

from bench.reference import connect_kwargs
from flashsale import memory

LOCK_TTL_MS = 5000
LOCK_POLL_S = 0.001  # how often the head of a process's queue retries the Redis lock
SPIN_POLL_S = (0.001, 0.010)  # without the local queue: every waiter retries, with jitter
DB_THREADS = 16
HOLD_TTL_MS = int(os.environ.get("HOLD_TTL_SECONDS", "120")) * 1000
LOCK_WAIT_S = float(os.environ.get("LOCK_WAIT_SECONDS", "60"))
# LOCK_MODE=spin drops the in-process queue: every waiting request polls Redis itself,
# as the seed did. The default, "queued", is the stronger peer.
SPIN = os.environ.get("LOCK_MODE", "queued") == "spin"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ls_products (
        id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL,
        price_cents BIGINT NOT NULL, currency CHAR(3) NOT NULL,
        stock BIGINT NOT NULL, reserved BIGINT NOT NULL DEFAULT 0,
        CHECK (stock >= 0), CHECK (reserved >= 0), CHECK (reserved <= stock)) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS ls_holds (
        id VARCHAR(64) PRIMARY KEY, product_id INT NOT NULL, qty INT NOT NULL,
        status VARCHAR(16) NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
        INDEX (product_id), FOREIGN KEY (product_id) REFERENCES ls_products (id)
    ) ENGINE=InnoDB""",
)
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

DATABASE_URL = web.AppKey("database_url", str)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
REDIS = web.AppKey("redis", aioredis.Redis)
LOCAL_LOCKS = web.AppKey("local_locks", defaultdict)
ADMIN_TOKEN = web.AppKey("admin_token", str)


class Unavailable(Exception):
    """The product's lock could not be had in time."""


# --- the database, in worker threads -----------------------------------------------------

_local = threading.local()


def connection(url: str) -> pymysql.connections.Connection:
    """This thread's connection, opened on first use and after a failure."""
    conn: pymysql.connections.Connection | None = getattr(_local, "conn", None)
    if conn is None or not conn.open:
        conn = pymysql.connect(**connect_kwargs(url), autocommit=False, read_timeout=30,
                               write_timeout=30)
        _local.conn = conn
    return conn


def in_transaction(url: str, work: Any, *args: Any) -> Any:
    """Run ``work(cursor, *args)`` in one transaction; a failed connection is dropped."""
    conn = connection(url)
    try:
        conn.begin()
        with conn.cursor() as cur:
            result = work(cur, *args)
        conn.commit()
        return result
    except BaseException:
        with contextlib.suppress(pymysql.Error):
            conn.rollback()
        if not conn.open:
            _local.conn = None
        raise


def migrate(url: str) -> None:
    conn = pymysql.connect(**connect_kwargs(url), autocommit=True)
    try:
        with conn.cursor() as cur:
            for statement in SCHEMA:
                cur.execute(statement)
    finally:
        conn.close()


def take_hold(cur: Any, product_id: int, qty: int, hold_id: str) -> tuple[int, Any]:
    """The seed's hold: lock the row, check, reserve, record the hold."""
    cur.execute("SELECT stock, reserved FROM ls_products WHERE id = %s FOR UPDATE",
                (product_id,))
    row = cur.fetchone()
    if row is None:
        return 404, None
    available = int(row[0]) - int(row[1])
    if available < qty:
        return 409, available
    cur.execute("UPDATE ls_products SET reserved = reserved + %s "
                "WHERE id = %s AND stock - reserved >= %s", (qty, product_id, qty))
    now = time.time_ns() // 1_000_000
    cur.execute("INSERT INTO ls_holds (id, product_id, qty, status, created_at, expires_at) "
                "VALUES (%s, %s, %s, 'active', %s, %s)",
                (hold_id, product_id, qty, now, now + HOLD_TTL_MS))
    return 201, now + HOLD_TTL_MS


def read_product(cur: Any, product_id: int) -> dict[str, Any] | None:
    cur.execute("SELECT id, name, price_cents, currency, stock, reserved FROM ls_products "
                "WHERE id = %s", (product_id,))
    row = cur.fetchone()
    if row is None:
        return None
    return {"id": row[0], "name": row[1], "price_cents": row[2], "currency": row[3],
            "stock": row[4], "available": max(0, row[4] - row[5])}


def insert_product(cur: Any, body: dict[str, Any]) -> dict[str, Any]:
    cur.execute("INSERT INTO ls_products (name, price_cents, currency, stock, reserved) "
                "VALUES (%s, %s, %s, %s, 0)",
                (body["name"], body["price_cents"], body["currency"], body["stock"]))
    return {"id": cur.lastrowid, "name": body["name"], "price_cents": body["price_cents"],
            "currency": body["currency"], "stock": body["stock"], "available": body["stock"]}


# --- the Redis lock ----------------------------------------------------------------------

@contextlib.asynccontextmanager
async def product_lock(app: web.Application, product_id: int) -> AsyncIterator[None]:
    """This process's queue for the product (unless spinning), then its Redis lock."""
    deadline = time.monotonic() + LOCK_WAIT_S
    local: asyncio.Lock = app[LOCAL_LOCKS][product_id]
    if not SPIN:
        try:
            await asyncio.wait_for(local.acquire(), LOCK_WAIT_S)
        except TimeoutError:
            raise Unavailable from None
    try:
        conn, key, token = app[REDIS], f"ls:lock:{product_id}", secrets.token_hex(8)
        while not await conn.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise Unavailable
            await asyncio.sleep(random.uniform(*SPIN_POLL_S) if SPIN else LOCK_POLL_S)
        try:
            yield
        finally:
            await conn.eval(RELEASE, 1, key, token)
    finally:
        if not SPIN:
            local.release()


# --- HTTP --------------------------------------------------------------------------------

def json_response(body: Any, status: int = 200) -> web.Response:
    content_type = "application/problem+json" if status >= 400 else "application/json"
    return web.Response(body=orjson.dumps(body), status=status, content_type=content_type)


def problem(status: int, title: str, **extra: Any) -> web.Response:
    return json_response({"type": "about:blank", "title": title, "status": status, **extra},
                         status)


async def db(request: web.Request, work: Any, *args: Any) -> Any:
    app = request.app
    return await asyncio.get_running_loop().run_in_executor(
        app[EXECUTOR], in_transaction, app[DATABASE_URL], work, *args)


async def create_hold(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
        product_id, qty = int(body["product_id"]), int(body["qty"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return problem(422, "Invalid request")
    if product_id < 1 or not 1 <= qty <= 10:
        return problem(422, "Invalid request")
    hold_id = f"hold_{product_id}_{secrets.token_hex(10)}"
    try:
        async with product_lock(request.app, product_id):
            status, detail = await db(request, take_hold, product_id, qty, hold_id)
    except Unavailable:
        return problem(503, "Product busy")
    if status == 404:
        return problem(404, "Product not found")
    if status == 409:
        return problem(409, "Insufficient stock", available=detail)
    return json_response({"hold_id": hold_id, "product_id": product_id, "qty": qty,
                          "status": "active", "expires_at": detail}, 201)


async def get_product(request: web.Request) -> web.Response:
    raw = request.match_info["product_id"]
    view = await db(request, read_product, int(raw)) if raw.isdigit() else None
    return json_response(view) if view else problem(404, "Product not found")


async def create_product(request: web.Request) -> web.Response:
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), request.app[ADMIN_TOKEN].encode()):
        return problem(401, "Unauthorized")
    try:
        body = orjson.loads(await request.read())
        view = await db(request, insert_product, body)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return problem(422, "Invalid request")
    return json_response(view, 201)


async def healthz(request: web.Request) -> web.Response:
    await request.app[REDIS].ping()
    return json_response({"status": "ok"})


async def _resources(app: web.Application) -> AsyncIterator[None]:
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="db")
    app[REDIS] = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
        os.environ["REDIS_URL"], max_connections=64, timeout=10))
    yield
    await app[REDIS].aclose()
    app[EXECUTOR].shutdown(wait=False, cancel_futures=True)


def create_app(database_url: str, admin_token: str) -> web.Application:
    app = web.Application()
    app[DATABASE_URL] = database_url
    app[ADMIN_TOKEN] = admin_token
    app[LOCAL_LOCKS] = defaultdict(asyncio.Lock)
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/api/holds", create_hold)
    app.router.add_get("/api/products/{product_id}", get_product)
    app.router.add_post("/api/admin/products", create_product)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(_settle)
    return app


async def _settle(app: web.Application) -> None:
    """The service's processes' garbage-collector settings (flashsale.memory), here too:
    the peer is measured on the same runtime as the service (uvloop likewise)."""
    memory.settle()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lockserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8100")))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--migrate", action="store_true", help="create the tables and exit")
    args = parser.parse_args(argv)
    database_url = os.environ["DATABASE_URL"]
    if args.migrate:
        migrate(database_url)
        return
    import uvloop  # the service's gateway runs on uvloop too

    uvloop.install()
    web.run_app(create_app(database_url, os.environ.get("ADMIN_TOKEN", "")), host=args.host,
                port=args.port, access_log=None, backlog=4096, print=None)


if __name__ == "__main__":
    main()
