"""The aiohttp application factory. Nothing connects at import time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web

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
    CONTROL,
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
from workers.planes import AsyncPlanes, Planes

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
    """The two Redis planes (workers.planes); on one Redis they are the same client.

    A restarting Redis drops connections: calls retry for about 5 s before the request
    is answered 503. A push retried after it ran finds its job key and queues nothing
    more (PUSH's 'once' flag); the drainer applies each request id once in any case.
    """
    settings = app[SETTINGS]
    planes = AsyncPlanes.connect(settings, REDIS_MAX_CONNECTIONS)
    await planes.open()
    app[REDIS], app[CONTROL] = planes.data, planes.control
    app[SYNC_REDIS] = Planes.connect(settings).control
    data_pipe = AutoPipeline(planes.data)
    control_pipe = data_pipe if not planes.clustered else AutoPipeline(planes.control)
    app[SCRIPTS] = Scripts(data_pipe, control_pipe)
    app[REPLIES] = ReplyHub(planes.data, sharded=planes.clustered, pipe=data_pipe)
    await app[REPLIES].start()
    yield
    await app[REPLIES].stop()
    for pipe in {data_pipe, control_pipe}:
        await pipe.aclose()
    await planes.close()
    app[SYNC_REDIS].close()


async def healthz(request: web.Request) -> web.Response:
    checks = {}
    try:
        pings = [request.app[CONTROL].ping()]
        if request.app[REDIS] is not request.app[CONTROL]:
            pings.append(request.app[REDIS].ping())
        checks["redis"] = all(await asyncio.wait_for(asyncio.gather(*pings), 2))
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
    body = await request.app[METRICS].render(request.app[CONTROL], request.app[REDIS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(openapi.document()), content_type="application/json")
