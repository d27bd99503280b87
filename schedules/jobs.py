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
from workers.client import push, sweep_stalled
from workers.drain import Drainer, planes_for, settings
from workers.planes import Planes
from workers.protocol import Envelope

log = logging.getLogger("flashsale.schedules")

CONTROL_TTL_MS = 10_000
# Catalog products a sweep looks at besides those woken lately: a product that was never
# counted as woken (see workers.client.sweep_stalled) is found within catalog size / this
# many sweeps.
CATALOG_SLICE = 64


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
    woken = sweep_stalled(planes, catalog_slice(planes))
    if pushed or woken:
        log.info("sweep", extra={"pushed": pushed, "woken": woken})
    return {"pushed": pushed, "woken": woken}


def catalog_slice(planes: Planes) -> list[int]:
    """The next CATALOG_SLICE product ids after the last sweep's, in id order: a sweep
    looks at the products woken lately and at these (so the whole catalog, slowly)."""
    try:
        after = int(planes.control.get(keys.SWEEP_CURSOR) or 0)
    except ValueError:  # not a number: start over
        after = 0
    ids = [p.id for p in Product.select(Product.id).where(Product.id > after)
           .order_by(Product.id).limit(CATALOG_SLICE)]
    planes.control.set(keys.SWEEP_CURSOR, ids[-1] if len(ids) == CATALOG_SLICE else 0)
    return ids


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
