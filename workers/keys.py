"""Every Redis key name and id format of the per-product queue protocol.

All keys of one product share the hash tag ``{p:<id>}`` so that every script touches
a single Cluster slot. Partition 0 is the catalog partition: product creation and
webhooks whose order id names no product are serialized there.
"""

from __future__ import annotations

import os
import re
import secrets

from flashsale.limits import parse_id

CATALOG = 0
# Every key starts with this. Deployments that share one Redis Cluster as their data
# plane each set their own (REDIS_KEY_PREFIX); it is read once, when the process starts.
PREFIX = os.environ.get("REDIS_KEY_PREFIX") or "fs"
if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", PREFIX):
    raise SystemExit(f"REDIS_KEY_PREFIX must be 1-32 of A-Z a-z 0-9 _ . -, got {PREFIX!r}")

DRAIN_QUEUE = "drain"
MAINTENANCE_QUEUE = "maintenance"


def _tag(product_id: int) -> str:
    return f"{PREFIX}:{{p:{product_id}}}"


def queue(product_id: int) -> str:
    """Envelopes waiting to be applied, oldest first."""
    return f"{_tag(product_id)}:q"


def inflight(product_id: int) -> str:
    """Envelopes taken by the drainer and not yet committed and answered."""
    return f"{_tag(product_id)}:inflight"


def lease(product_id: int) -> str:
    """The drainer's lease: at most one drainer per product."""
    return f"{_tag(product_id)}:lease"


def wake(product_id: int) -> str:
    """Set while a drain job is pending or running for the product."""
    return f"{_tag(product_id)}:wake"


def product(product_id: int) -> str:
    """Cached product row plus the admission counter (``queued`` units)."""
    return f"{_tag(product_id)}:product"


def control(product_id: int, op: str) -> str:
    """Dedup flag for scheduler envelopes (one pending expiry sweep per product)."""
    return f"{_tag(product_id)}:ctl:{op}"


def job_prefix(product_id: int) -> str:
    return f"{_tag(product_id)}:job:"


def job(job_id: str) -> str:
    """Status or result of one request; the job id names its product partition."""
    return job_prefix(partition_of(job_id)) + job_id


def idempotency(scope: str, key: str) -> str:
    return f"{PREFIX}:idem:{scope}:{key}"


def reply_channel(gateway_id: str) -> str:
    return f"{PREFIX}:reply:{gateway_id}"


BATCH_STATS = f"{PREFIX}:stats:batches"
DEAD_LETTERS = f"{PREFIX}:stats:dead_letters"  # requests set aside, over all workers
# Product ids waiting for a drainer, oldest first. Drain jobs take from it until it is
# empty, so one rq job serves many products (see workers.drain).
READY = f"{PREFIX}:ready"
# Products woken since the sweep last found them idle: member = product id, value = a
# count READY adds one to at every wake-up. The sweep looks for stalled products here,
# not in the whole catalog, and forgets a product only if no wake-up came since it read
# the count (see workers.client.sweep_stalled).
WOKEN = f"{PREFIX}:woken"
# The last product id the sweep's slow pass through the catalog reached.
SWEEP_CURSOR = f"{PREFIX}:sweep:cursor"
# Drain jobs at work: member = rq job id, score = heartbeat (ms since the epoch).
DRAINERS = f"{PREFIX}:drainers"
# rq's own lists of drain and maintenance jobs not yet started (rq.Queue.key), and set
# of the workers that listen on the drain queue.
DRAIN_JOBS = f"rq:queue:{DRAIN_QUEUE}"
MAINTENANCE_JOBS = f"rq:queue:{MAINTENANCE_QUEUE}"
DRAIN_WORKERS = f"rq:workers:{DRAIN_QUEUE}"


# --- ids -------------------------------------------------------------------------------
# Opaque to clients, but they carry the product partition so any process can route a
# request (an order names a hold, a webhook names an order) to the right queue.

def new_id(kind: str, product_id: int) -> str:
    return f"{kind}_{product_id}_{secrets.token_hex(8)}"


def parse_partition(value: str, kind: str) -> int | None:
    """The product id inside an id of ``kind``, or None when the service cannot have
    issued it (see flashsale.limits.parse_id)."""
    return parse_id(value, kind)


def order_id_for(hold_id: str) -> str:
    """A hold has at most one order, ever: its id follows from the hold's."""
    return "ord" + hold_id[len("hold"):]


def hold_id_for(order_id: str) -> str:
    """The hold an order id was made from (see order_id_for)."""
    return "hold" + order_id[len("ord"):] if order_id.startswith("ord_") else ""


def partition_of(job_id: str) -> int:
    pid = parse_partition(job_id, "job")
    return CATALOG if pid is None else pid
