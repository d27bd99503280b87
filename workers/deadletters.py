"""Dead letters: requests the writer could not apply, kept for an operator.

Such a request is answered on its own (its job gets the problem document) and the rest
of its batch is applied; the row here keeps the envelope and the error so that an
operator can read it (``flashsale dead-letters``) and, once the cause is fixed, replay it
under the same request id (``flashsale dead-letters --replay ID``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis

from flashsale.clock import now_ms
from models import DeadLetter, RequestRecord, atomic
from workers import keys
from workers.decide import Request
from workers.planes import Planes
from workers.protocol import Envelope


@dataclass(frozen=True)
class DeadRequest:
    request: Request
    product_id: int
    error: str
    status: int


def envelope_of(request: Request) -> Envelope:
    return Envelope(id=request.id, op=request.op, args=request.args, idem=request.idem)


# The scheduler pushes these again every sweep: one failing for good is kept once, not
# once a second, until an operator has looked (replayed it).
RECURRING_OPS = ("expire", "retry_webhooks")


def record(dead: DeadRequest, now: int) -> None:
    """Keep ``dead`` (inside the caller's transaction)."""
    if dead.request.op in RECURRING_OPS and DeadLetter.select().where(
            (DeadLetter.product_id == dead.product_id) & (DeadLetter.op == dead.request.op)
            & DeadLetter.replayed_at.is_null()).exists():
        return
    DeadLetter.insert(request_id=dead.request.id, product_id=dead.product_id,
                      op=dead.request.op[:32],
                      envelope=envelope_of(dead.request).encode().decode(errors="replace"),
                      error=dead.error, status_code=dead.status, created_at=now).execute()


def count(conn: redis.Redis) -> int:
    """Dead letters since the counter began (all workers): what /metrics exposes."""
    return int(conn.get(keys.DEAD_LETTERS) or 0)


def list_dead(limit: int = 50, include_replayed: bool = False) -> list[dict[str, Any]]:
    """The newest dead letters, newest first."""
    query = DeadLetter.select().order_by(DeadLetter.id.desc()).limit(limit)
    if not include_replayed:
        query = query.where(DeadLetter.replayed_at.is_null())
    return [{"id": row.id, "request_id": row.request_id, "product_id": row.product_id,
             "op": row.op, "status": row.status_code, "error": row.error,
             "created_at": row.created_at, "replayed_at": row.replayed_at,
             "envelope": row.envelope} for row in query]


def replay(conn: Planes | redis.Redis, dead_id: int, job_ttl: int) -> bool:
    """Queue a dead letter again under its request id; False if unknown or replayed.

    Its recorded answer is dropped first, so the drainer applies it afresh and its job
    gets the new result.
    """
    from workers.client import push  # workers.client imports the drainer

    with atomic():
        row = DeadLetter.get_or_none(DeadLetter.id == dead_id)
        if row is None or row.replayed_at is not None:
            return False
        RequestRecord.delete().where(RequestRecord.id == row.request_id).execute()
        row.replayed_at = now_ms()
        row.save()
    job_id, _, payload = row.envelope.partition(" ")
    body = orjson.loads(payload)
    idem = body.get("idem")
    envelope = Envelope(id=job_id, op=body["op"], args=body["args"],
                        idem=(idem[0], idem[1]) if idem else None)
    push(conn, row.product_id, envelope, job_ttl)
    return True
