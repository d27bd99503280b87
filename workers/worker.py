"""The rq worker: a SimpleWorker (no fork per job) that owns its database connection."""

from __future__ import annotations

from typing import Any

from rq import SimpleWorker

from models import db


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
