"""What happens to each request of a batch on one product: pure logic, no I/O.

``Ledger`` holds the state loaded for one batch (plain dataclasses), applies requests in
order, and records what changed so the writer can persist it in one transaction.
Every method returns the response the client gets: ``Result(status, body)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashsale.clock import rfc3339
from flashsale.limits import MAX_STOCK
from flashsale.problems import (
    HOLD_EXPIRED,
    STOCK_LIMIT,
    customer_limit,
    idempotency_reused,
    insufficient_stock,
    not_found,
    problem,
)
from models.tables import HoldStatus, OrderStatus
from workers.keys import hold_id_for, order_id_for


@dataclass(frozen=True)
class Result:
    status: int
    body: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "body": self.body}


@dataclass
class ProductState:
    id: int
    name: str
    price_cents: int
    currency: str
    stock: int
    reserved: int

    @property
    def available(self) -> int:
        return max(self.stock - self.reserved, 0)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "price_cents": self.price_cents,
                "currency": self.currency, "stock": self.stock, "available": self.available}


@dataclass
class HoldState:
    id: str
    product_id: int
    qty: int
    status: str
    created_at: int
    expires_at: int
    request_id: str
    order_id: str | None = None
    customer_id: str | None = None

    def is_active(self, now: int) -> bool:
        return self.status == HoldStatus.ACTIVE and now < self.expires_at

    def view(self, now: int) -> dict[str, Any]:
        status = HoldStatus.EXPIRED if self.status == HoldStatus.ACTIVE and \
            now >= self.expires_at else self.status
        body: dict[str, Any] = {"hold_id": self.id, "product_id": self.product_id,
                                "qty": self.qty, "status": str(status),
                                "expires_at": rfc3339(self.expires_at)}
        if self.order_id:
            body["order_id"] = self.order_id
        if self.customer_id is not None:
            body["customer_id"] = self.customer_id
        return body


@dataclass
class OrderState:
    id: str
    hold_id: str
    product_id: int
    qty: int
    amount_cents: int
    currency: str
    status: str
    created_at: int
    pay_by: int
    request_id: str
    closed_at: int | None = None
    customer_id: str | None = None

    def is_pending(self, now: int) -> bool:
        return self.status == OrderStatus.PENDING_PAYMENT and now < self.pay_by

    def view(self, now: int) -> dict[str, Any]:
        status = OrderStatus.CANCELLED if self.status == OrderStatus.PENDING_PAYMENT and \
            now >= self.pay_by else self.status
        body = {"order_id": self.id, "hold_id": self.hold_id, "product_id": self.product_id,
                "qty": self.qty, "amount_cents": self.amount_cents, "currency": self.currency,
                "status": str(status), "pay_by": rfc3339(self.pay_by)}
        if self.customer_id is not None:
            body["customer_id"] = self.customer_id
        return body


@dataclass
class WebhookState:
    key: str
    order_id: str
    product_id: int
    status: str  # "paid" | "failed"
    fingerprint: str
    request_id: str
    received_at: int
    outcome: str = "pending"
    response: Result = field(default_factory=lambda: Result(202, {}))
    refund_due: bool = False
    applied_at: int | None = None
    # Arrival order (received_at in microseconds, plus its place in its batch): webhooks
    # waiting for one order are applied in the order they arrived.
    arrival: int = 0


@dataclass(frozen=True)
class Request:
    """One envelope from the product queue."""

    id: str
    op: str
    args: dict[str, Any]
    idem: tuple[str, str] | None = None  # ("<scope>:<key>", fingerprint)


@dataclass(frozen=True)
class Policy:
    hold_ttl_ms: int
    order_ttl_ms: int
    # A pending webhook whose order and hold are both still unknown this long after it
    # arrived names an order that will never exist: settled as ignored (refund if paid).
    orphan_grace_ms: int = 15 * 60 * 1000
    max_qty_per_customer: int | None = None  # units of the product one customer may have

    def orphaned(self, received_at: int, now: int) -> bool:
        return now - received_at > self.hold_ttl_ms + self.orphan_grace_ms


@dataclass
class Ledger:
    """The state of one product partition for one batch, and what the batch changed."""

    product: ProductState | None
    now: int
    policy: Policy
    holds: dict[str, HoldState] = field(default_factory=dict)
    orders: dict[str, OrderState] = field(default_factory=dict)
    webhooks: dict[str, WebhookState] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (fp, req)
    results: dict[str, Result] = field(default_factory=dict)  # committed earlier
    # Units each customer of the batch has of the product (active holds, pending and paid
    # orders), kept current as the batch goes: the per-customer limit.
    customer_units: dict[str, int] = field(default_factory=dict)

    # What changed, for the writer.
    new_holds: list[HoldState] = field(default_factory=list)
    new_orders: list[OrderState] = field(default_factory=list)
    new_webhooks: list[WebhookState] = field(default_factory=list)
    dirty_holds: set[str] = field(default_factory=set)
    dirty_orders: set[str] = field(default_factory=set)
    dirty_webhooks: set[str] = field(default_factory=set)
    new_idempotency: dict[str, tuple[str, str]] = field(default_factory=dict)
    answers: dict[str, Result] = field(default_factory=dict)  # request id -> result
    product_dirty: bool = False

    # --- dispatch ---------------------------------------------------------------------

    def apply(self, requests: list[Request]) -> dict[str, Result]:
        """Apply ``requests`` in order; returns the result of each, by request id."""
        for req in requests:
            self.answers[req.id] = self._apply_one(req)
        # A webhook stored pending and settled later in the batch answers with its outcome.
        for hook in self.new_webhooks:
            self.answers[hook.request_id] = hook.response
        return self.answers

    def _apply_one(self, req: Request) -> Result:
        if req.id in self.results:  # committed by an earlier drainer: replay, don't redo
            return self.results[req.id]
        # Webhooks are deduplicated by their own table, which holds their current answer.
        idem = req.idem if req.op != "webhook" else None
        if idem is not None:
            seen = self.idempotency.get(idem[0])
            if seen is not None:
                fingerprint, first = seen
                if fingerprint != idem[1]:
                    return Result(422, idempotency_reused())
                if first in self.answers:
                    return self.answers[first]
                if first in self.results:
                    return self.results[first]
        handler = getattr(self, f"_op_{req.op}", None)
        if handler is None:
            return Result(400, problem(400, "Unknown operation", f"op {req.op!r}"))
        result = handler(req)
        if idem is not None and result.status < 500:
            self.idempotency[idem[0]] = (idem[1], req.id)
            self.new_idempotency[idem[0]] = (idem[1], req.id)
        return result

    # --- stock counters ---------------------------------------------------------------

    def _reserve(self, qty: int) -> None:
        assert self.product is not None
        self.product.reserved += qty
        self.product_dirty = True

    def _release(self, qty: int) -> None:
        assert self.product is not None
        self.product.reserved -= qty
        self.product_dirty = True

    def _sell(self, qty: int) -> None:
        assert self.product is not None
        self.product.reserved -= qty
        self.product.stock -= qty
        self.product_dirty = True

    # --- holds ------------------------------------------------------------------------

    def _op_hold(self, req: Request) -> Result:
        qty, hold_id = int(req.args["qty"]), str(req.args["hold_id"])
        if self.product is None:
            return Result(404, not_found("Product", req.args.get("product_id")))
        customer = req.args.get("customer_id")
        limit = self.policy.max_qty_per_customer
        if limit is not None and customer is not None:
            held = self.customer_units.get(customer, 0)
            if held + qty > limit:
                return Result(409, customer_limit(limit, held, qty))
        if qty > self.product.available:
            return Result(409, insufficient_stock(self.product.available, qty))
        self._reserve(qty)
        if customer is not None:
            self.customer_units[customer] = self.customer_units.get(customer, 0) + qty
        hold = HoldState(id=hold_id, product_id=self.product.id, qty=qty,
                         status=HoldStatus.ACTIVE, created_at=self.now,
                         expires_at=self.now + self.policy.hold_ttl_ms, request_id=req.id,
                         customer_id=customer)
        self.holds[hold.id] = hold
        self.new_holds.append(hold)
        return Result(201, hold.view(self.now))

    def _expire_hold(self, hold: HoldState) -> None:
        if hold.status == HoldStatus.ACTIVE and self.now >= hold.expires_at:
            hold.status = HoldStatus.EXPIRED
            self.dirty_holds.add(hold.id)
            self._release(hold.qty)

    # --- orders -----------------------------------------------------------------------

    def _op_order(self, req: Request) -> Result:
        hold = self.holds.get(str(req.args["hold_id"]))
        # With customer tokens, another customer's hold is answered as if it did not exist.
        owner_only = "customer_id" in req.args and req.args["customer_id"] != (
            hold.customer_id if hold else None)
        if hold is None or self.product is None or owner_only:
            return Result(404, not_found("Hold", req.args["hold_id"]))
        if hold.status == HoldStatus.CONVERTED and hold.order_id in self.orders:
            return Result(200, self.orders[hold.order_id].view(self.now))
        if not hold.is_active(self.now):
            self._expire_hold(hold)
            self._settle_never_created(order_id_for(hold.id))
            return Result(409, problem(409, HOLD_EXPIRED,
                                       f"Hold {hold.id} expired at {rfc3339(hold.expires_at)}",
                                       slug="hold-expired"))
        order = OrderState(id=str(req.args["order_id"]), hold_id=hold.id,
                           product_id=hold.product_id, qty=hold.qty,
                           amount_cents=hold.qty * self.product.price_cents,
                           currency=self.product.currency, status=OrderStatus.PENDING_PAYMENT,
                           created_at=self.now, pay_by=self.now + self.policy.order_ttl_ms,
                           request_id=req.id, customer_id=hold.customer_id)
        hold.status, hold.order_id = HoldStatus.CONVERTED, order.id
        self.dirty_holds.add(hold.id)
        self.orders[order.id] = order
        self.new_orders.append(order)
        result = Result(201, order.view(self.now))
        self._apply_pending_webhooks(order)
        return result

    def _time_out(self, order: OrderState) -> None:
        """An unpaid order past ``pay_by`` is cancelled and its units released."""
        if order.status == OrderStatus.PENDING_PAYMENT and self.now >= order.pay_by:
            self._close(order, OrderStatus.CANCELLED)
            self._release(order.qty)

    def _close(self, order: OrderState, status: OrderStatus) -> None:
        order.status, order.closed_at = status, self.now
        self.dirty_orders.add(order.id)

    # --- webhooks ---------------------------------------------------------------------

    def _op_webhook(self, req: Request) -> Result:
        key = str(req.args["idempotency_key"])
        fingerprint = str(req.args["fingerprint"])
        seen = self.webhooks.get(key)
        if seen is not None:
            if seen.fingerprint != fingerprint:
                return Result(422, idempotency_reused(
                    "This webhook idempotency_key was first used with a different body"))
            return seen.response
        hook = WebhookState(key=key, order_id=str(req.args["order_id"]),
                            product_id=self.product.id if self.product else 0,
                            status=str(req.args["status"]), fingerprint=fingerprint,
                            request_id=req.id, received_at=self.now,
                            arrival=self.now * 1000 + len(self.new_webhooks))
        self.webhooks[key] = hook
        self.new_webhooks.append(hook)
        order = self.orders.get(hook.order_id)
        if order is None:
            hook.response = Result(202, {"idempotency_key": key, "order_id": hook.order_id,
                                         "outcome": "pending"})
            hold = self.holds.get(hold_id_for(hook.order_id))
            if hold is not None and hold.status != HoldStatus.CONVERTED and \
                    not hold.is_active(self.now):  # its order can no longer be created
                self._settle_never_created(hook.order_id)
            return hook.response
        return self._settle(hook, order)

    def _settle(self, hook: WebhookState, order: OrderState) -> Result:
        """Apply a webhook to its order: paid sells the units, failed releases them."""
        self._time_out(order)
        if order.status == OrderStatus.PENDING_PAYMENT:
            if hook.status == "paid":
                self._close(order, OrderStatus.PAID)
                self._sell(order.qty)
            else:
                self._close(order, OrderStatus.CANCELLED)
                self._release(order.qty)
                if order.customer_id in self.customer_units:  # cancelled units stop counting
                    self.customer_units[order.customer_id] -= order.qty
            hook.outcome = "applied"
        else:
            hook.outcome = "ignored"
            # Money taken for an order we no longer sell: the operator refunds it.
            hook.refund_due = hook.status == "paid" and order.status == OrderStatus.CANCELLED
        hook.applied_at = self.now
        hook.response = Result(200, {"idempotency_key": hook.key, "order_id": order.id,
                                     "outcome": hook.outcome,
                                     "order_status": str(order.status)})
        self.dirty_webhooks.add(hook.key)
        return hook.response

    def _settle_never_created(self, order_id: str) -> None:
        """Webhooks waiting for an order that can no longer be created: ignored, and a
        payment among them is due back (``flashsale refunds``)."""
        for hook in self.webhooks.values():
            if hook.order_id == order_id and hook.outcome == "pending":
                hook.outcome, hook.applied_at = "ignored", self.now
                hook.refund_due = hook.status == "paid"
                hook.response = Result(200, {"idempotency_key": hook.key,
                                             "order_id": order_id, "outcome": "ignored"})
                self.dirty_webhooks.add(hook.key)

    def _apply_pending_webhooks(self, order: OrderState) -> None:
        pending = [h for h in self.webhooks.values()
                   if h.order_id == order.id and h.outcome == "pending"]
        for hook in sorted(pending, key=lambda h: h.arrival):
            self._settle(hook, order)

    def _op_retry_webhooks(self, req: Request) -> Result:
        """Settle webhooks stored before their order existed, and those whose order can
        no longer be created (its hold ended unconverted, or nothing was ever heard of
        it long after the webhook)."""
        pending = sum(1 for h in self.webhooks.values() if h.outcome == "pending")
        for order in list(self.orders.values()):
            self._apply_pending_webhooks(order)
        for hook in [h for h in self.webhooks.values() if h.outcome == "pending"]:
            hold = self.holds.get(hold_id_for(hook.order_id))
            if hold is not None and hold.status != HoldStatus.CONVERTED:
                if not hold.is_active(self.now):
                    self._settle_never_created(hook.order_id)
            elif hold is None and self.policy.orphaned(hook.received_at, self.now):
                self._settle_never_created(hook.order_id)
        left = sum(1 for h in self.webhooks.values() if h.outcome == "pending")
        return Result(200, {"applied": pending - left})

    # --- restock and expiry -----------------------------------------------------------

    def _op_restock(self, req: Request) -> Result:
        if self.product is None:
            return Result(404, not_found("Product", req.args.get("product_id")))
        qty = int(req.args["qty"])
        if self.product.stock + qty > MAX_STOCK:
            return Result(409, problem(
                409, STOCK_LIMIT, f"Stock would be {self.product.stock + qty}; at most "
                f"{MAX_STOCK} units can be in stock", slug="stock-limit", limit=MAX_STOCK))
        self.product.stock += qty
        self.product_dirty = True
        return Result(200, self.product.view())

    def _op_expire(self, req: Request) -> Result:
        """Release every hold and unpaid order of this product whose time is up."""
        holds = orders = 0
        for hold in self.holds.values():
            if hold.status == HoldStatus.ACTIVE and self.now >= hold.expires_at:
                self._expire_hold(hold)
                self._settle_never_created(order_id_for(hold.id))
                holds += 1
        for order in self.orders.values():
            if order.status == OrderStatus.PENDING_PAYMENT and self.now >= order.pay_by:
                self._time_out(order)
                orders += 1
        return Result(200, {"expired_holds": holds, "cancelled_orders": orders})

    # --- for the writer ---------------------------------------------------------------

    def changed_more_than_holds(self) -> bool:
        """Whether the batch changed anything but new holds (which the writer inserts
        with the round's): a status, an order, a webhook or an idempotency record."""
        return bool(self.dirty_holds or self.new_orders or self.dirty_orders
                    or self.new_webhooks or self.dirty_webhooks or self.new_idempotency)

    def webhook_updates(self) -> list[WebhookState]:
        """Webhooks stored before this batch whose outcome this batch decided."""
        if not self.dirty_webhooks:  # (most batches: no webhook at all)
            return []
        new = {h.key for h in self.new_webhooks}
        return [self.webhooks[k] for k in sorted(self.dirty_webhooks - new)]

    def revised_results(self) -> dict[str, Result]:
        """Earlier requests whose answer changed: a pending webhook that is now settled."""
        return {h.request_id: h.response for h in self.webhook_updates()}
