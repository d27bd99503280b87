"""Periodic work. It only enqueues envelopes or drain jobs; it never mutates stock.

Safe to run twice: scheduler envelopes are deduplicated per product by a control flag
that the drainer clears when it applies them, and re-waking relies on the lease.
"""

from __future__ import annotations

import logging

from rq import get_current_job

from flashsale.clock import now_ms
from models import (
    Hold,
    HoldStatus,
    IdempotencyRecord,
    Order,
    OrderStatus,
    Product,
    RequestRecord,
    Webhook,
)
from workers import keys
from workers.client import push, rewake_stalled
from workers.drain import Drainer, planes_for, settings
from workers.planes import Planes
from workers.protocol import Envelope

log = logging.getLogger("flashsale.schedules")

CONTROL_TTL_MS = 10_000


def _planes() -> Planes:
    job = get_current_job()
    return planes_for(job.connection) if job is not None else Planes.connect(settings())


def sweep() -> dict[str, int]:
    """Release what time has expired, settle early webhooks, re-wake stalled products."""
    planes = _planes()
    now = now_ms()
    expiring = {row.product_id for row in Hold.select(Hold.product_id).distinct().where(
        (Hold.status == HoldStatus.ACTIVE) & (Hold.expires_at <= now))}
    expiring |= {row.product_id for row in Order.select(Order.product_id).distinct().where(
        (Order.status == OrderStatus.PENDING_PAYMENT) & (Order.pay_by <= now))}
    settling = {row.product_id for row in Webhook.select(Webhook.product_id).distinct()
                .join(Order, on=(Order.id == Webhook.order_id))
                .where(Webhook.outcome == "pending")}
    # Webhooks whose order nobody will create: settled (and listed for refund) once the
    # drainer is sure of it (see decide.Policy.orphaned).
    policy = Drainer.policy_of(settings())
    stale = now - policy.hold_ttl_ms - policy.orphan_grace_ms
    settling |= {row.product_id for row in Webhook.select(Webhook.product_id).distinct()
                 .where((Webhook.outcome == "pending") & (Webhook.received_at < stale))}
    pushed = sum(control(planes, pid, "expire") for pid in expiring)
    pushed += sum(control(planes, pid, "retry_webhooks") for pid in settling)
    product_ids = [keys.CATALOG] + [p.id for p in Product.select(Product.id)]
    woken = rewake_stalled(planes, product_ids)
    if pushed or woken:
        log.info("sweep", extra={"pushed": pushed, "woken": woken})
    return {"pushed": pushed, "woken": woken}


def control(planes: Planes, product_id: int, op: str) -> bool:
    """Queue one scheduler envelope for the product unless one is already pending."""
    if not planes.data.set(keys.control(product_id, op), "1", nx=True, px=CONTROL_TTL_MS):
        return False
    envelope = Envelope(id=keys.new_id("job", product_id), op=op, args={})
    push(planes, product_id, envelope, settings().job_ttl_seconds)
    return True


def purge(max_age_hours: int = 48) -> int:
    """Delete request results and idempotency records older than they must be kept."""
    cutoff = now_ms() - max_age_hours * 3600 * 1000
    deleted = 0
    for model in (RequestRecord, IdempotencyRecord):
        deleted += model.delete().where(model.created_at < cutoff).execute()
    return deleted
