"""Several statements in one round trip (models.execute_batch), on MariaDB: what the
drainer's transaction relies on when it sends its reads, then its writes, together."""

from __future__ import annotations

import threading
from collections.abc import Callable

import peewee
import pytest

from models import Hold, Product, RequestRecord, atomic, db, execute_batch
from tests.integration.batches import POLICY, hold
from workers import keys
from workers.apply import _apply_many, _update_products, apply_batches
from workers.decide import ProductState, Request

pytestmark = pytest.mark.integration


def test_each_statement_gives_its_own_rows_in_order(new_product: Callable[..., int]) -> None:
    first, second = new_product(stock=3), new_product(stock=7)

    rows = execute_batch([
        ("SELECT id, stock FROM products WHERE id = %s", [second]),
        ("UPDATE products SET stock = stock + 1 WHERE id IN (%s, %s)", [first, second]),
        ("SELECT id, stock FROM products WHERE id IN (%s, %s) ORDER BY id", [first, second]),
        ("SELECT id FROM products WHERE id = %s", [-1]),
    ])

    assert rows == [[(second, 7)], [], [(first, 4), (second, 8)], []]


def test_a_failing_statement_raises_a_peewee_error_and_the_rest_do_not_run(
        new_product: Callable[..., int]) -> None:
    pid = new_product(stock=5)

    with pytest.raises(peewee.IntegrityError):  # reserved <= stock, a CHECK constraint
        execute_batch([
            ("UPDATE products SET stock = 6 WHERE id = %s", [pid]),
            ("UPDATE products SET reserved = 9 WHERE id = %s", [pid]),
            ("UPDATE products SET stock = 1 WHERE id = %s", [pid]),
        ])

    product = Product.get_by_id(pid)
    assert (product.stock, product.reserved) == (6, 0)  # the first ran, the third did not
    assert db.execute_sql("SELECT 1").fetchall() == ((1,),)  # the connection is still usable


def test_a_failed_batch_inside_a_transaction_leaves_nothing(
        new_product: Callable[..., int]) -> None:
    pid = new_product(stock=5)

    with pytest.raises(peewee.IntegrityError), atomic():
        execute_batch([("UPDATE products SET stock = 6 WHERE id = %s", [pid]),
                       ("UPDATE products SET reserved = 9 WHERE id = %s", [pid])])

    product = Product.get_by_id(pid)
    assert (product.stock, product.reserved) == (5, 0)


def test_a_poison_request_in_a_round_of_several_products_fails_alone(
        new_product: Callable[..., int]) -> None:
    """The round's writes go in one round trip; the duplicate hold id fails it, and the
    products are applied again one by one: only the second use of the id is refused."""
    clean, poisoned = new_product(stock=10), new_product(stock=10)
    twice = keys.new_id("hold", poisoned)
    batches = {clean: [hold(clean, 2), hold(clean, 3)],
               poisoned: [hold(poisoned, 1, twice), hold(poisoned, 4, twice)]}

    outcomes = apply_batches(batches, POLICY)

    assert [outcomes[clean].results[r.id].status for r in batches[clean]] == [201, 201]
    statuses = [outcomes[poisoned].results[r.id].status for r in batches[poisoned]]
    assert statuses[0] == 201 and 400 <= statuses[1] < 500
    assert Product.get_by_id(clean).reserved == 5
    assert Product.get_by_id(poisoned).reserved == 1
    assert Hold.select().where(Hold.product.in_([clean, poisoned])).count() == 3
    recorded = RequestRecord.select().where(
        RequestRecord.id.in_([r.id for b in batches.values() for r in b])).count()
    assert recorded == 4


def test_rounds_on_different_products_do_not_wait_for_each_other(
        new_product: Callable[..., int]) -> None:
    """Two drainers' transactions on disjoint products: the second must not need a row
    the first holds. On a table this small, an UPDATE by ``id IN (...)`` is planned as
    a scan that locks every row; it waited here for the first's commit (and, both ways
    round, deadlocked)."""
    pids = [new_product(stock=10) for _ in range(40)]
    mine, theirs = pids[:1], pids[1:31]
    locked, done = threading.Event(), threading.Event()

    def other_drainer() -> None:
        try:
            # Its round applied, not yet committed, so its row locks are held: inside a
            # savepoint the round's writes do not carry the COMMIT (execute_batch).
            with atomic(), atomic():
                _apply_many({pid: [hold(pid, 1)] for pid in mine}, POLICY)
                locked.set()
                done.wait(15)
        finally:
            db.close()

    thread = threading.Thread(target=other_drainer)
    thread.start()
    try:
        assert locked.wait(15)
        db.execute_sql("SET SESSION innodb_lock_wait_timeout = 1")
        outcomes = apply_batches({pid: [hold(pid, 2)] for pid in theirs}, POLICY)
    finally:
        done.set()
        thread.join()
        db.execute_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")

    assert all(r.status == 201 for o in outcomes.values() for r in o.results.values())
    assert Product.get_by_id(theirs[0]).reserved == 2
    assert Product.get_by_id(mine[0]).reserved == 1


def test_the_counters_update_finds_each_product_by_its_key(
        new_product: Callable[..., int]) -> None:
    """The round's one UPDATE of the counters reads its derived table first and each
    product row by primary key: a plan that scans ``products`` would lock every row."""
    pids = [new_product(stock=10) for _ in range(40)]
    products = [ProductState(id=pid, name="p", price_cents=1, currency="USD", stock=10,
                             reserved=2) for pid in pids[5:35]]
    [(sql, params)] = _update_products(products)

    plan = db.execute_sql("EXPLAIN " + sql, params).fetchall()

    access = {row[2]: row[3] for row in plan}  # table -> access type
    assert access["p"] in ("eq_ref", "const"), plan
    assert plan[0][2].startswith("<derived"), plan  # read first (STRAIGHT_JOIN)


def test_values_that_read_as_sql_or_are_not_ascii_are_stored_as_they_are(
        new_product: Callable[..., int]) -> None:
    """With several statements per round trip, a value that reads as SQL must stay a
    value: the round's writes carry it as an escaped parameter, next to good requests."""
    hostile = "ü😀'; DROP TABLE products; -- \\"
    first, second = new_product(stock=5), new_product(stock=5)
    odd = Request(id=keys.new_id("job", first), op="hold",
                  args={"product_id": first, "qty": 1, "hold_id": keys.new_id("hold", first),
                        "customer_id": hostile})
    batches = {first: [odd, hold(first, 1)], second: [hold(second, 2)]}

    outcomes = apply_batches(batches, POLICY)

    assert all(r.status == 201 for o in outcomes.values() for r in o.results.values())
    assert Hold.get_by_id(odd.args["hold_id"]).customer_id == hostile
    assert outcomes[first].results[odd.id].body["customer_id"] == hostile
    assert Product.get_by_id(second).reserved == 2  # the table, and the other product, stand


def test_a_huge_number_and_nan_in_a_round_fail_alone_next_to_good_requests(
        new_product: Callable[..., int]) -> None:
    """Envelopes the gateway would never queue (it bounds quantities): a 5,000-digit
    quantity and a NaN one each fail alone (set aside, 500); the round's other requests,
    on the same product and another, are applied."""
    first, second = new_product(stock=5), new_product(stock=5)
    huge = Request(id=keys.new_id("job", first), op="hold",
                   args={"product_id": first, "qty": 10**5000,
                         "hold_id": keys.new_id("hold", first)})
    nan = Request(id=keys.new_id("job", first), op="hold",
                  args={"product_id": first, "qty": float("nan"),
                        "hold_id": keys.new_id("hold", first)})
    good = [hold(first, 1), hold(second, 2)]
    batches = {first: [huge, nan, good[0]], second: [good[1]]}

    outcomes = apply_batches(batches, POLICY)

    assert outcomes[first].results[huge.id].status == 500
    assert outcomes[first].results[nan.id].status == 500
    assert [outcomes[first].results[good[0].id].status,
            outcomes[second].results[good[1].id].status] == [201, 201]
    assert (Product.get_by_id(first).reserved, Product.get_by_id(second).reserved) == (1, 2)


def test_an_order_naming_a_hold_of_another_partition_fails_alone_in_a_shared_round(
        new_product: Callable[..., int]) -> None:
    """A hand-made envelope on one product's queue that names another product's hold:
    refused (404), the other product's hold and counters untouched, and the round's
    good requests on both products applied, with the counters' one UPDATE."""
    first, second = new_product(stock=5), new_product(stock=5)
    theirs = hold(second, 2)
    apply_batches({second: [theirs]}, POLICY)
    stray = Request(id=keys.new_id("job", first), op="order",
                    args={"hold_id": theirs.args["hold_id"],
                          "order_id": keys.order_id_for(theirs.args["hold_id"])})
    good = [hold(first, 1), hold(second, 1)]

    outcomes = apply_batches({first: [stray, good[0]], second: [good[1]]}, POLICY)

    assert outcomes[first].results[stray.id].status == 404
    assert [outcomes[first].results[good[0].id].status,
            outcomes[second].results[good[1].id].status] == [201, 201]
    assert Hold.get_by_id(theirs.args["hold_id"]).status == "active"
    assert (Product.get_by_id(first).reserved, Product.get_by_id(second).reserved) == (1, 3)
