"""A model test of the Ledger: random request sequences, in batches, against a reference.

Hypothesis queues holds, orders, payment webhooks, restocks, scheduler work and replays
on one product, drains the queue in batches of random size while the clock moves, and
after every step compares every answer and the persisted state with ``Model``, a
reference written from API.md with plain dicts.

Between batches the state lives in ``Store``, which does with dicts what workers/apply.py
does with the database: each batch gets a fresh Ledger holding only the rows ``_load``
reads, in primary-key order (SQL without ORDER BY promises none; InnoDB gives this one),
and only what the Ledger reports as new or dirty is written back, so a change it makes
but does not report is lost here as it would be in production. ``Store.load`` must follow
``apply._load`` when that changes.

A new rule goes in ``Model`` (what API.md says happens) and, when it needs new inputs, in
a ``LedgerMachine`` rule that sends them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from flashsale.clock import rfc3339
from flashsale.limits import MAX_STOCK
from flashsale.problems import (
    CUSTOMER_LIMIT,
    HOLD_EXPIRED,
    IDEMPOTENCY_REUSED,
    INSUFFICIENT_STOCK,
    STOCK_LIMIT,
)
from workers import keys
from workers.decide import (
    HoldState,
    Ledger,
    OrderState,
    Policy,
    ProductState,
    Request,
    Result,
    WebhookState,
)

NOW = 1_800_000_000_000  # ms
HOLD_TTL = 120_000
ORDER_TTL = 900_000
ORPHAN_GRACE = 900_000  # a webhook for an order nobody heard of is given up after TTL + this
PRICE = 1999
PID = 1

# Deterministic by default (the same examples on every run, no example database);
# MODEL_EXPLORE=1 draws new ones, MODEL_EXAMPLES=n runs more.
SETTINGS = settings(
    max_examples=int(os.environ.get("MODEL_EXAMPLES", "400")),
    stateful_step_count=40,
    deadline=None,
    derandomize=not os.environ.get("MODEL_EXPLORE"),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

ACTIVE, EXPIRED, CONVERTED = "active", "expired", "converted"
PENDING, PAID, CANCELLED = "pending_payment", "paid", "cancelled"


def policy(limit: int | None) -> Policy:
    return Policy(hold_ttl_ms=HOLD_TTL, order_ttl_ms=ORDER_TTL, orphan_grace_ms=ORPHAN_GRACE,
                  max_qty_per_customer=limit)


# --- the database between batches, as workers/apply.py loads and writes it ------------

@dataclass
class Store:
    """Rows as ``apply._write`` leaves them; ``load`` builds a batch's Ledger as
    ``apply._apply_many`` and ``apply._load`` do."""

    product: ProductState
    policy: Policy
    holds: dict[str, HoldState] = field(default_factory=dict)
    orders: dict[str, OrderState] = field(default_factory=dict)
    webhooks: dict[str, WebhookState] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, str]] = field(default_factory=dict)
    requests: dict[str, Result] = field(default_factory=dict)

    def load(self, now: int, batch: list[Request]) -> Ledger:
        lg = Ledger(product=replace(self.product), now=now, policy=self.policy,
                    results={r.id: self.requests[r.id] for r in batch if r.id in self.requests})
        todo = [r for r in batch if r.id not in lg.results]
        ops = {r.op for r in todo}
        idem = {r.idem[0] for r in todo if r.idem and r.op != "webhook"}
        lg.idempotency.update({k: v for k, v in self.idempotency.items() if k in idem})
        lg.results.update({rid: self.requests[rid] for _, rid in lg.idempotency.values()
                           if rid in self.requests})
        hold_ids = {str(r.args["hold_id"]) for r in todo if r.op == "order"}
        hook_keys = {str(r.args["idempotency_key"]) for r in todo if r.op == "webhook"}
        hook_orders = {str(r.args["order_id"]) for r in todo if r.op == "webhook"}
        new_orders = hook_orders | {str(r.args["order_id"]) for r in todo if r.op == "order"}
        if hook_keys:
            self._webhooks(lg, lambda w: w.key in hook_keys)
        if "retry_webhooks" in ops:
            self._webhooks(lg, lambda w: w.outcome == "pending")
        if self.policy.max_qty_per_customer is not None:
            self._customer_units(lg, {str(r.args["customer_id"]) for r in todo
                                      if r.op == "hold" and r.args.get("customer_id")})
        if hold_ids:
            self._holds(lg, lambda h: h.id in hold_ids)
            self._orders(lg, lambda o: o.hold_id in hold_ids)
        if hook_orders:  # their orders, or the holds that would have become them
            hook_holds = {keys.hold_id_for(o) for o in hook_orders}
            self._orders(lg, lambda o: o.id in hook_orders)
            self._holds(lg, lambda h: h.id in hook_holds)
        if "expire" in ops:
            self._holds(lg, lambda h: h.status == ACTIVE and h.expires_at <= now)
            self._orders(lg, lambda o: o.status == PENDING and o.pay_by <= now)
            new_orders |= {keys.order_id_for(h.id) for h in lg.holds.values()
                           if h.status == ACTIVE}
        if new_orders:  # webhooks that arrived before their order
            self._webhooks(lg, lambda w: w.order_id in new_orders and w.outcome == "pending")
        if "retry_webhooks" in ops:
            pending = {w.order_id for w in lg.webhooks.values() if w.outcome == "pending"}
            pending_holds = {keys.hold_id_for(o) for o in pending}
            self._orders(lg, lambda o: o.id in pending)
            self._holds(lg, lambda h: h.id in pending_holds)
        return lg

    def _customer_units(self, lg: Ledger, customers: set[str]) -> None:
        units = dict.fromkeys(customers, 0)
        for hold in self.holds.values():
            if hold.customer_id in units and hold.status == ACTIVE and hold.expires_at > lg.now:
                units[hold.customer_id] += hold.qty
        for order in self.orders.values():
            counts = order.status == PAID or (order.status == PENDING and order.pay_by > lg.now)
            if order.customer_id in units and counts:
                units[order.customer_id] += order.qty
        lg.customer_units.update(units)

    def _holds(self, lg: Ledger, where: Callable[[HoldState], bool]) -> None:
        for key in sorted(self.holds):
            if where(self.holds[key]):
                lg.holds.setdefault(key, replace(self.holds[key]))

    def _orders(self, lg: Ledger, where: Callable[[OrderState], bool]) -> None:
        for key in sorted(self.orders):
            if where(self.orders[key]):
                order = lg.orders.setdefault(key, replace(self.orders[key]))
                if order.hold_id in lg.holds:
                    lg.holds[order.hold_id].order_id = order.id

    def _webhooks(self, lg: Ledger, where: Callable[[WebhookState], bool]) -> None:
        for key in sorted(self.webhooks):
            if where(self.webhooks[key]):
                lg.webhooks.setdefault(key, replace(self.webhooks[key]))

    def write(self, lg: Ledger, todo: list[Request]) -> None:
        """What ``_write`` persists; a duplicate primary or unique key fails the test."""
        assert lg.product is not None
        if lg.product_dirty:
            self.product = replace(self.product, stock=lg.product.stock,
                                   reserved=lg.product.reserved)
        for hold in lg.new_holds:
            assert hold.id not in self.holds, f"hold {hold.id} inserted twice"
            self.holds[hold.id] = replace(hold, status=str(hold.status), order_id=None)
        for key in lg.dirty_holds - {h.id for h in lg.new_holds}:
            self.holds[key] = replace(self.holds[key], status=str(lg.holds[key].status))
        for order in lg.new_orders:
            assert order.id not in self.orders, f"order {order.id} inserted twice"
            assert order.hold_id not in {o.hold_id for o in self.orders.values()}, \
                f"second order for hold {order.hold_id}"
            self.orders[order.id] = replace(order, status=str(order.status))
        for key in lg.dirty_orders - {o.id for o in lg.new_orders}:
            changed = lg.orders[key]
            self.orders[key] = replace(self.orders[key], status=str(changed.status),
                                       closed_at=changed.closed_at)
        for hook in lg.new_webhooks:
            assert hook.key not in self.webhooks, f"webhook {hook.key} inserted twice"
            self.webhooks[hook.key] = replace(hook)
        for hook in lg.webhook_updates():
            assert hook.key in self.webhooks
            self.webhooks[hook.key] = replace(hook)
        for request_id, result in lg.revised_results().items():
            assert request_id in self.requests, f"revised {request_id} was never stored"
            self.requests[request_id] = result
        for key, record in lg.new_idempotency.items():
            assert key not in self.idempotency, f"idempotency key {key} inserted twice"
            self.idempotency[key] = record
        for req in todo:
            assert req.id not in self.requests, f"request {req.id} stored twice"
            self.requests[req.id] = lg.answers[req.id]


# --- the reference: API.md in plain dicts ---------------------------------------------

@dataclass(frozen=True)
class Expect:
    """An answer the model predicts: a status and body (all of it when ``exact``, else
    the members named), or exactly an earlier request's answer, or a stored result."""

    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    same_as: str | None = None
    result: Result | None = None


def problem(status: int, **members: Any) -> Expect:
    return Expect(status, {"status": status, **members}, exact=False)


class Model:
    """One product, its holds, orders, webhooks and Idempotency-Keys. Statuses are the
    stored ones: a hold past its time stays ``active`` (its units reserved) until ``expire``
    or an order for it says otherwise; views derive what a client is shown."""

    def __init__(self, stock: int, limit: int | None) -> None:
        self.stock = stock
        self.limit = limit  # MAX_QTY_PER_CUSTOMER
        self.holds: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.webhooks: dict[str, dict[str, Any]] = {}  # by idempotency_key, arrival order
        self.keys: dict[str, tuple[str, str]] = {}  # Idempotency-Key -> (body, first request)
        self.fresh: list[str] = []  # webhooks first seen in the current batch

    @property
    def reserved(self) -> int:
        return sum(h["qty"] for h in self.holds.values() if h["status"] == ACTIVE) + \
            sum(o["qty"] for o in self.orders.values() if o["status"] == PENDING)

    @property
    def available(self) -> int:
        return self.stock - self.reserved

    def units(self, customer: str, now: int) -> int:
        """What counts against the per-customer limit: active holds, unpaid and paid orders."""
        return sum(h["qty"] for k, h in self.holds.items()
                   if h["customer"] == customer and self.hold_status(k, now) == ACTIVE) + \
            sum(o["qty"] for k, o in self.orders.items()
                if o["customer"] == customer and self.order_status(k, now) != CANCELLED)

    def hold_status(self, hold_id: str, now: int) -> str:
        hold = self.holds[hold_id]
        return EXPIRED if hold["status"] == ACTIVE and now >= hold["expires_at"] \
            else str(hold["status"])

    def order_status(self, order_id: str, now: int) -> str:
        order = self.orders[order_id]
        return CANCELLED if order["status"] == PENDING and now >= order["pay_by"] \
            else str(order["status"])

    def order_view(self, order_id: str, now: int) -> dict[str, Any]:
        order = self.orders[order_id]
        view = {"order_id": order_id, "hold_id": order["hold_id"], "product_id": PID,
                "qty": order["qty"], "amount_cents": order["qty"] * PRICE, "currency": "USD",
                "status": self.order_status(order_id, now), "pay_by": rfc3339(order["pay_by"])}
        return view | ({"customer_id": order["customer"]} if order["customer"] else {})

    def run(self, batch: list[Request], now: int, committed: dict[str, Result]
            ) -> dict[str, Expect]:
        """The answers of one batch. A webhook first seen in the batch answers what it
        came to by the batch's end (it may have been stored pending, then applied)."""
        self.fresh = []
        expect = {}
        for req in batch:
            if req.id in committed:  # a replay finds its committed result, does nothing
                expect[req.id] = Expect(result=committed[req.id])
            else:
                expect[req.id] = self.apply(req, now)
        for key in self.fresh:
            hook = self.webhooks[key]
            expect[hook["request"]] = Expect(*hook["response"])
        return expect

    def apply(self, req: Request, now: int) -> Expect:
        if req.idem is not None and req.op != "webhook":
            key, body = req.idem
            if key in self.keys:
                first_body, first = self.keys[key]
                if first_body != body:
                    return problem(422, title=IDEMPOTENCY_REUSED)
                return Expect(same_as=first)
            self.keys[key] = (body, req.id)
        op: Callable[[dict[str, Any], int, str], Expect] = getattr(self, req.op)
        return op(req.args, now, req.id)

    def hold(self, args: dict[str, Any], now: int, request_id: str) -> Expect:
        qty, customer = args["qty"], args.get("customer_id")
        if self.limit is not None and customer is not None and \
                self.units(customer, now) + qty > self.limit:
            return problem(409, title=CUSTOMER_LIMIT, limit=self.limit,
                           held=self.units(customer, now))
        if qty > self.available:
            return problem(409, title=INSUFFICIENT_STOCK, available=self.available)
        self.holds[args["hold_id"]] = {"qty": qty, "status": ACTIVE, "customer": customer,
                                       "expires_at": now + HOLD_TTL}
        return Expect(201, {"hold_id": args["hold_id"], "product_id": PID, "qty": qty,
                            "status": ACTIVE, "expires_at": rfc3339(now + HOLD_TTL)}
                      | ({"customer_id": customer} if customer else {}))

    def order(self, args: dict[str, Any], now: int, request_id: str) -> Expect:
        hold = self.holds.get(args["hold_id"])
        if hold is None or args.get("customer_id", hold["customer"]) != hold["customer"]:
            return problem(404)  # another customer's hold is as good as unknown
        if hold["status"] == CONVERTED:  # one order per hold, ever
            return Expect(200, self.order_view(hold["order_id"], now))
        if self.hold_status(args["hold_id"], now) == EXPIRED:
            hold["status"] = EXPIRED
            self.give_up(args["order_id"], now)
            return problem(409, title=HOLD_EXPIRED)
        order_id = args["order_id"]
        hold.update(status=CONVERTED, order_id=order_id)
        self.orders[order_id] = {"hold_id": args["hold_id"], "qty": hold["qty"],
                                 "customer": hold["customer"], "status": PENDING,
                                 "pay_by": now + ORDER_TTL}
        answer = Expect(201, self.order_view(order_id, now))
        for key, hook in list(self.webhooks.items()):  # early webhooks, in arrival order
            if hook["order_id"] == order_id and hook["outcome"] == "pending":
                self.settle(key, now)
        return answer

    def webhook(self, args: dict[str, Any], now: int, request_id: str) -> Expect:
        key, body = args["idempotency_key"], (args["order_id"], args["status"])
        if key in self.webhooks:  # one effect per key; its answer is the current one
            hook = self.webhooks[key]
            if hook["body"] != body:
                return problem(422, title=IDEMPOTENCY_REUSED)
            return Expect(*hook["response"])
        self.webhooks[key] = {
            "body": body, "order_id": args["order_id"], "status": args["status"],
            "request": request_id, "received_at": now, "outcome": "pending",
            "refund_due": False,
            "response": (202, {"idempotency_key": key, "order_id": args["order_id"],
                               "outcome": "pending"})}
        self.fresh.append(key)
        if args["order_id"] in self.orders:
            self.settle(key, now)
        elif self.hold_ended(keys.hold_id_for(args["order_id"]), now):
            self.give_up(args["order_id"], now)
        return Expect(*self.webhooks[key]["response"])

    def settle(self, key: str, now: int) -> None:
        hook = self.webhooks[key]
        order = self.orders[hook["order_id"]]
        self.time_out(order, now)
        if order["status"] == PENDING:
            order["status"] = PAID if hook["status"] == "paid" else CANCELLED
            if order["status"] == PAID:
                self.stock -= order["qty"]
            hook["outcome"] = "applied"
        else:  # final orders never change; money for a cancelled one is refunded
            hook["outcome"] = "ignored"
            hook["refund_due"] = hook["status"] == "paid" and order["status"] == CANCELLED
        hook["response"] = (200, {"idempotency_key": key, "order_id": hook["order_id"],
                                  "outcome": hook["outcome"], "order_status": order["status"]})

    def time_out(self, order: dict[str, Any], now: int) -> bool:
        if order["status"] == PENDING and now >= order["pay_by"]:
            order["status"] = CANCELLED
            return True
        return False

    def hold_ended(self, hold_id: str, now: int) -> bool:
        """The hold exists and its order can no longer be created."""
        return hold_id in self.holds and self.holds[hold_id]["status"] != CONVERTED and \
            self.hold_status(hold_id, now) == EXPIRED

    def give_up(self, order_id: str, now: int) -> None:
        """Webhooks waiting for an order that will never exist are ignored, and money
        taken for it is due back."""
        for key, hook in self.webhooks.items():
            if hook["order_id"] == order_id and hook["outcome"] == "pending":
                hook.update(outcome="ignored", refund_due=hook["status"] == "paid",
                            response=(200, {"idempotency_key": key, "order_id": order_id,
                                            "outcome": "ignored"}))

    def restock(self, args: dict[str, Any], now: int, request_id: str) -> Expect:
        if self.stock + args["qty"] > MAX_STOCK:
            return problem(409, title=STOCK_LIMIT, limit=MAX_STOCK)
        self.stock += args["qty"]
        return Expect(200, {"id": PID, "name": "Widget", "price_cents": PRICE,
                            "currency": "USD", "stock": self.stock,
                            "available": self.available})

    def expire(self, args: dict[str, Any], now: int, request_id: str) -> Expect:
        holds = 0
        for hold_id, hold in self.holds.items():
            if hold["status"] == ACTIVE and self.hold_status(hold_id, now) == EXPIRED:
                hold["status"] = EXPIRED
                self.give_up(keys.order_id_for(hold_id), now)
                holds += 1
        orders = sum(self.time_out(order, now) for order in self.orders.values())
        return Expect(200, {"expired_holds": holds, "cancelled_orders": orders})

    def retry_webhooks(self, args: dict[str, Any], now: int, request_id: str) -> Expect:
        """Settle what waits for an order that now exists, and give up on what waits for
        one that never will: its hold ended unconverted, or no hold was ever heard of and
        the webhook is older than the hold TTL and the grace period."""
        pending = [k for k, h in self.webhooks.items() if h["outcome"] == "pending"]
        for key in pending:
            hook = self.webhooks[key]
            hold_id = keys.hold_id_for(hook["order_id"])
            if hook["order_id"] in self.orders:
                self.settle(key, now)
            elif self.hold_ended(hold_id, now) or (
                    hold_id not in self.holds and
                    now - hook["received_at"] > HOLD_TTL + ORPHAN_GRACE):
                self.give_up(hook["order_id"], now)
        left = sum(h["outcome"] == "pending" for h in self.webhooks.values())
        return Expect(200, {"applied": len(pending) - left})


# --- the machine ----------------------------------------------------------------------

NEVER_ORDER = f"ord_{PID}_{'f' * 16}"  # no hold will ever have it
UNKNOWN_HOLD = f"hold_{PID}_{'e' * 16}"
OTHER_HOLD = f"hold_{PID}_{'d' * 16}"
CUSTOMERS = ("c1", "c2")
STATUSES = st.sampled_from(["paid", "failed"])
TICKS = st.sampled_from([1, 1_000, HOLD_TTL - 1, HOLD_TTL, ORDER_TTL - HOLD_TTL, ORDER_TTL,
                         HOLD_TTL + ORPHAN_GRACE])
LATEST = st.integers(0, 3)  # which of the latest ids a request names: 0 is the latest


def pick(ids: list[str], which: int, otherwise: str) -> str:
    return ids[-1 - which % len(ids)] if ids else otherwise


class LedgerMachine(RuleBasedStateMachine):
    """Requests are queued by some rules and applied, a batch at a time, by ``drain``."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.queue: list[Request] = []
        self.sent: dict[str, Request] = {}  # every request queued, by id
        self.hold_ids: list[str] = []  # every hold requested, granted or not
        self.order_ids: list[str] = []  # every order requested, created or not
        self.owners: dict[str, str | None] = {}  # hold id -> the customer who asked for it
        self.keyed: list[Request] = []  # the first request of each key
        self.stocked = 0  # initial stock plus every restock answered 200
        self.answered: dict[str, Result] = {}
        self.final_orders: dict[str, tuple[str, int | None]] = {}
        self.final_webhooks: dict[str, WebhookState] = {}
        self.tokens = False

    @initialize(stock=st.integers(0, 20), limit=st.sampled_from([None, None, 3, 6]),
                tokens=st.booleans())
    def start(self, stock: int, limit: int | None, tokens: bool) -> None:
        """A product; maybe MAX_QTY_PER_CUSTOMER; maybe customer tokens (then every hold
        and order names its customer, and orders are checked against the hold's)."""
        self.store = Store(ProductState(id=PID, name="Widget", price_cents=PRICE,
                                        currency="USD", stock=stock, reserved=0), policy(limit))
        self.model = Model(stock, limit)
        self.stocked = stock
        self.tokens = tokens

    def send(self, op: str, args: dict[str, Any], idem: tuple[str, str] | None = None
             ) -> None:
        req = Request(id=f"job_{PID}_{len(self.sent) + 1:016x}", op=op, args=args, idem=idem)
        self.sent[req.id] = req
        self.queue.append(req)
        if idem is not None and idem[0] not in {r.idem[0] for r in self.keyed if r.idem}:
            self.keyed.append(req)

    def fresh_key(self) -> str:
        return f"k{len(self.sent) + 1}"

    def send_hold(self, qty: int, customer: str | None, key: str | None) -> None:
        if self.tokens or self.model.limit is not None:  # the gateway insists on one
            customer = customer or CUSTOMERS[0]
        hold_id = f"hold_{PID}_{len(self.sent) + 1:016x}"
        self.hold_ids.append(hold_id)
        self.owners[hold_id] = customer
        args = {"product_id": PID, "qty": qty, "hold_id": hold_id}
        self.send("hold", args | ({"customer_id": customer} if customer else {}),
                  (f"holds:{key}", f"qty={qty}") if key else None)

    def send_order(self, hold_id: str, key: str | None, stranger: bool = False) -> None:
        order_id = keys.order_id_for(hold_id)
        self.order_ids.append(order_id)
        args = {"hold_id": hold_id, "order_id": order_id}
        if self.tokens:  # the token's customer: the hold's owner, or someone else
            owner = self.owners.get(hold_id) or CUSTOMERS[0]
            other = CUSTOMERS[1] if owner == CUSTOMERS[0] else CUSTOMERS[0]
            args["customer_id"] = other if stranger else owner
        self.send("order", args, (f"orders:{key}", f"hold={hold_id}") if key else None)

    def send_webhook(self, key: str, order_id: str, status: str) -> None:
        self.send("webhook", {"idempotency_key": key, "order_id": order_id, "status": status,
                              "fingerprint": f"{order_id}/{status}"},
                  (f"webhook:{key}", f"{order_id}/{status}"))

    # --- requests -------------------------------------------------------------------

    @rule(qty=st.integers(1, 8), customer=st.sampled_from([None, *CUSTOMERS]),
          keyed=st.booleans())
    def hold(self, qty: int, customer: str | None, keyed: bool) -> None:
        self.send_hold(qty, customer, self.fresh_key() if keyed else None)

    @rule(among=st.sampled_from(["granted", "requested", "unknown"]), which=LATEST,
          keyed=st.booleans(), stranger=st.booleans())
    def order(self, among: str, which: int, keyed: bool, stranger: bool) -> None:
        """An order on a hold that was granted (maybe ordered or expired since), on one
        that was asked for (maybe refused), or on one that never existed; with tokens,
        maybe by another customer than the hold's."""
        holds = {"granted": list(self.model.holds), "requested": self.hold_ids}.get(among, [])
        self.send_order(pick(holds, which, UNKNOWN_HOLD), self.fresh_key() if keyed else None,
                        stranger)

    @rule(among=st.sampled_from(["created", "requested", "held", "never"]), which=LATEST,
          status=STATUSES, tag=st.sampled_from("abc"))
    def webhook(self, among: str, which: int, status: str, tag: str) -> None:
        """A payment event for an order that exists, one asked for (maybe refused), the
        order a hold may still become, or one that will never exist. Keys are unique, and
        (by ``tag``) not in the order they arrive."""
        order_ids = {"created": list(self.model.orders), "requested": self.order_ids,
                     "held": [keys.order_id_for(h) for h in self.hold_ids]}.get(among, [])
        self.send_webhook(f"evt_{tag}{len(self.sent) + 1}", pick(order_ids, which, NEVER_ORDER),
                          status)

    @rule(qty=st.integers(1, 4), customer=st.sampled_from(CUSTOMERS), status=STATUSES,
          tag=st.sampled_from("abc"), webhook_first=st.booleans())
    def checkout(self, qty: int, customer: str, status: str, tag: str,
                 webhook_first: bool) -> None:
        """A whole purchase: hold, order, and the payment event (maybe ahead of the order)."""
        self.send_hold(qty, customer, None)
        order_id = keys.order_id_for(self.hold_ids[-1])
        if webhook_first:
            self.send_webhook(f"evt_{tag}{len(self.sent) + 1}", order_id, status)
        self.send_order(self.hold_ids[-1], None)
        if not webhook_first:
            self.send_webhook(f"evt_{tag}{len(self.sent) + 1}", order_id, status)

    @precondition(lambda self: self.keyed)
    @rule(which=LATEST, same_body=st.booleans())
    def again(self, which: int, same_body: bool) -> None:
        """A request sent again under its key: with the same body (the client or payment
        provider lost the answer) or, wrongly, with another body."""
        first = self.keyed[-1 - which % len(self.keyed)]
        assert first.idem is not None
        key = first.idem[0].split(":", 1)[1]
        if first.op == "hold":
            qty = int(first.args["qty"])
            self.send_hold(qty if same_body else qty % 8 + 1, first.args.get("customer_id"),
                           key)
        elif first.op == "order":
            hold_id = str(first.args["hold_id"])
            other = UNKNOWN_HOLD if hold_id != UNKNOWN_HOLD else OTHER_HOLD
            self.send_order(hold_id if same_body else other, key)
        else:
            status = str(first.args["status"])
            other = "failed" if status == "paid" else "paid"
            self.send_webhook(key, str(first.args["order_id"]), status if same_body else other)

    @rule(qty=st.integers(1, 5), near_the_limit=st.integers(0, 3))
    def restock(self, qty: int, near_the_limit: int) -> None:
        """A few units, or (1 time in 4) about enough to reach MAX_STOCK: qty - 3 beyond."""
        if near_the_limit == 0:
            qty = min(max(MAX_STOCK - self.model.stock + qty - 3, 1), MAX_STOCK)
        self.send("restock", {"product_id": PID, "qty": qty})

    @rule(op=st.sampled_from(["expire", "retry_webhooks"]))
    def scheduler(self, op: str) -> None:
        self.send(op, {})

    @precondition(lambda self: self.store.requests)
    @rule(which=st.integers(0, 1_000))
    def replay(self, which: int) -> None:
        """A drainer that crashed after the commit: the next one applies it again."""
        request_ids = sorted(self.store.requests)
        self.queue.append(self.sent[request_ids[which % len(request_ids)]])

    # --- time -----------------------------------------------------------------------

    @rule(ms=TICKS)
    def tick(self, ms: int) -> None:
        self.now += ms

    @precondition(lambda self: self.deadlines())
    @rule(which=st.integers(0, 1_000), early=st.booleans())
    def tick_to_deadline(self, which: int, early: bool) -> None:
        """The clock stops exactly at (or just before) a deadline: a hold's expiry, an
        order's pay_by, the moment a webhook waiting for an unknown order is given up."""
        deadlines = self.deadlines()
        self.now = max(self.now, deadlines[which % len(deadlines)] - int(early))

    def deadlines(self) -> list[int]:
        orphaned = HOLD_TTL + ORPHAN_GRACE + 1
        return sorted({h["expires_at"] for h in self.model.holds.values()
                       if h["status"] == ACTIVE and h["expires_at"] > self.now} |
                      {o["pay_by"] for o in self.model.orders.values()
                       if o["status"] == PENDING and o["pay_by"] > self.now} |
                      {w["received_at"] + orphaned for w in self.model.webhooks.values()
                       if w["outcome"] == "pending" and w["received_at"] + orphaned > self.now})

    # --- a batch --------------------------------------------------------------------

    @precondition(lambda self: self.queue)
    @rule(size=st.integers(1, 8))
    def drain(self, size: int) -> None:
        """One batch, as the drainer applies it: load, decide, write."""
        batch, self.queue = self.queue[:size], self.queue[size:]
        committed = dict(self.store.requests)
        ledger = self.store.load(self.now, batch)
        todo = [r for r in batch if r.id not in ledger.results]
        answers = ledger.apply(todo)
        self.store.write(ledger, todo)
        results = {r.id: ledger.results.get(r.id) or answers[r.id] for r in batch}

        expected = self.model.run(batch, self.now, committed)
        for req in batch:
            self.check_answer(req, results[req.id], expected[req.id])
            self.answered.setdefault(req.id, results[req.id])
            if req.op == "restock" and req.id in answers and results[req.id].status == 200:
                self.stocked += req.args["qty"]
        if any(r.op == "expire" for r in todo):
            self.check_released()

    def teardown(self) -> None:
        """Every queued request gets its answer, and the invariants still hold."""
        while self.queue:
            self.drain(8)
        for check in (self.counters_stay_in_bounds,
                      self.reserved_is_what_holds_and_unpaid_orders_take,
                      self.sold_plus_stock_is_everything_stocked, self.one_order_per_hold,
                      self.customers_stay_within_their_limit,
                      self.final_orders_and_settled_webhooks_never_change,
                      self.state_agrees_with_the_model, self.views_follow_the_clock):
            check()

    def check_answer(self, req: Request, actual: Result, expect: Expect) -> None:
        where = f"{req.op} {req.args} idem={req.idem} at +{self.now - NOW} ms"
        if expect.result is not None:
            assert actual == expect.result, f"replayed {where}: {actual} != {expect.result}"
        elif expect.same_as is not None:
            first = self.answered[expect.same_as]
            assert actual == first, f"{where}: {actual} is not the first answer {first}"
        else:
            body = actual.body if expect.exact else \
                {k: actual.body.get(k) for k in expect.body}
            assert (actual.status, body) == (expect.status, expect.body), \
                f"{where}: got {actual}, the model says {expect}"

    def check_released(self) -> None:
        """After ``expire``, nothing whose time is up still holds units."""
        late_holds = [h.id for h in self.store.holds.values()
                      if h.status == ACTIVE and h.expires_at <= self.now]
        late_orders = [o.id for o in self.store.orders.values()
                       if o.status == PENDING and o.pay_by <= self.now]
        assert late_holds == [] and late_orders == [], (late_holds, late_orders)

    # --- invariants -----------------------------------------------------------------

    @invariant()
    def counters_stay_in_bounds(self) -> None:
        prod = self.store.product
        assert prod.stock >= 0 and prod.reserved >= 0
        assert prod.reserved <= prod.stock  # available = stock - reserved >= 0
        assert prod.view()["available"] == prod.stock - prod.reserved
        assert prod.stock <= MAX_STOCK

    @invariant()
    def reserved_is_what_holds_and_unpaid_orders_take(self) -> None:
        held = sum(h.qty for h in self.store.holds.values() if h.status == ACTIVE)
        unpaid = sum(o.qty for o in self.store.orders.values() if o.status == PENDING)
        assert self.store.product.reserved == held + unpaid

    @invariant()
    def sold_plus_stock_is_everything_stocked(self) -> None:
        sold = sum(o.qty for o in self.store.orders.values() if o.status == PAID)
        assert sold + self.store.product.stock == self.stocked

    @invariant()
    def one_order_per_hold(self) -> None:
        by_hold = {o.hold_id: o for o in self.store.orders.values()}
        assert len(by_hold) == len(self.store.orders)
        converted = {h.id for h in self.store.holds.values() if h.status == CONVERTED}
        assert converted == set(by_hold)
        for hold_id, order in by_hold.items():
            hold = self.store.holds[hold_id]
            assert (order.qty, order.customer_id) == (hold.qty, hold.customer_id)
            assert order.amount_cents == order.qty * PRICE

    @invariant()
    def customers_stay_within_their_limit(self) -> None:
        limit = self.store.policy.max_qty_per_customer
        units = dict.fromkeys(CUSTOMERS, 0)
        for hold in self.store.holds.values():
            if hold.customer_id and hold.is_active(self.now):
                units[hold.customer_id] += hold.qty
        for order in self.store.orders.values():
            if order.customer_id and (order.status == PAID or order.is_pending(self.now)):
                units[order.customer_id] += order.qty
        assert limit is None or max(units.values()) <= limit, units

    @invariant()
    def final_orders_and_settled_webhooks_never_change(self) -> None:
        for order in self.store.orders.values():
            if order.status != PENDING:
                first = self.final_orders.setdefault(order.id, (order.status, order.closed_at))
                assert (order.status, order.closed_at) == first, order
        for hook in self.store.webhooks.values():
            if hook.outcome != "pending":
                assert self.final_webhooks.setdefault(hook.key, replace(hook)) == hook

    @invariant()
    def state_agrees_with_the_model(self) -> None:
        prod, model = self.store.product, self.model
        assert (prod.stock, prod.reserved) == (model.stock, model.reserved)
        assert {k: h.status for k, h in self.store.holds.items()} == \
            {k: h["status"] for k, h in model.holds.items()}
        assert {k: o.status for k, o in self.store.orders.items()} == \
            {k: o["status"] for k, o in model.orders.items()}
        assert {k: (w.outcome, w.response, w.refund_due)
                for k, w in self.store.webhooks.items()} == \
            {k: (w["outcome"], Result(*w["response"]), w["refund_due"])
             for k, w in model.webhooks.items()}
        for key, hook in model.webhooks.items():  # the job result follows the webhook
            assert self.store.requests[hook["request"]] == Result(*hook["response"]), key

    @invariant()
    def views_follow_the_clock(self) -> None:
        """A hold or order past its deadline is never shown active or pending_payment."""
        for hold in self.store.holds.values():
            assert hold.view(self.now)["status"] == self.model.hold_status(hold.id, self.now)
        for order in self.store.orders.values():
            assert order.view(self.now) == self.model.order_view(order.id, self.now)


def test_ledger_agrees_with_the_model() -> None:
    run_state_machine_as_test(LedgerMachine, settings=SETTINGS)


# --- found by the model: minimal examples (they fail until the behaviour is fixed) ------

def machine(stock: int) -> LedgerMachine:
    m = LedgerMachine()
    m.start(stock=stock, limit=None, tokens=False)
    return m


def test_webhooks_waiting_for_one_order_are_applied_in_arrival_order() -> None:
    """``paid`` then ``failed`` for one order, in one batch, before the order: both wait
    with the same ``received_at``, and ``_apply_pending_webhooks`` (sorted by received_at
    only) applies them in the order ``_load`` read them. On InnoDB that is index order, by
    idempotency_key: ``failed`` first, the order is cancelled and the payment refunded."""
    m = machine(stock=1)
    m.send_hold(1, None, None)
    m.drain(1)
    hold_id = m.hold_ids[-1]
    order_id = keys.order_id_for(hold_id)
    m.send_webhook("evt_b", order_id, "paid")
    m.send_webhook("evt_a", order_id, "failed")
    m.drain(2)
    m.send_order(hold_id, None)
    m.drain(1)

    hooks = m.store.webhooks
    assert (m.store.orders[order_id].status, hooks["evt_b"].outcome, hooks["evt_a"].outcome,
            hooks["evt_b"].refund_due) == (PAID, "applied", "ignored", False)
    m.teardown()


def test_a_redelivered_webhook_does_not_jump_the_queue_of_its_order() -> None:
    """The same race without help from the database's row order: the batch that creates
    the order also carries a redelivery of the second webhook, which ``_load`` reads first
    (by key), so it is applied first."""
    m = machine(stock=1)
    m.send_hold(1, None, None)
    m.drain(1)
    hold_id = m.hold_ids[-1]
    order_id = keys.order_id_for(hold_id)
    m.send_webhook("evt_1", order_id, "paid")
    m.send_webhook("evt_2", order_id, "failed")
    m.drain(2)
    m.send_order(hold_id, None)
    m.send_webhook("evt_2", order_id, "failed")  # the provider delivers evt_2 again
    m.drain(2)

    hooks = m.store.webhooks
    assert (m.store.orders[order_id].status, hooks["evt_1"].outcome, hooks["evt_2"].outcome,
            hooks["evt_1"].refund_due) == (PAID, "applied", "ignored", False)
    m.teardown()


def test_a_webhook_key_sent_twice_in_a_batch_still_finds_its_order() -> None:
    """A key that comes twice in one batch with different bodies: ``_load`` must load the
    orders (and holds) of both bodies, or a ``paid`` webhook for an existing order would
    be stored pending (202). (Found by this model; ``_load`` once kept one per key.)"""
    m = machine(stock=1)
    m.send_hold(1, None, None)
    m.send_order(m.hold_ids[-1], None)
    m.drain(2)
    order_id = keys.order_id_for(m.hold_ids[-1])
    m.send_webhook("evt_x", order_id, "paid")
    m.send_webhook("evt_x", NEVER_ORDER, "paid")  # the same key with another body: 422
    m.drain(2)  # the model: 200 applied, the order paid

    assert m.store.orders[order_id].status == PAID
    m.teardown()


def test_giving_up_on_an_order_gives_up_on_all_its_webhooks() -> None:
    """A webhook for an order whose hold ended unconverted is ignored at once, and so
    should every other webhook waiting for that order; but ``_load`` reads only the
    arriving webhook's key, so the earlier ones stay pending (until the next expire)."""
    m = machine(stock=1)
    m.send_hold(1, None, None)
    m.drain(1)
    order_id = keys.order_id_for(m.hold_ids[-1])
    m.send_webhook("evt_1", order_id, "paid")
    m.drain(1)  # 202 pending: the order may still come
    m.now += HOLD_TTL  # it will not: the hold's time is up (no expire has run yet)
    m.send_webhook("evt_2", order_id, "failed")
    m.drain(1)  # 200 ignored

    first = m.store.webhooks["evt_1"]
    assert (first.outcome, first.refund_due) == ("ignored", True)
    m.teardown()
