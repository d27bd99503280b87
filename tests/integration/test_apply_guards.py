"""A batch with a request that trips a schema guard fails only that request (MariaDB)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from models import Hold, HoldStatus, Order, OrderStatus, Product, RequestRecord
from tests.integration.batches import POLICY, hold
from workers import keys
from workers.apply import apply_batch
from workers.decide import Request

pytestmark = pytest.mark.integration


def assert_counters_match_rows(pid: int) -> None:
    """``reserved`` is exactly what active holds and unpaid orders keep."""
    product = Product.get_by_id(pid)
    held = sum(h.qty for h in Hold.select().where(
        (Hold.product == pid) & (Hold.status == HoldStatus.ACTIVE)))
    ordered = sum(o.qty for o in Order.select().where(
        (Order.product == pid) & (Order.status == OrderStatus.PENDING_PAYMENT)))
    assert product.reserved == held + ordered
    assert 0 <= product.reserved <= product.stock


def assert_recorded(requests: list[Request], results: dict) -> None:
    """Every request of the batch has exactly its answered result committed."""
    rows = {r.id: r for r in RequestRecord.select().where(
        RequestRecord.id.in_([q.id for q in requests]))}
    assert set(rows) == {q.id for q in requests}
    for req in requests:
        assert (rows[req.id].status_code, orjson.loads(rows[req.id].body)) == \
            (results[req.id].status, results[req.id].body)


def test_a_hold_id_used_twice_in_a_batch_fails_only_the_second(
        new_product: Callable[..., int]) -> None:
    pid = new_product(stock=10)
    twice = keys.new_id("hold", pid)
    batch = [hold(pid, 2), hold(pid, 1, twice), hold(pid, 3, twice), hold(pid, 4)]

    outcome = apply_batch(pid, batch, POLICY)

    statuses = [outcome.results[r.id].status for r in batch]
    assert statuses[:2] == [201, 201] and statuses[3] == 201
    assert 400 <= statuses[2] < 500 and outcome.results[batch[2].id].body["status"] == statuses[2]
    rows = {h.id: h for h in Hold.select().where(Hold.product == pid)}
    assert set(rows) == {batch[0].args["hold_id"], twice, batch[3].args["hold_id"]}
    assert (rows[twice].qty, rows[twice].request_id) == (1, batch[1].id)
    assert Product.get_by_id(pid).reserved == 2 + 1 + 4
    assert outcome.product is not None and outcome.product["available"] == 3
    assert_counters_match_rows(pid)
    assert_recorded(batch, outcome.results)


def test_a_batch_replayed_after_the_one_by_one_fallback_changes_nothing(
        new_product: Callable[..., int]) -> None:
    pid = new_product(stock=10)
    twice = keys.new_id("hold", pid)
    batch = [hold(pid, 2, twice), hold(pid, 2, twice), hold(pid, 1)]
    first = apply_batch(pid, batch, POLICY)

    again = apply_batch(pid, batch, POLICY)

    assert again.results == first.results
    assert Hold.select().where(Hold.product == pid).count() == 2
    assert Product.get_by_id(pid).reserved == 3
    assert_counters_match_rows(pid)


def test_a_request_tripping_a_check_constraint_fails_alone(
        new_product: Callable[..., int]) -> None:
    """A restock that would leave ``stock < reserved`` (an envelope the gateway's schema
    should never let through) trips CHECK (reserved <= stock); the holds around it stand."""
    pid = new_product(stock=5)
    bad = Request(id=keys.new_id("job", pid), op="restock", args={"product_id": pid, "qty": -4})
    batch = [hold(pid, 2), bad, hold(pid, 1)]

    outcome = apply_batch(pid, batch, POLICY)

    assert [outcome.results[r.id].status for r in batch][::2] == [201, 201]
    assert 400 <= outcome.results[bad.id].status < 500
    product = Product.get_by_id(pid)
    assert (product.stock, product.reserved) == (5, 3)
    assert_counters_match_rows(pid)
    assert_recorded(batch, outcome.results)
