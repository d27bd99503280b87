"""The rq-scheduler process: periodic jobs that survive a second scheduler and a Redis restart."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq_scheduler import Scheduler

from workers import keys

log = logging.getLogger("flashsale.scheduler")


class PeriodicScheduler(Scheduler):
    """A Scheduler that keeps its periodic jobs registered.

    The jobs have fixed ids, so a second scheduler re-registers rather than doubles them
    (and rq-scheduler's lock lets one scheduler enqueue at a time). A Redis that restarts
    without persistence forgets scheduled jobs; each tick puts missing ones back.
    """

    def __init__(self, periodic: list[tuple[str, str, int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.periodic = periodic

    def ensure_periodic(self) -> None:
        for job_id, func, every in self.periodic:
            if job_id in self:
                continue
            # A repeated job must outlive its interval, or rq-scheduler drops it.
            self.schedule(scheduled_time=datetime.now(UTC), func=func, id=job_id,
                          interval=every, repeat=None, result_ttl=max(600, 2 * every),
                          timeout=60, queue_name=keys.MAINTENANCE_QUEUE)
            log.info("scheduled %s every %ss", func, every)

    def enqueue_jobs(self) -> Any:
        self.ensure_periodic()
        return super().enqueue_jobs()


def run(conn: redis.Redis, periodic: list[tuple[str, str, int]], interval: int) -> None:
    """Run until stopped, starting over with a new registration after losing Redis."""
    while True:
        try:
            scheduler = PeriodicScheduler(periodic, queue_name=keys.MAINTENANCE_QUEUE,
                                          connection=conn, interval=interval)
            for job_id, _, _ in periodic:  # pick up changed intervals from a new release
                scheduler.cancel(job_id)
            scheduler.run()
            return
        except redis.ConnectionError as exc:
            log.warning("scheduler lost Redis (%s); retrying in 1 s", exc)
            time.sleep(1)
