"""The schema is the final guard: MariaDB rejects a conflicting write made behind the
worker's back with an IntegrityError (the error ``workers.apply`` retries one by one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peewee as pw
import pytest

from flashsale.clock import now_ms
from models import (
    Hold,
    HoldStatus,
    IdempotencyRecord,
    Order,
    Product,
    RequestRecord,
    Webhook,
    atomic,
    db,
)
from workers import keys

pytestmark = pytest.mark.integration


def counters(pid: int) -> tuple[int, int]:
    row = Product.get_by_id(pid)
    return row.stock, row.reserved


def add_hold(pid: int, qty: int = 1, request_id: str | None = None) -> str:
    hold_id = keys.new_id("hold", pid)
    now = now_ms()
    Hold.create(id=hold_id, product=pid, qty=qty, status=HoldStatus.CONVERTED, created_at=now,
                expires_at=now + 120_000, request_id=request_id or keys.new_id("job", pid))
    return hold_id


def add_order(pid: int, hold_id: str, request_id: str | None = None) -> str:
    order_id = keys.new_id("ord", pid)
    now = now_ms()
    Order.create(id=order_id, hold=hold_id, product=pid, qty=1, amount_cents=1999,
                 currency="USD", status="pending_payment", created_at=now,
                 pay_by=now + 900_000, request_id=request_id or keys.new_id("job", pid))
    return order_id


def add_webhook(key: str, request_id: str | None = None) -> None:
    Webhook.create(idempotency_key=key, order_id="ord_1_0000000000000000", product_id=1,
                   status="paid", fingerprint="fp", outcome="pending", response_status=202,
                   response_body="{}", received_at=now_ms(),
                   request_id=request_id or keys.new_id("job", 1))


def add_request_record(request_id: str) -> None:
    RequestRecord.create(id=request_id, product_id=1, op="hold", status_code=201, body="{}",
                         created_at=now_ms())


def add_idempotency(key: str, request_id: str) -> None:
    IdempotencyRecord.create(id=key, fingerprint="fp", request_id=request_id,
                             created_at=now_ms())


def rejected(write: Callable[[], Any]) -> None:
    """``write`` in its own transaction must raise IntegrityError and leave nothing."""
    with pytest.raises(pw.IntegrityError), atomic():
        write()


# --- product counters (CHECK) -----------------------------------------------------------

@pytest.mark.parametrize("assignment", ["reserved = stock + 1", "stock = -1", "reserved = -1"])
def test_product_counters_cannot_break_their_checks(new_product: Callable[..., int],
                                                    assignment: str) -> None:
    pid = new_product(stock=5, reserved=0)

    rejected(lambda: db.execute_sql(f"UPDATE products SET {assignment} WHERE id = %s", (pid,)))

    assert counters(pid) == (5, 0)


def test_selling_more_than_reserved_is_rejected(new_product: Callable[..., int]) -> None:
    pid = new_product(stock=5, reserved=2)

    rejected(lambda: Product.update(stock=Product.stock - 3, reserved=Product.reserved - 3)
             .where(Product.id == pid).execute())

    assert counters(pid) == (5, 2)


def test_counters_within_bounds_are_accepted(new_product: Callable[..., int]) -> None:
    pid = new_product(stock=5, reserved=0)

    with atomic():
        db.execute_sql("UPDATE products SET reserved = stock WHERE id = %s", (pid,))

    assert counters(pid) == (5, 5)


# --- one order per hold, one row per key and per request id (UNIQUE) ---------------------

def test_a_second_order_for_the_same_hold_is_rejected(new_product: Callable[..., int]) -> None:
    pid = new_product(stock=5, reserved=1)
    hold_id = add_hold(pid)
    first = add_order(pid, hold_id)

    rejected(lambda: add_order(pid, hold_id))

    assert [o.id for o in Order.select().where(Order.hold == hold_id)] == [first]


def test_a_duplicate_webhook_idempotency_key_is_rejected(mysql_db: str) -> None:
    add_webhook("evt-dup")

    rejected(lambda: add_webhook("evt-dup"))

    assert Webhook.select().where(Webhook.idempotency_key == "evt-dup").count() == 1


def test_keys_differing_only_in_case_are_different_keys(mysql_db: str) -> None:
    add_webhook("evt-Case")
    add_webhook("evt-case")  # a case-insensitive collation would reject this as a duplicate

    keys_ = [w.idempotency_key for w in Webhook.select().where(
        Webhook.idempotency_key.in_(["evt-Case", "evt-case"]))]
    assert sorted(keys_) == ["evt-Case", "evt-case"]


# Each writes one row carrying request id ``rid`` (an order gets a fresh hold each time,
# so only the repeated request id can trip).
DUPLICATE_REQUEST_IDS: dict[str, Callable[[int, str], object]] = {
    "request-record": lambda pid, rid: add_request_record(rid),
    "hold": lambda pid, rid: add_hold(pid, request_id=rid),
    "order": lambda pid, rid: add_order(pid, add_hold(pid), request_id=rid),
    "webhook": lambda pid, rid: add_webhook(keys.new_id("evt", pid), request_id=rid),
    "idempotency-record": lambda pid, rid: add_idempotency(f"holds:{rid}-{now_ms()}", rid),
}


@pytest.mark.parametrize("kind", list(DUPLICATE_REQUEST_IDS))
def test_a_duplicate_request_id_is_rejected(new_product: Callable[..., int],
                                            kind: str) -> None:
    pid = new_product(stock=5)
    request_id = keys.new_id("job", pid)
    write = DUPLICATE_REQUEST_IDS[kind]
    write(pid, request_id)

    rejected(lambda: write(pid, request_id))
