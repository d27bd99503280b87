"""The application's typed keys: every handle a handler needs, created at startup."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from aiohttp import web

from flashsale.config import Settings

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.replies import ReplyHub
    from gateway.submit import Scripts

SETTINGS = web.AppKey("settings", Settings)
# The data plane (workers.planes): product keys, jobs, idempotency keys, replies. A
# redis.asyncio.Redis, or a redis.asyncio.cluster.RedisCluster with REDIS_CLUSTER_URL.
REDIS: web.AppKey[Any] = web.AppKey("redis")
# The control plane: the ready list, rq, the shared counters.
CONTROL = web.AppKey("control", aioredis.Redis)
# rq is synchronous: drain jobs are enqueued through this client, from the executor.
SYNC_REDIS = web.AppKey("sync_redis", redis.Redis)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
REPLIES: web.AppKey[ReplyHub] = web.AppKey("replies")
SCRIPTS: web.AppKey[Scripts] = web.AppKey("scripts")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
# Product cache fills under way: concurrent misses on one product share one database read.
FILLING: web.AppKey[dict[int, asyncio.Future[dict[str, Any] | None]]] = web.AppKey("filling")
