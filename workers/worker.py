"""The rq worker: a SimpleWorker (no fork per job) that owns its database connection."""

from __future__ import annotations

from typing import Any

from rq import SimpleWorker

from models import db


class DrainWorker(SimpleWorker):
    """Runs drain and maintenance jobs in-process.

    Forking per job (rq's default) costs milliseconds a job; a drain job is cheap to
    start and may run for long, so it runs in the worker itself. The database connection
    is handed back after every job so that a restarted database costs one reconnect.
    """

    def perform_job(self, job: Any, queue: Any) -> bool:
        try:
            return super().perform_job(job, queue)
        finally:
            if not db.is_closed():
                db.close()
