"""``apply_batch`` against SQLite: what one committed batch writes, loads and replays.

The schema-guard and crash tests run on MariaDB in tests/integration; these check the
load -> decide -> write round trip across batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import models
from flashsale.clock import now_ms
from models import Hold, HoldStatus, IdempotencyRecord, Order, Product, RequestRecord, Webhook
from models.migrate import migrate
from workers import keys
from workers.apply import apply_batch
from workers.decide import Policy, Request

POLICY = Policy(hold_ttl_ms=120_000, order_ttl_ms=900_000)


@pytest.fixture(autouse=True)
def sqlite_db(tmp_path: Path) -> Iterator[None]:
    models.initialize(f"sqlite:///{tmp_path}/flashsale.db")
    migrate()
    yield
    models.db.close()


def make_product(stock: int, reserved: int = 0) -> int:
    return Product.create(name="Widget", price_cents=500, currency="EUR", stock=stock,
                          reserved=reserved, created_at=now_ms()).id


def hold(pid: int, qty: int, idem: tuple[str, str] | None = None) -> Request:
    return Request(id=keys.new_id("job", pid), op="hold", idem=idem,
                   args={"product_id": pid, "qty": qty, "hold_id": keys.new_id("hold", pid)})


def order(pid: int, hold_id: str, order_id: str | None = None) -> Request:
    return Request(id=keys.new_id("job", pid), op="order",
                   args={"hold_id": hold_id, "order_id": order_id or keys.new_id("ord", pid)})


def webhook(pid: int, key: str, order_id: str, status: str = "paid") -> Request:
    fp = f"fp-{order_id}-{status}"
    return Request(id=keys.new_id("job", pid), op="webhook", idem=(f"webhook:{key}", fp),
                   args={"idempotency_key": key, "order_id": order_id, "status": status,
                         "fingerprint": fp})


def counters(pid: int) -> tuple[int, int]:
    row = Product.get_by_id(pid)
    return row.stock, row.reserved


def stored(request_id: str) -> dict[str, Any]:
    row = RequestRecord.get_by_id(request_id)
    return {"status": row.status_code, "body": orjson.loads(row.body)}


def test_a_batch_writes_its_holds_counters_and_results() -> None:
    pid = make_product(stock=5)
    batch = [hold(pid, 2), hold(pid, 2), hold(pid, 2)]

    outcome = apply_batch(pid, batch, POLICY)

    assert [outcome.results[r.id].status for r in batch] == [201, 201, 409]
    assert counters(pid) == (5, 4)
    assert outcome.product is not None and outcome.product["available"] == 1
    rows = {h.request_id: h for h in Hold.select().where(Hold.product == pid)}
    assert set(rows) == {batch[0].id, batch[1].id}
    assert all(rows[r.id].id == r.args["hold_id"] for r in batch[:2])
    for req in batch:
        assert stored(req.id) == outcome.results[req.id].as_dict()


def test_reapplying_a_committed_batch_replays_its_results() -> None:
    pid = make_product(stock=5)
    batch = [hold(pid, 2), hold(pid, 4)]
    first = apply_batch(pid, batch, POLICY)

    again = apply_batch(pid, batch, POLICY)

    assert again.results == first.results
    assert Hold.select().where(Hold.product == pid).count() == 1
    assert RequestRecord.select().count() == 2
    assert counters(pid) == (5, 2)


def test_an_idempotency_key_replays_across_batches() -> None:
    pid = make_product(stock=5)
    first = hold(pid, 2, idem=("holds:k1", "fp"))
    first_result = apply_batch(pid, [first], POLICY).results[first.id]

    same = hold(pid, 2, idem=("holds:k1", "fp"))
    other = hold(pid, 3, idem=("holds:k1", "fp-other"))
    outcome = apply_batch(pid, [same, other], POLICY)

    assert outcome.results[same.id] == first_result
    assert outcome.results[other.id].status == 422
    assert Hold.select().count() == 1
    assert counters(pid) == (5, 2)
    assert [(r.id, r.request_id) for r in IdempotencyRecord.select()] == \
        [("holds:k1", first.id)]


def test_a_batch_of_holds_alone_counts_what_its_customers_hold_from_earlier_batches() -> None:
    pid = make_product(stock=10)
    limited = Policy(hold_ttl_ms=120_000, order_ttl_ms=900_000, max_qty_per_customer=3)

    def held_by(customer: str, qty: int) -> Request:
        req = hold(pid, qty)
        return Request(id=req.id, op="hold", args={**req.args, "customer_id": customer})

    apply_batch(pid, [held_by("alice", 2)], limited)
    second = [held_by("alice", 2), held_by("bob", 3), held_by("alice", 1)]
    outcome = apply_batch(pid, second, limited)

    assert [outcome.results[r.id].status for r in second] == [409, 201, 201]
    assert counters(pid) == (10, 6)


def test_order_then_paid_webhook_sells_the_units() -> None:
    pid = make_product(stock=5)
    h = hold(pid, 3)
    apply_batch(pid, [h], POLICY)
    o = order(pid, h.args["hold_id"])
    created = apply_batch(pid, [o], POLICY).results[o.id]

    w = webhook(pid, "evt-1", o.args["order_id"])
    paid = apply_batch(pid, [w], POLICY).results[w.id]

    assert created.status == 201 and created.body["amount_cents"] == 1500
    assert Hold.get_by_id(h.args["hold_id"]).status == HoldStatus.CONVERTED
    assert (paid.status, paid.body["outcome"], paid.body["order_status"]) == \
        (200, "applied", "paid")
    assert Order.get_by_id(o.args["order_id"]).status == "paid"
    assert counters(pid) == (2, 0)


def test_a_pending_webhook_is_settled_and_its_result_revised_when_the_order_arrives() -> None:
    pid = make_product(stock=5)
    h = hold(pid, 2)
    apply_batch(pid, [h], POLICY)
    order_id = keys.new_id("ord", pid)
    w = webhook(pid, "evt-early", order_id)
    pending = apply_batch(pid, [w], POLICY).results[w.id]

    outcome = apply_batch(pid, [order(pid, h.args["hold_id"], order_id)], POLICY)

    assert pending.status == 202 and pending.body["outcome"] == "pending"
    applied = {"idempotency_key": "evt-early", "order_id": order_id, "outcome": "applied",
               "order_status": "paid"}
    assert outcome.revised[w.id].as_dict() == {"status": 200, "body": applied}
    assert stored(w.id) == {"status": 200, "body": applied}
    assert Webhook.get_by_id("evt-early").outcome == "applied"
    assert counters(pid) == (3, 0)


def test_a_replayed_webhook_key_answers_applied_once_its_order_arrived() -> None:
    """API.md: a pending webhook that has since been applied answers with its applied result.

    The second delivery reaches the worker with a new request id (e.g. after Redis lost the
    gateway's idempotency claim) in the same batch as the order that settles the first.
    """
    pid = make_product(stock=5)
    h = hold(pid, 2)
    apply_batch(pid, [h], POLICY)
    order_id = keys.new_id("ord", pid)
    apply_batch(pid, [webhook(pid, "evt-twice", order_id)], POLICY)
    again = webhook(pid, "evt-twice", order_id)

    outcome = apply_batch(pid, [order(pid, h.args["hold_id"], order_id), again], POLICY)

    assert outcome.results[again.id].status == 200
    assert outcome.results[again.id].body["outcome"] == "applied"
    assert counters(pid) == (3, 0)


def test_expire_releases_what_time_has_expired() -> None:
    now = now_ms()
    pid = make_product(stock=10, reserved=5)
    for hold_id, qty, created in (("h-old", 3, now - 200_000), ("h-new", 2, now)):
        Hold.create(id=hold_id, product=pid, qty=qty, status=HoldStatus.ACTIVE,
                    created_at=created, expires_at=created + POLICY.hold_ttl_ms,
                    request_id=f"req-{hold_id}")
    expire = Request(id=keys.new_id("job", pid), op="expire", args={})

    outcome = apply_batch(pid, [expire], POLICY)

    assert outcome.results[expire.id].body == {"expired_holds": 1, "cancelled_orders": 0}
    assert Hold.get_by_id("h-old").status == HoldStatus.EXPIRED
    assert Hold.get_by_id("h-new").status == HoldStatus.ACTIVE
    assert counters(pid) == (10, 2)


# --- a request the writer cannot apply --------------------------------------------------

def test_a_request_that_raises_is_set_aside_and_the_rest_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.decide import Ledger

    pid = make_product(stock=10)
    real = Ledger._op_hold

    def buggy(self: Ledger, req: Request) -> Any:
        if req.args["qty"] == 3:
            raise KeyError("a bug that only this request meets")
        return real(self, req)

    monkeypatch.setattr(Ledger, "_op_hold", buggy)
    batch = [hold(pid, 1), hold(pid, 3), hold(pid, 2)]

    outcome = apply_batch(pid, batch, POLICY)

    assert [outcome.results[r.id].status for r in batch] == [201, 500, 201]
    assert counters(pid) == (10, 3)
    assert [d.request.id for d in outcome.dead] == [batch[1].id]
    dead = models.DeadLetter.get(models.DeadLetter.request_id == batch[1].id)
    assert "KeyError" in dead.error and dead.status_code == 500
    # Its answer is committed: applying the envelope again replays it, changes nothing.
    again = apply_batch(pid, [batch[1]], POLICY)
    assert again.results[batch[1].id].status == 500 and counters(pid) == (10, 3)


def test_an_unreachable_database_keeps_the_whole_batch_for_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import peewee

    from workers.decide import Ledger

    pid = make_product(stock=10)

    def down(self: Ledger, req: Request) -> Any:
        raise peewee.OperationalError(2013, "Lost connection to MySQL server during query")

    monkeypatch.setattr(Ledger, "_op_hold", down)

    with pytest.raises(peewee.OperationalError):
        apply_batch(pid, [hold(pid, 1), hold(pid, 2)], POLICY)
    assert counters(pid) == (10, 0)
    assert models.DeadLetter.select().count() == 0


def test_the_catalog_partition_applies_under_its_own_lock_row() -> None:
    outcome = apply_batch(keys.CATALOG, [webhook(keys.CATALOG, "evt-x", "not-ours")], POLICY)

    assert [r.status for r in outcome.results.values()] == [202]


def test_a_sweep_that_fails_for_good_is_kept_once_not_every_second() -> None:
    pid = make_product(stock=10, reserved=0)
    # Drift behind the service's back: an active hold whose units are not reserved.
    Hold.create(id=keys.new_id("hold", pid), product=pid, qty=2, status=HoldStatus.ACTIVE,
                created_at=now_ms() - 10_000, expires_at=now_ms() - 1_000,
                request_id=keys.new_id("job", pid))
    for _ in range(3):
        sweep = Request(id=keys.new_id("job", pid), op="expire", args={})
        assert apply_batch(pid, [sweep], POLICY).results[sweep.id].status == 409
    assert models.DeadLetter.select().where(models.DeadLetter.product_id == pid).count() == 1
