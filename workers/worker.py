"""The rq worker: a SimpleWorker (no fork per job) that owns its database connection."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq import SimpleWorker

from flashsale import memory
from models import db
from workers import keys, stats

log = logging.getLogger("flashsale.worker")


class DrainWorker(SimpleWorker):
    """Runs drain and maintenance jobs in-process.

    Forking per job (rq's default) costs milliseconds a job; a drain job is cheap to
    start and may run for long, so it runs in the worker itself. The database connection
    is kept between jobs and dropped after a failed one, so the next job starts afresh
    (a restarted database costs one failed job, whose batch the next drainer re-applies).
    """

    def handle_job_failure(self, job: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        if not db.is_closed():
            db.close()
        return super().handle_job_failure(job, queue, *args, **kwargs)


METRICS_PORTS_TRIED = 32


def serve_metrics(first_port: int) -> int:
    """This worker's own ``/metrics`` (workers.stats.LOCAL), on the first free port from
    ``first_port`` on: several workers of one host each take the next one."""
    from prometheus_client import start_http_server

    for port in range(first_port, first_port + METRICS_PORTS_TRIED):
        try:
            start_http_server(port, registry=stats.LOCAL.registry)
        except OSError:
            continue
        log.warning("worker metrics on port %d", port)
        return port
    raise SystemExit(f"no free port for the worker's metrics from {first_port} on")


def work(conn: redis.Redis, burst: bool = False) -> None:
    """Drain queues until stopped; a lost Redis means a new worker once it is back.

    rq retries a lost connection while it waits for jobs, but not while it records a
    job's end; the job's batch is safe in Redis and is re-applied by the next drainer.
    """
    memory.settle()  # start-up's objects out of the collector's way (flashsale.memory)
    while True:
        # Maintenance first: sweeps are short, and drain jobs hand over every few seconds.
        worker = DrainWorker([keys.MAINTENANCE_QUEUE, keys.DRAIN_QUEUE], connection=conn)
        try:
            worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("worker lost Redis (%s); starting again in 1 s", exc)
            time.sleep(1)
