"""Read-only views of holds, orders, products and job results, straight from the database.

The gateway calls these through its executor (each thread keeps its own connection);
the drainer builds its state with the same row converters.
"""

from __future__ import annotations

from typing import Any

import orjson
import peewee as pw

from flashsale.clock import now_ms
from models import Hold, Order, Product, RequestRecord, db
from workers.decide import HoldState, OrderState, ProductState


def hold_state(row: Hold) -> HoldState:
    return HoldState(id=row.id, product_id=row.product_id, qty=row.qty, status=row.status,
                     created_at=row.created_at, expires_at=row.expires_at,
                     request_id=row.request_id, customer_id=row.customer_id)


def order_state(row: Order) -> OrderState:
    return OrderState(id=row.id, hold_id=row.hold_id, product_id=row.product_id, qty=row.qty,
                      amount_cents=row.amount_cents, currency=row.currency, status=row.status,
                      created_at=row.created_at, pay_by=row.pay_by, request_id=row.request_id,
                      closed_at=row.closed_at, customer_id=row.customer_id)


def product_state(row: Product) -> ProductState:
    return ProductState(id=row.id, name=row.name, price_cents=row.price_cents,
                        currency=row.currency, stock=row.stock, reserved=row.reserved)


def hold_view(hold_id: str) -> dict[str, Any] | None:
    row = (Hold.select(Hold, Order.id.alias("order_id"))
           .join(Order, pw.JOIN.LEFT_OUTER, on=(Order.hold == Hold.id))
           .where(Hold.id == hold_id).objects().first())
    if row is None:
        return None
    hold = hold_state(row)
    hold.order_id = row.order_id
    return hold.view(now_ms())


def order_view(order_id: str) -> dict[str, Any] | None:
    row = Order.get_or_none(Order.id == order_id)
    return order_state(row).view(now_ms()) if row else None


def product_view(product_id: int) -> dict[str, Any] | None:
    row = Product.get_or_none(Product.id == product_id)
    return product_state(row).view() if row else None


def job_result(job_id: str) -> dict[str, Any] | None:
    """The committed result of a request, once Redis no longer has it."""
    row = RequestRecord.get_or_none(RequestRecord.id == job_id)
    return {"status": row.status_code, "body": orjson.loads(row.body)} if row else None


def ping() -> bool:
    db.execute_sql("SELECT 1")
    return True
