"""flashsale.audit's decisions, without Redis or a database."""

from __future__ import annotations

from flashsale.audit import (
    CACHE,
    WAKE,
    Control,
    Live,
    PendingWebhook,
    Stored,
    check_live,
    check_stored,
    check_webhooks,
)

ROW = {"id": 5, "name": "Sneaker", "price_cents": 1999, "currency": "USD", "stock": 10,
       "available": 7}
CACHED = {"id": "5", "name": "Sneaker", "price_cents": "1999", "currency": "USD",
          "stock": "10", "available": "7", "queued": "0"}
IDLE = Control(ready=frozenset(), drainers=0, workers=2, jobs_waiting=0)
NO_LEASE = -2


def stored(**changes: object) -> Stored:
    fields = {"id": 5, "name": "Sneaker", "price_cents": 1999, "currency": "USD",
              "stock": 10, "reserved": 3, "held": 2, "ordered": 1, "expected_stock": 10,
              "stock_basis": "its creation (12) minus 2 sold since", **changes}
    return Stored(**fields)  # type: ignore[arg-type]


def live(cache: dict[str, str] | None = None, queued: int = 0, inflight: int = 0,
         lease_ms: int = NO_LEASE) -> Live:
    return Live(dict(CACHED if cache is None else cache), queued, inflight, lease_ms, NO_LEASE)


def test_a_consistent_product_has_no_finding() -> None:
    assert check_stored(stored()) == []
    assert check_live(5, ROW, live(), live(), IDLE, []) == []


def test_reserved_against_holds_and_orders() -> None:
    [finding] = check_stored(stored(reserved=4))
    assert (finding.check, finding.expected, finding.actual, finding.delta) == (
        "reserved", 3, 4, 1)
    assert "product 5: reserved:" in finding.line() and "+1" in finding.line()


def test_stock_against_what_was_stocked_and_sold() -> None:
    [finding] = check_stored(stored(stock=13))
    assert (finding.check, finding.delta) == ("stock", 3)
    assert check_stored(stored(stock=13, reserved=3, expected_stock=None)) == []


def test_impossible_counters() -> None:
    checks = [f.check for f in check_stored(stored(stock=-1, reserved=0, held=0, ordered=0,
                                                   expected_stock=None))]
    assert checks == ["stock", "reserved"]  # reserved 0 > stock -1 too
    found = check_stored(stored(stock=2, reserved=3, expected_stock=None))
    assert [f.check for f in found] == ["reserved"]


def test_integrity_lost_and_dead_letters() -> None:
    found = check_stored(stored(converted_without_order=1,
                                order_mismatches=["order ord_5_x: qty differs from its hold"],
                                lost=["hold_5_a"],
                                dead_letters=[{"id": 3, "op": "hold", "request_id": "job_5_x",
                                               "error": "boom"}]))
    assert [f.check for f in found] == ["orders", "orders", "acknowledged", "dead letter"]
    assert all(not f.repair for f in found)
    many = [{"id": n, "op": "expire", "request_id": f"job_5_{n}", "error": "boom"}
            for n in (9, 8, 7)]
    [dead] = check_stored(stored(dead_letters=many))
    assert dead.actual == 3 and "#9" in dead.message  # one line, not one per letter


def test_cache_against_the_row_only_when_it_did_not_move() -> None:
    drifted = live({**CACHED, "available": "9"})
    [finding] = check_live(5, ROW, drifted, drifted, IDLE, [])
    assert (finding.check, finding.expected, finding.actual, finding.repair) == (
        "cache", 7, 9, CACHE)
    moved = live({**CACHED, "available": "6"})
    assert check_live(5, ROW, drifted, moved, IDLE, []) == []  # a drainer wrote meanwhile
    assert check_live(5, ROW, live({}), live({}), IDLE, []) == []  # not cached yet
    [unknown] = check_live(5, ROW, live({"missing": "1"}), live({"missing": "1"}), IDLE, [])
    assert unknown.repair == CACHE


def test_admission_counters_must_be_zero_when_nothing_is_queued() -> None:
    stale = live({**CACHED, "queued": "3", "adders": "1"})
    found = check_live(5, ROW, stale, stale, IDLE, [])
    assert [(f.check, f.actual) for f in found] == [("admission", 3), ("admission", 1)]
    busy = live({**CACHED, "queued": "3"}, queued=2, lease_ms=4000)
    assert check_live(5, ROW, busy, busy, IDLE, []) == []


def test_queues_need_a_drainer_on_its_way() -> None:
    stalled = live(queued=4)
    [lost] = check_live(5, ROW, stalled, stalled, IDLE, [])
    assert "lost wake-up" in lost.message and lost.repair == WAKE
    ready = Control(ready=frozenset({5}), drainers=1, workers=2, jobs_waiting=0)
    assert check_live(5, ROW, stalled, stalled, ready, []) == []
    nobody = Control(ready=frozenset({5}), drainers=0, workers=2, jobs_waiting=0)
    assert [f.repair for f in check_live(5, ROW, stalled, stalled, nobody, [])] == [WAKE]
    draining = live(queued=4, inflight=2, lease_ms=3000)
    assert check_live(5, ROW, draining, draining, IDLE, []) == []


def test_in_flight_without_a_lease_and_applied_requests_still_queued() -> None:
    orphan = live(inflight=3)
    checks = {f.check for f in check_live(5, ROW, orphan, orphan, IDLE, [])}
    assert checks == {"in flight", "queue"}
    leased = live(queued=1, lease_ms=2000)
    [dup] = check_live(5, ROW, leased, leased, IDLE, ["job_5_0123456789abcdef"])
    assert dup.check == "queue" and "job_5_0123456789abcdef" in dup.message


def test_pending_webhooks() -> None:
    now = 1_000_000
    old_order = PendingWebhook("evt_1", 5, "ord_5_a", now - 60_000, now - 30_000)
    fresh_order = PendingWebhook("evt_2", 5, "ord_5_b", now - 60_000, now - 2_000)
    no_order = PendingWebhook("evt_3", 5, "ord_5_c", now - 60_000, None)
    found = check_webhooks([old_order, fresh_order, no_order], now, grace_ms=10_000)
    assert [(f.message.split()[0], f.notice) for f in found] == [("evt_1", False),
                                                                 ("evt_3", True)]
