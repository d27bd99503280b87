"""The Ledger's decisions on one product partition: pure logic, no Redis, no database.

Every test checks the counters (``stock``, ``reserved``) and what the Ledger recorded for
the writer (``new_*``, ``dirty_*``), not just the answer.
"""

from __future__ import annotations

from typing import Any

from flashsale.clock import rfc3339
from flashsale.limits import MAX_STOCK
from flashsale.problems import HOLD_EXPIRED, IDEMPOTENCY_REUSED, INSUFFICIENT_STOCK
from models.tables import HoldStatus, OrderStatus
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
POLICY = Policy(hold_ttl_ms=HOLD_TTL, order_ttl_ms=ORDER_TTL)
PRICE = 1999
PID = 1


# --- builders ---------------------------------------------------------------------------

def product(stock: int = 10, reserved: int = 0) -> ProductState:
    return ProductState(id=PID, name="Widget", price_cents=PRICE, currency="USD",
                        stock=stock, reserved=reserved)


def ledger(prod: ProductState | None = None, **state: Any) -> Ledger:
    return Ledger(product=prod if prod is not None else product(), now=NOW, policy=POLICY,
                  **state)


def hold_req(rid: str, qty: int, hold_id: str | None = None,
             idem: tuple[str, str] | None = None) -> Request:
    return Request(id=rid, op="hold", idem=idem,
                   args={"product_id": PID, "qty": qty, "hold_id": hold_id or f"hold-{rid}"})


def order_req(rid: str, hold_id: str, order_id: str | None = None,
              idem: tuple[str, str] | None = None) -> Request:
    return Request(id=rid, op="order", idem=idem,
                   args={"hold_id": hold_id, "order_id": order_id or f"ord-{rid}"})


def webhook_req(rid: str, key: str, order_id: str, status: str = "paid",
                fingerprint: str | None = None) -> Request:
    fp = fingerprint or f"fp-{order_id}-{status}"
    return Request(id=rid, op="webhook", idem=(f"webhook:{key}", fp),
                   args={"idempotency_key": key, "order_id": order_id, "status": status,
                         "fingerprint": fp})


def stored_hold(hold_id: str, qty: int, created_at: int = NOW - 1_000,
                status: str = HoldStatus.ACTIVE, order_id: str | None = None) -> HoldState:
    return HoldState(id=hold_id, product_id=PID, qty=qty, status=status,
                     created_at=created_at, expires_at=created_at + HOLD_TTL,
                     request_id=f"req-{hold_id}", order_id=order_id)


def stored_order(order_id: str, hold_id: str, qty: int, created_at: int = NOW - 1_000,
                 status: str = OrderStatus.PENDING_PAYMENT) -> OrderState:
    return OrderState(id=order_id, hold_id=hold_id, product_id=PID, qty=qty,
                      amount_cents=qty * PRICE, currency="USD", status=status,
                      created_at=created_at, pay_by=created_at + ORDER_TTL,
                      request_id=f"req-{order_id}")


def state(lg: Ledger) -> ProductState:
    assert lg.product is not None
    return lg.product


def counters(lg: Ledger) -> tuple[int, int]:
    """(stock, reserved) as the batch leaves them."""
    return state(lg).stock, state(lg).reserved


def with_pending_order(qty: int = 2, stock: int = 10, created_at: int = NOW - 1_000,
                       status: str = OrderStatus.PENDING_PAYMENT) -> Ledger:
    """A partition with one converted hold whose order is loaded (units reserved)."""
    hold = stored_hold("h1", qty, created_at=created_at, status=HoldStatus.CONVERTED,
                       order_id="o1")
    order = stored_order("o1", "h1", qty, created_at=created_at, status=status)
    reserved = qty if status == OrderStatus.PENDING_PAYMENT else 0
    return ledger(product(stock=stock, reserved=reserved), holds={"h1": hold},
                  orders={"o1": order})


# --- holds ------------------------------------------------------------------------------

def test_hold_granted_reserves_units_and_records_the_new_hold() -> None:
    lg = ledger(product(stock=10))

    result = lg.apply([hold_req("r1", 3, hold_id="h1")])["r1"]

    assert result == Result(201, {"hold_id": "h1", "product_id": PID, "qty": 3,
                                  "status": "active", "expires_at": rfc3339(NOW + HOLD_TTL)})
    assert (*counters(lg), state(lg).available) == (10, 3, 7)
    assert lg.product_dirty
    assert [(h.id, h.qty, h.status, h.request_id) for h in lg.new_holds] == \
        [("h1", 3, HoldStatus.ACTIVE, "r1")]


def test_hold_refused_names_the_available_units() -> None:
    lg = ledger(product(stock=10, reserved=8))

    result = lg.apply([hold_req("r1", 3)])["r1"]

    assert result.status == 409
    assert result.body["title"] == INSUFFICIENT_STOCK
    assert result.body["available"] == 2
    assert state(lg).reserved == 8
    assert lg.new_holds == []
    assert not lg.product_dirty


def test_holds_granted_in_order_until_stock_runs_out() -> None:
    lg = ledger(product(stock=5))

    answers = lg.apply([hold_req(f"r{i}", 2) for i in range(1, 5)])

    assert [answers[f"r{i}"].status for i in range(1, 5)] == [201, 201, 409, 409]
    assert answers["r3"].body["available"] == 1
    assert [h.request_id for h in lg.new_holds] == ["r1", "r2"]
    assert counters(lg) == (5, 4)


def test_a_larger_hold_is_refused_while_a_later_smaller_one_is_granted() -> None:
    lg = ledger(product(stock=5))

    answers = lg.apply([hold_req("r1", 4), hold_req("r2", 3), hold_req("r3", 1)])

    assert [answers[r].status for r in ("r1", "r2", "r3")] == [201, 409, 201]
    assert answers["r2"].body["available"] == 1
    assert [h.request_id for h in lg.new_holds] == ["r1", "r3"]
    assert (state(lg).reserved, state(lg).available) == (5, 0)


def test_hold_on_an_unknown_product_is_404() -> None:
    lg = Ledger(product=None, now=NOW, policy=POLICY)

    result = lg.apply([hold_req("r1", 1)])["r1"]

    assert result.status == 404
    assert lg.new_holds == []


# --- orders -----------------------------------------------------------------------------

def test_order_from_an_active_hold_converts_it_and_keeps_the_units_reserved() -> None:
    lg = ledger(product(stock=10, reserved=3), holds={"h1": stored_hold("h1", 3)})

    result = lg.apply([order_req("r1", "h1", order_id="o1")])["r1"]

    assert result == Result(201, {
        "order_id": "o1", "hold_id": "h1", "product_id": PID, "qty": 3,
        "amount_cents": 3 * PRICE, "currency": "USD", "status": "pending_payment",
        "pay_by": rfc3339(NOW + ORDER_TTL)})
    hold = lg.holds["h1"]
    assert (hold.status, hold.order_id) == (HoldStatus.CONVERTED, "o1")
    assert lg.dirty_holds == {"h1"}
    assert [(o.id, o.request_id) for o in lg.new_orders] == [("o1", "r1")]
    assert counters(lg) == (10, 3)


def test_second_order_for_the_same_hold_in_the_same_batch_returns_the_same_order() -> None:
    lg = ledger(product(stock=10, reserved=2), holds={"h1": stored_hold("h1", 2)})

    answers = lg.apply([order_req("r1", "h1", order_id="o1"),
                        order_req("r2", "h1", order_id="o2")])

    assert answers["r1"].status == 201
    assert answers["r2"] == Result(200, answers["r1"].body)
    assert [o.id for o in lg.new_orders] == ["o1"]
    assert state(lg).reserved == 2


def test_second_order_for_a_converted_hold_returns_the_stored_order() -> None:
    lg = with_pending_order(qty=2, created_at=NOW - HOLD_TTL - 1)  # the hold's time is up

    result = lg.apply([order_req("r9", "h1", order_id="o9")])["r9"]

    assert result == Result(200, lg.orders["o1"].view(NOW))
    assert result.body["order_id"] == "o1"
    assert lg.new_orders == [] and lg.dirty_holds == set()
    assert state(lg).reserved == 2


def test_order_on_an_expired_hold_is_409_and_releases_its_units() -> None:
    created = NOW - HOLD_TTL - 5_000
    lg = ledger(product(stock=10, reserved=4), holds={"h1": stored_hold("h1", 4, created)})

    result = lg.apply([order_req("r1", "h1")])["r1"]

    assert result.status == 409
    assert result.body["title"] == HOLD_EXPIRED
    assert lg.holds["h1"].status == HoldStatus.EXPIRED
    assert lg.dirty_holds == {"h1"}
    assert lg.new_orders == []
    assert counters(lg) == (10, 0)


def test_order_on_a_hold_expiring_exactly_now_is_refused() -> None:
    lg = ledger(product(stock=10, reserved=1),
                holds={"h1": stored_hold("h1", 1, created_at=NOW - HOLD_TTL)})

    assert lg.apply([order_req("r1", "h1")])["r1"].status == 409
    assert state(lg).reserved == 0


def test_order_on_an_already_released_hold_does_not_release_twice() -> None:
    created = NOW - HOLD_TTL - 5_000
    lg = ledger(product(stock=10, reserved=0),
                holds={"h1": stored_hold("h1", 4, created, status=HoldStatus.EXPIRED)})

    result = lg.apply([order_req("r1", "h1")])["r1"]

    assert result.status == 409
    assert state(lg).reserved == 0
    assert lg.dirty_holds == set()


def test_order_on_an_unknown_hold_is_404() -> None:
    lg = ledger(product(stock=10))

    result = lg.apply([order_req("r1", "nope")])["r1"]

    assert result.status == 404
    assert lg.new_orders == [] and not lg.product_dirty


# --- webhooks ---------------------------------------------------------------------------

def test_paid_webhook_sells_the_units() -> None:
    lg = with_pending_order(qty=2, stock=10)

    result = lg.apply([webhook_req("w1", "evt1", "o1", "paid")])["w1"]

    assert result == Result(200, {"idempotency_key": "evt1", "order_id": "o1",
                                  "outcome": "applied", "order_status": "paid"})
    assert counters(lg) == (8, 0)
    assert lg.orders["o1"].status == OrderStatus.PAID
    assert lg.orders["o1"].closed_at == NOW
    assert lg.dirty_orders == {"o1"}
    assert [(h.key, h.outcome) for h in lg.new_webhooks] == [("evt1", "applied")]


def test_failed_webhook_cancels_the_order_and_releases_the_units() -> None:
    lg = with_pending_order(qty=2, stock=10)

    result = lg.apply([webhook_req("w1", "evt1", "o1", "failed")])["w1"]

    assert result.status == 200
    assert (result.body["outcome"], result.body["order_status"]) == ("applied", "cancelled")
    assert counters(lg) == (10, 0)
    assert lg.orders["o1"].status == OrderStatus.CANCELLED
    assert lg.dirty_orders == {"o1"}


def test_duplicate_webhook_with_the_same_body_gets_the_identical_response() -> None:
    lg = with_pending_order(qty=2, stock=10)

    answers = lg.apply([webhook_req("w1", "evt1", "o1"), webhook_req("w2", "evt1", "o1")])

    assert answers["w2"] == answers["w1"]
    assert answers["w1"].body["outcome"] == "applied"
    assert counters(lg) == (8, 0)
    assert [h.request_id for h in lg.new_webhooks] == ["w1"]


def test_duplicate_webhook_of_an_earlier_batch_gets_the_stored_response() -> None:
    lg = with_pending_order(qty=2, stock=10, status=OrderStatus.PAID)
    first = Result(200, {"idempotency_key": "evt1", "order_id": "o1", "outcome": "applied",
                         "order_status": "paid"})
    lg.webhooks["evt1"] = WebhookState(
        key="evt1", order_id="o1", product_id=PID, status="paid", fingerprint="fp-o1-paid",
        request_id="w1", received_at=NOW - 10, outcome="applied", response=first)
    replay = webhook_req("w2", "evt1", "o1")

    result = lg.apply([Request(id=replay.id, op=replay.op, args=replay.args)])["w2"]

    assert result == first
    assert lg.new_webhooks == [] and lg.dirty_webhooks == set() and not lg.product_dirty


def test_webhook_key_reused_with_a_different_body_is_422() -> None:
    lg = with_pending_order(qty=2, stock=10)

    answers = lg.apply([webhook_req("w1", "evt1", "o1", "paid"),
                        webhook_req("w2", "evt1", "o1", "failed")])

    assert answers["w2"].status == 422
    assert answers["w2"].body["title"] == IDEMPOTENCY_REUSED
    assert lg.orders["o1"].status == OrderStatus.PAID
    assert counters(lg) == (8, 0)


def test_webhook_before_its_order_is_pending_then_applied_when_the_order_arrives() -> None:
    lg = ledger(product(stock=10, reserved=2), holds={"h1": stored_hold("h1", 2)})
    hook = webhook_req("w1", "evt1", "o1", "paid")

    before_order = lg.apply([hook])["w1"]
    answers = lg.apply([order_req("r1", "h1", order_id="o1")])

    assert before_order == Result(202, {"idempotency_key": "evt1", "order_id": "o1",
                                        "outcome": "pending"})
    assert answers["r1"].status == 201
    assert answers["w1"] == Result(200, {"idempotency_key": "evt1", "order_id": "o1",
                                         "outcome": "applied", "order_status": "paid"})
    assert lg.orders["o1"].status == OrderStatus.PAID
    assert counters(lg) == (8, 0)


def test_webhook_and_later_order_in_one_batch_answer_the_applied_outcome() -> None:
    lg = ledger(product(stock=10, reserved=2), holds={"h1": stored_hold("h1", 2)})

    answers = lg.apply([webhook_req("w1", "evt1", "o1", "paid"),
                        order_req("r1", "h1", order_id="o1")])

    assert answers["w1"].status == 200
    assert answers["w1"].body["outcome"] == "applied"
    assert [(h.key, h.outcome) for h in lg.new_webhooks] == [("evt1", "applied")]
    assert counters(lg) == (8, 0)


def test_pending_webhook_of_an_earlier_batch_is_settled_and_its_result_revised() -> None:
    pending = WebhookState(key="evt1", order_id="o1", product_id=PID, status="paid",
                           fingerprint="fp", request_id="w1", received_at=NOW - 500,
                           response=Result(202, {"outcome": "pending"}))
    lg = ledger(product(stock=10, reserved=2), holds={"h1": stored_hold("h1", 2)},
                webhooks={"evt1": pending})

    lg.apply([order_req("r1", "h1", order_id="o1")])

    assert lg.webhook_updates() == [pending]
    assert pending.outcome == "applied" and pending.applied_at == NOW
    assert lg.revised_results() == {"w1": Result(200, {
        "idempotency_key": "evt1", "order_id": "o1", "outcome": "applied",
        "order_status": "paid"})}
    assert counters(lg) == (8, 0)


def test_duplicate_of_a_pending_webhook_applied_in_the_same_batch_answers_applied() -> None:
    """API.md: a pending webhook that has since been applied answers with its applied result."""
    lg = ledger(product(stock=10, reserved=2), holds={"h1": stored_hold("h1", 2)})

    answers = lg.apply([webhook_req("w1", "evt1", "o1"), order_req("r1", "h1", order_id="o1"),
                        webhook_req("w2", "evt1", "o1")])

    assert answers["w1"].body["outcome"] == "applied"
    assert answers["w2"] == answers["w1"]
    assert counters(lg) == (8, 0)


def test_paid_after_the_payment_deadline_is_ignored_and_listed_for_refund() -> None:
    lg = with_pending_order(qty=2, stock=10, created_at=NOW - ORDER_TTL - 1)

    result = lg.apply([webhook_req("w1", "evt1", "o1", "paid")])["w1"]

    assert result.body == {"idempotency_key": "evt1", "order_id": "o1", "outcome": "ignored",
                           "order_status": "cancelled"}
    assert lg.new_webhooks[0].refund_due
    assert lg.orders["o1"].status == OrderStatus.CANCELLED
    assert counters(lg) == (10, 0)


def test_webhook_on_a_paid_order_is_ignored_and_changes_nothing() -> None:
    lg = with_pending_order(qty=2, stock=8, status=OrderStatus.PAID)

    result = lg.apply([webhook_req("w1", "evt2", "o1", "failed")])["w1"]

    assert (result.body["outcome"], result.body["order_status"]) == ("ignored", "paid")
    assert not lg.new_webhooks[0].refund_due
    assert lg.dirty_orders == set() and not lg.product_dirty
    assert counters(lg) == (8, 0)


def test_webhook_for_an_unknown_order_stays_pending() -> None:
    lg = ledger(product(stock=10))

    result = lg.apply([webhook_req("w1", "evt1", "o-unknown")])["w1"]

    assert result == Result(202, {"idempotency_key": "evt1", "order_id": "o-unknown",
                                  "outcome": "pending"})
    assert [(h.key, h.outcome) for h in lg.new_webhooks] == [("evt1", "pending")]
    assert not lg.product_dirty


# --- expiry and restock -----------------------------------------------------------------

def test_expire_releases_expired_holds_and_overdue_orders_only() -> None:
    old = NOW - ORDER_TTL - 1
    holds = {"h-old": stored_hold("h-old", 3, created_at=NOW - HOLD_TTL - 1),
             "h-live": stored_hold("h-live", 1),
             "h-conv": stored_hold("h-conv", 2, created_at=old, status=HoldStatus.CONVERTED,
                                   order_id="o-old"),
             "h-conv2": stored_hold("h-conv2", 4, status=HoldStatus.CONVERTED,
                                    order_id="o-live")}
    orders = {"o-old": stored_order("o-old", "h-conv", 2, created_at=old),
              "o-live": stored_order("o-live", "h-conv2", 4)}
    lg = ledger(product(stock=20, reserved=10), holds=holds, orders=orders)

    result = lg.apply([Request(id="x1", op="expire", args={})])["x1"]

    assert result == Result(200, {"expired_holds": 1, "cancelled_orders": 1})
    assert counters(lg) == (20, 5)
    assert lg.holds["h-old"].status == HoldStatus.EXPIRED
    assert lg.holds["h-live"].status == HoldStatus.ACTIVE
    assert lg.orders["o-old"].status == OrderStatus.CANCELLED
    assert lg.orders["o-live"].status == OrderStatus.PENDING_PAYMENT
    assert lg.dirty_holds == {"h-old"}
    assert lg.dirty_orders == {"o-old"}


def test_restock_adds_units_and_answers_the_product() -> None:
    lg = ledger(product(stock=3, reserved=3))

    result = lg.apply([Request(id="x1", op="restock", args={"product_id": PID, "qty": 5})])

    assert result["x1"] == Result(200, {"id": PID, "name": "Widget", "price_cents": PRICE,
                                        "currency": "USD", "stock": 8, "available": 5})
    assert counters(lg) == (8, 3)
    assert lg.product_dirty


def test_unknown_operation_is_a_400() -> None:
    lg = ledger(product(stock=3))

    assert lg.apply([Request(id="x1", op="bogus", args={})])["x1"].status == 400
    assert not lg.product_dirty


# --- replays and idempotency ------------------------------------------------------------

def test_replayed_request_returns_its_committed_result_and_changes_nothing() -> None:
    committed = Result(201, {"hold_id": "h1", "qty": 2})
    lg = ledger(product(stock=10, reserved=2), results={"r1": committed})

    answers = lg.apply([hold_req("r1", 2, hold_id="h1")])

    assert answers["r1"] is committed
    assert counters(lg) == (10, 2)
    assert lg.new_holds == [] and not lg.product_dirty and lg.new_idempotency == {}


def test_idempotency_key_of_an_earlier_request_returns_its_first_result() -> None:
    first = Result(201, {"hold_id": "h1", "qty": 2})
    lg = ledger(product(stock=10, reserved=2), idempotency={"holds:k1": ("fp", "r1")},
                results={"r1": first})

    answers = lg.apply([hold_req("r2", 2, hold_id="h2", idem=("holds:k1", "fp"))])

    assert answers["r2"] == first
    assert lg.new_holds == [] and lg.new_idempotency == {} and not lg.product_dirty
    assert state(lg).reserved == 2


def test_idempotency_key_twice_in_one_batch_has_one_effect() -> None:
    lg = ledger(product(stock=10))

    answers = lg.apply([hold_req("r1", 2, idem=("holds:k1", "fp")),
                        hold_req("r2", 2, idem=("holds:k1", "fp"))])

    assert answers["r1"].status == 201
    assert answers["r2"] == answers["r1"]
    assert [h.request_id for h in lg.new_holds] == ["r1"]
    assert lg.new_idempotency == {"holds:k1": ("fp", "r1")}
    assert state(lg).reserved == 2


def test_idempotency_key_with_a_different_fingerprint_is_422() -> None:
    lg = ledger(product(stock=10, reserved=2), idempotency={"holds:k1": ("fp", "r1")},
                results={"r1": Result(201, {"hold_id": "h1"})})

    result = lg.apply([hold_req("r2", 3, idem=("holds:k1", "other"))])["r2"]

    assert result.status == 422
    assert result.body["title"] == IDEMPOTENCY_REUSED
    assert lg.new_holds == [] and lg.new_idempotency == {} and not lg.product_dirty


def test_a_refused_hold_is_remembered_under_its_idempotency_key() -> None:
    lg = ledger(product(stock=1))

    answers = lg.apply([hold_req("r1", 2, idem=("holds:k1", "fp")), hold_req("r2", 1),
                        hold_req("r3", 2, idem=("holds:k1", "fp"))])

    assert answers["r1"].status == 409
    assert answers["r3"] == answers["r1"]
    assert lg.new_idempotency == {"holds:k1": ("fp", "r1")}
    assert [h.request_id for h in lg.new_holds] == ["r2"]


# --- payments for orders that can never be created -------------------------------------

HOLD_ID, ORDER_ID = "hold_1_0123456789abcdef", "ord_1_0123456789abcdef"


def pending_paid(received_at: int = NOW - 500, order_id: str = ORDER_ID) -> WebhookState:
    return WebhookState(key="evt9", order_id=order_id, product_id=PID, status="paid",
                        fingerprint="fp", request_id="w9", received_at=received_at,
                        response=Result(202, {"outcome": "pending"}))


def test_an_order_refused_for_an_expired_hold_settles_its_early_payment_for_refund() -> None:
    expired = stored_hold(HOLD_ID, 2, created_at=NOW - HOLD_TTL - 1)
    hook = pending_paid()
    lg = ledger(product(stock=10, reserved=2), holds={HOLD_ID: expired},
                webhooks={"evt9": hook})

    answers = lg.apply([order_req("r1", HOLD_ID, order_id=ORDER_ID)])

    assert answers["r1"].status == 409
    assert (hook.outcome, hook.refund_due) == ("ignored", True)
    assert lg.revised_results() == {"w9": Result(200, {
        "idempotency_key": "evt9", "order_id": ORDER_ID, "outcome": "ignored"})}
    assert counters(lg) == (10, 0)


def test_expiry_of_a_hold_settles_payments_waiting_for_its_order() -> None:
    lg = ledger(product(stock=10, reserved=2),
                holds={HOLD_ID: stored_hold(HOLD_ID, 2, created_at=NOW - HOLD_TTL - 1)},
                webhooks={"evt9": pending_paid()})

    lg.apply([Request(id="x1", op="expire", args={})])

    assert lg.webhooks["evt9"].refund_due and lg.webhooks["evt9"].outcome == "ignored"


def test_a_payment_arriving_after_its_hold_expired_is_settled_at_once() -> None:
    lg = ledger(product(stock=10, reserved=2),
                holds={HOLD_ID: stored_hold(HOLD_ID, 2, created_at=NOW - HOLD_TTL - 1)})

    answer = lg.apply([webhook_req("w1", "evt1", ORDER_ID)])["w1"]

    assert answer == Result(200, {"idempotency_key": "evt1", "order_id": ORDER_ID,
                                  "outcome": "ignored"})
    assert lg.new_webhooks[0].refund_due


def test_a_failed_payment_for_an_order_never_created_is_due_no_refund() -> None:
    lg = ledger(product(stock=10, reserved=2),
                holds={HOLD_ID: stored_hold(HOLD_ID, 2, created_at=NOW - HOLD_TTL - 1)})

    lg.apply([webhook_req("w1", "evt1", ORDER_ID, status="failed")])

    assert lg.new_webhooks[0].outcome == "ignored" and not lg.new_webhooks[0].refund_due


def test_retry_settles_a_payment_for_an_unknown_order_only_after_the_grace() -> None:
    young = pending_paid(received_at=NOW - HOLD_TTL)
    old = WebhookState(key="evt8", order_id="ord_1_ffffffffffffffff", product_id=PID,
                       status="paid", fingerprint="fp", request_id="w8",
                       received_at=NOW - HOLD_TTL - POLICY.orphan_grace_ms - 1)
    lg = ledger(product(), webhooks={"evt9": young, "evt8": old})

    lg.apply([Request(id="x1", op="retry_webhooks", args={})])

    assert young.outcome == "pending"
    assert (old.outcome, old.refund_due) == ("ignored", True)


def test_retry_leaves_a_payment_whose_hold_is_still_active() -> None:
    hook = pending_paid()
    lg = ledger(product(stock=10, reserved=2), holds={HOLD_ID: stored_hold(HOLD_ID, 2)},
                webhooks={"evt9": hook})

    lg.apply([Request(id="x1", op="retry_webhooks", args={})])

    assert hook.outcome == "pending"


# --- bounds -----------------------------------------------------------------------------

def test_a_restock_past_the_stock_limit_is_refused_and_changes_nothing() -> None:
    lg = ledger(product(stock=MAX_STOCK - 3))

    answers = lg.apply([Request(id="r1", op="restock", args={"product_id": PID, "qty": 4}),
                        Request(id="r2", op="restock", args={"product_id": PID, "qty": 3})])

    assert answers["r1"].status == 409 and answers["r1"].body["limit"] == MAX_STOCK
    assert answers["r2"].status == 200
    assert counters(lg) == (MAX_STOCK, 0)


# --- customers --------------------------------------------------------------------------

LIMITED = Policy(hold_ttl_ms=HOLD_TTL, order_ttl_ms=ORDER_TTL, max_qty_per_customer=4)


def customer_hold(rid: str, qty: int, who: str) -> Request:
    return Request(id=rid, op="hold", args={"product_id": PID, "qty": qty,
                                            "hold_id": f"hold-{rid}", "customer_id": who})


def test_the_customer_limit_is_exact_in_queue_order() -> None:
    lg = Ledger(product=product(stock=100), now=NOW, policy=LIMITED,
                customer_units={"ann": 1, "bob": 0})

    answers = lg.apply([customer_hold("r1", 2, "ann"), customer_hold("r2", 2, "ann"),
                        customer_hold("r3", 1, "ann"), customer_hold("r4", 4, "bob")])

    assert [answers[r].status for r in ("r1", "r2", "r3", "r4")] == [201, 409, 201, 201]
    assert answers["r2"].body["title"] == "Customer limit reached"
    assert (answers["r2"].body["limit"], answers["r2"].body["held"]) == (4, 3)
    assert lg.customer_units == {"ann": 4, "bob": 4}
    assert counters(lg) == (100, 7)
    assert [h.customer_id for h in lg.new_holds] == ["ann", "ann", "bob"]


def test_a_failed_payment_gives_the_customer_its_units_back() -> None:
    lg = with_pending_order(qty=3)
    lg.policy = LIMITED
    lg.orders["o1"].customer_id = "ann"
    lg.customer_units = {"ann": 3}

    answers = lg.apply([customer_hold("r1", 2, "ann"), webhook_req("w1", "e1", "o1", "failed"),
                        customer_hold("r2", 2, "ann")])

    assert [answers[r].status for r in ("r1", "w1", "r2")] == [409, 200, 201]
    assert lg.customer_units == {"ann": 2}


def test_an_order_with_a_token_for_another_customers_hold_is_not_found() -> None:
    hold = stored_hold("h1", 2)
    hold.customer_id = "ann"
    lg = ledger(product(stock=10, reserved=2), holds={"h1": hold})

    answers = lg.apply([Request(id="r1", op="order", args={
        "hold_id": "h1", "order_id": "o1", "customer_id": "mallory"}),
        Request(id="r2", op="order", args={"hold_id": "h1", "order_id": "o1",
                                           "customer_id": "ann"})])

    assert answers["r1"].status == 404 and answers["r2"].status == 201
    assert answers["r2"].body["customer_id"] == "ann"
