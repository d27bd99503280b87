"""What the writer's integration tests build their batches from."""

from __future__ import annotations

from workers import keys
from workers.decide import Policy, Request

POLICY = Policy(hold_ttl_ms=120_000, order_ttl_ms=900_000)


def hold(pid: int, qty: int, hold_id: str | None = None) -> Request:
    """A hold request on product ``pid`` (its own hold id unless one is given)."""
    return Request(id=keys.new_id("job", pid), op="hold",
                   args={"product_id": pid, "qty": qty,
                         "hold_id": hold_id or keys.new_id("hold", pid)})
