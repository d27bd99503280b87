"""The two Redis planes, and which one each key lives on.

- The **control plane** (``REDIS_URL``, one standalone Redis: Sentinel or a managed
  primary in production): rq's queues and registries, rq-scheduler, the ready list, the
  drainers' heartbeats and the shared counters. rq and rq-scheduler need it: they use
  multi-key transactions and scripts across keys that a Redis Cluster would put in
  different slots (rq issues 1048, 1942, 2050).
- The **data plane**: every key of one product under its hash tag ``{p:<id>}`` (queue,
  in-flight batch, lease, wake flag, product cache, job results, control flags), the
  Idempotency-Keys, the rate-limit windows, and the reply channels. With
  ``REDIS_CLUSTER_URL`` it lives on a Redis Cluster, reached through redis-py's own
  cluster clients (they route by slot, follow MOVED/ASK and retry TRYAGAIN); every
  script touches the keys of one slot only. Without it, both planes are the one Redis of
  ``REDIS_URL`` and everything is exactly as on a single Redis.

Replies travel on one channel per gateway process, one message per gateway for all the
products of a drain round, sent after the round's FINISH calls: on one Redis by PUBLISH
in the same pipeline; on a cluster, where a script may only touch its own slot, by
SPUBLISH (sharded pub/sub, Redis 7), so that only the node that owns the gateway's
channel carries them.

This module is what the gateway, the workers and the scheduler ask for the planes and
for the wake-up of a product; key names are in ``workers.keys``, scripts in
``workers.protocol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from rq import Queue

from flashsale.config import Settings
from workers import keys
from workers.protocol import READY

# A drainer whose heartbeat is older than this is counted as gone (killed).
HEARTBEAT_MS = 30_000
DRAIN_JOB_TIMEOUT = 3600
# READY's keys: all on the control plane.
READY_KEYS = [keys.READY, keys.DRAIN_JOBS, keys.DRAINERS, keys.DRAIN_WORKERS, keys.WOKEN]
# A restarting Redis (or a failing-over cluster node) drops connections: retry about 5 s.
RETRY_ERRORS = [redis.ConnectionError, redis.TimeoutError]


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), 8)


def _async_retry() -> AsyncRetry:
    return AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 8)


@dataclass(frozen=True)
class Planes:
    """The synchronous clients of both planes (workers, scheduler, CLI)."""

    control: redis.Redis
    data: Any  # redis.Redis, or redis.cluster.RedisCluster on a cluster
    clustered: bool = False

    @classmethod
    def connect(cls, settings: Settings, control: redis.Redis | None = None) -> Planes:
        """The planes of ``settings``; ``control`` reuses an existing client (rq's)."""
        control = control or redis.Redis.from_url(settings.redis_url, retry=_retry(),
                                                  retry_on_error=RETRY_ERRORS)
        if not settings.redis_cluster_url:
            return cls(control, control)
        data = RedisCluster.from_url(settings.redis_cluster_url, retry=_retry(),
                                     retry_on_error=RETRY_ERRORS)
        return cls(control, data, clustered=True)

    def close(self) -> None:
        self.control.close()
        if self.data is not self.control:
            self.data.close()


@dataclass(frozen=True)
class AsyncPlanes:
    """The asyncio clients of both planes (the gateway)."""

    control: aioredis.Redis
    data: Any  # redis.asyncio.Redis, or redis.asyncio.cluster.RedisCluster
    clustered: bool = False

    @classmethod
    def connect(cls, settings: Settings, max_connections: int) -> AsyncPlanes:
        # A blocking pool makes requests queue for a connection instead of failing
        # when all are busy.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=max_connections, timeout=10,
            health_check_interval=30, retry=_async_retry(), retry_on_error=RETRY_ERRORS)
        control = aioredis.Redis(connection_pool=pool)
        if not settings.redis_cluster_url:
            return cls(control, control)
        data = AsyncRedisCluster.from_url(
            settings.redis_cluster_url, max_connections=max_connections,
            retry=_async_retry(), retry_on_error=RETRY_ERRORS)
        return cls(control, data, clustered=True)

    async def open(self) -> None:
        """Learn the cluster's slots before the first command (pub/sub needs them)."""
        if self.clustered:
            await self.data.initialize()

    async def close(self) -> None:
        await self.control.aclose()
        await self.control.connection_pool.disconnect()
        if self.data is not self.control:
            await self.data.aclose()


def push_ready_call(push_keys: list[str], push_args: list[Any], product_id: int
                    ) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of PUSH_READY: PUSH's, then READY's (workers.protocol)."""
    return [*push_keys, *READY_KEYS], [*push_args, product_id, HEARTBEAT_MS]


def as_planes(conn: Planes | redis.Redis) -> Planes:
    """``conn`` as planes: a single Redis client is both (the one-Redis deployment)."""
    return conn if isinstance(conn, Planes) else Planes(conn, conn)


def wake(planes: Planes | redis.Redis, product_id: int | None) -> bool:
    """Put the product on the ready list and make sure a drainer will come for it.

    The caller holds the product's wake flag (set by the push script), so this runs once
    per drain cycle of the product, not once per request. A drain job is enqueued only
    when no job waits to start and fewer drainers work than there are workers: busy
    drainers take ready products as they go. With None, only the last part. Returns
    whether it enqueued a drain job.
    """
    control = as_planes(planes).control
    pid = "" if product_id is None else product_id
    if not control.register_script(READY)(keys=READY_KEYS, args=[pid, HEARTBEAT_MS]):
        return False
    enqueue_drain_job(control)
    return True


def enqueue_drain_job(control: redis.Redis) -> None:
    Queue(keys.DRAIN_QUEUE, connection=control).enqueue(
        "workers.drain.drain", job_timeout=DRAIN_JOB_TIMEOUT, result_ttl=0,
        failure_ttl=24 * 3600, description="drain ready products")


def evalsha(pipe: Any, sha: str, script_keys: Sequence[str], args: list[Any]) -> None:
    """Queue a script call on a pipeline. Through execute_command, because redis-py's
    cluster pipeline refuses the ``evalsha`` method while it routes the command itself
    by its keys (all in one slot) like any other."""
    pipe.execute_command("EVALSHA", sha, len(script_keys), *script_keys, *args)
