"""The aiohttp application factory. Nothing connects at import time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import orjson
import redis
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

import models
from flashsale import logs
from flashsale.config import Settings
from flashsale.problems import problem
from gateway import docs, handlers, openapi
from gateway.customers import add_rate_headers
from gateway.errors import problem_middleware, problem_response
from gateway.metrics import CONTENT_TYPE, Metrics, metrics_middleware
from gateway.pipeline import AutoPipeline
from gateway.replies import ReplyHub
from gateway.submit import Scripts
from gateway.typedefs import (
    EXECUTOR,
    FILLING,
    METRICS,
    REDIS,
    REPLIES,
    SCRIPTS,
    SETTINGS,
    SYNC_REDIS,
)
from workers import reads

# Concurrent waiters share these; a blocking pool makes requests queue for a connection
# instead of failing when all are busy.
REDIS_MAX_CONNECTIONS = 256


def create_app(settings: Settings) -> web.Application:
    metrics = Metrics(settings.job_ttl_seconds)
    access = logs.access_log()

    def log_request(request: web.Request, status: int, seconds: float) -> None:
        access(request.method, request.path_qs, status, round(seconds * 1000, 2))

    app = web.Application(client_max_size=handlers.MAX_BODY,
                          middlewares=[metrics_middleware(metrics, log_request),
                                       problem_middleware])
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[FILLING] = {}
    app.on_response_prepare.append(add_rate_headers)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_redis)
    handlers.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/api/openapi.json", openapi_endpoint)
    docs.add_routes(app)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    models.initialize(app[SETTINGS].database_url)
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=16, thread_name_prefix="db")
    yield
    app[EXECUTOR].shutdown(wait=False, cancel_futures=True)
    models.db.close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    url = app[SETTINGS].redis_url
    # A restarting Redis drops connections: retry for about 5 s before answering 503.
    # A retried push may queue a request twice; the drainer applies each request id once.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_MAX_CONNECTIONS, timeout=10, health_check_interval=30,
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    conn = aioredis.Redis(connection_pool=pool)
    app[REDIS] = conn
    app[SYNC_REDIS] = redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    app[SCRIPTS] = Scripts(AutoPipeline(conn))
    app[REPLIES] = ReplyHub(conn)
    await app[REPLIES].start()
    yield
    await app[REPLIES].stop()
    await conn.aclose()
    await pool.disconnect()
    app[SYNC_REDIS].close()


async def healthz(request: web.Request) -> web.Response:
    checks = {}
    try:
        checks["redis"] = bool(await asyncio.wait_for(request.app[REDIS].ping(), 2))
    except Exception:
        checks["redis"] = False
    try:
        checks["database"] = await asyncio.wait_for(
            handlers.in_executor(request, reads.ping), 3)
    except Exception:
        checks["database"] = False
    if all(checks.values()):
        return handlers.json_response({"status": "ok", "checks": checks})
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    return problem_response(problem(503, detail=f"Unreachable: {failing}", checks=checks))


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render(request.app[REDIS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(openapi.document()), content_type="application/json")
