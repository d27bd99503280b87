"""MariaDB killed and restarted in the middle of a rush: nothing acknowledged is lost.

The instance gets a MariaDB server of its own (tests/private_servers.py), so the test can
crash it without disturbing anything else. Forty clients hold, order, pay and read for the
whole run, on a product that never sells out and on a scarce one that sells out, gets a
restock queued while the database is down, and sells out again. The server is SIGKILLed
(committed transactions must survive, as InnoDB promises), or in the second case shut down
cleanly as an operator would, and started again after a few seconds. Then:

- every 201 a client received (and every 202 once decided) is in the database, with the
  status its later requests imply; nothing the clients were refused is there; nothing is
  oversold: stock and reserved agree with the rows, ``available`` never went negative;
- while the database was down, the only 5xx was 503 (and only then);
- the service recovered: /healthz said 503 while down and 200 after, writes sent after the
  restart succeed, every queued (202) request was eventually decided.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.e2e.harness import (
    Api,
    Reply,
    ServiceFactory,
    ServiceInstance,
    assert_problem,
)
from tests.private_servers import PrivateMariaDB, require_mariadb
from tests.services import require_redis

pytestmark = pytest.mark.e2e

CLIENTS = 40
PLENTY = 100_000  # never sells out: writes go on before, during and after the outage
SCARCE, RESTOCK = 40, 40  # sells out; a restock queued while the database is down
WAIT = "wait=2"  # short, so requests caught by the outage come back 202 and clients go on
WARMUP_GRANTS, WARMUP_SECONDS = 60, 1.0  # holds granted, and seconds of load, before the fault
WARMUP_TIMEOUT = 20.0
DOWN_SECONDS = 3.0
AFTER_SECONDS = 6.0  # load after the restart
# After the server answers again, the service may need a moment to reopen its connections:
# a 503 for a request sent up to this long after the restart is still the outage's.
RECOVERY_GRACE = 3.0
SETTLE_TIMEOUT = 30.0  # a 202 is decided within this long once the database is back
MAX_ROUNDS = 500  # per client; the run normally ends on time, well before
PAUSE_AFTER_REFUSAL = 0.1  # a client told "sold out" or "503" waits a little
ORDER_EVERY, PAY_EVERY = 3, 2  # 2 holds in 3 are ordered, 1 order in 2 is paid
# Webhooks wait DEFAULT_WAIT_SECONDS: shorter than the outage, so some are stored (202).
SERVICE_ENV = {"DEFAULT_WAIT_SECONDS": "2"}


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMariaDB]:
    """A private MariaDB server; stopped and its data removed after the module."""
    binaries = require_mariadb()
    with PrivateMariaDB(tmp_path_factory.mktemp("mariadb"), binaries) as server:
        yield server


@pytest.fixture(scope="module")
def restart_service(
    mariadb: PrivateMariaDB, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceInstance]:
    """An instance whose database lives on the private server (Redis is the usual one)."""
    factory = ServiceFactory(
        mysql_url=mariadb.url(),
        redis_url=require_redis(),
        log_root=tmp_path_factory.mktemp("e2e-mariadb-restart"),
    )
    try:
        yield factory.get("mariadb-restart", **SERVICE_ENV)
    finally:
        factory.close()


@dataclass
class Call:
    """One request a client sent, when, and what came back (``final``: after a 202)."""

    kind: str  # hold | order | pay | read | product
    product_id: int
    started: float
    ended: float
    reply: Reply | None
    error: str = ""
    qty: int = 0
    hold_id: str = ""
    order_id: str = ""
    final: Reply | None = None

    @property
    def status(self) -> int:
        return self.reply.status if self.reply is not None else 0

    @property
    def final_status(self) -> int:
        return self.final.status if self.final is not None else self.status

    @property
    def outcome(self) -> Reply:
        """The final reply: the job's result for a 202, else the reply itself."""
        reply = self.final or self.reply
        assert reply is not None, f"no answer: {self.error}"
        return reply

    def __repr__(self) -> str:
        ids = self.hold_id or self.order_id or self.product_id
        return f"Call({self.kind} {ids} -> {self.reply or self.error}, final {self.final})"


@dataclass
class Outage:
    down: float = float("inf")  # time.monotonic() just before the kill
    up: float = float("inf")  # the server answers again
    health_down: list[Reply] = field(default_factory=list)
    restock: Reply | None = None

    def overlaps(self, call: Call) -> bool:
        """The request was in flight at some moment of the outage (or its grace time)."""
        return call.ended >= self.down and call.started <= self.up + RECOVERY_GRACE


@pytest.mark.parametrize("crash", [True, False], ids=["sigkill", "clean-shutdown"])
async def test_mariadb_restart_mid_load_loses_nothing(
    http: aiohttp.ClientSession,
    restart_service: ServiceInstance,
    mariadb: PrivateMariaDB,
    crash: bool,
) -> None:
    """``crash``: the server is SIGKILLed, else shut down cleanly (an operator's restart).
    Both cases run on the same instance: the second also checks it survived the first."""
    api = Api(http, restart_service)
    plenty = (await api.create_product(stock=PLENTY))["id"]
    scarce = (await api.create_product(stock=SCARCE))["id"]
    stocked = {plenty: PLENTY, scarce: SCARCE + RESTOCK}
    calls: list[Call] = []
    outage = Outage()
    warmed, stop = asyncio.Event(), asyncio.Event()
    granted = 0
    began = time.monotonic()

    async def record(kind: str, product_id: int, request: Awaitable[Reply], **ids: Any) -> Call:
        started = time.monotonic()
        reply, error = None, ""
        try:
            reply = await request
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = repr(exc)
        call = Call(kind, product_id, started, time.monotonic(), reply, error, **ids)
        calls.append(call)
        return call

    async def client(number: int) -> None:
        nonlocal granted
        pid = (plenty, scarce)[number % 2]
        last_granted = ""
        for i in range(MAX_ROUNDS):
            if stop.is_set():
                return
            await record("product", pid, api.get(f"/api/products/{pid}"))
            if last_granted:
                await record("read", pid, api.get(f"/api/holds/{last_granted}"),
                             hold_id=last_granted)
            qty = 1 + (number + i) % 3
            hold = await record("hold", pid, api.hold(pid, qty, prefer=WAIT), qty=qty)
            if hold.status not in (201, 202) or hold.reply is None:
                await asyncio.sleep(PAUSE_AFTER_REFUSAL)
                continue
            hold_id = hold.hold_id = hold.reply.body["hold_id"]
            if hold.status == 201:
                last_granted = hold_id
                granted += 1
                if granted >= WARMUP_GRANTS:
                    warmed.set()
            if i % ORDER_EVERY == ORDER_EVERY - 1:
                continue  # this hold stays active
            # A 202 hold is ordered at once too: the order queues behind it.
            order = await record("order", pid, api.order(hold_id, prefer=WAIT),
                                 hold_id=hold_id)
            if order.status == 201 and order.reply is not None and i % PAY_EVERY == 0:
                order_id = order.reply.body["order_id"]
                await record("pay", pid, api.webhook(order_id, "paid", key=f"evt-{order_id}"),
                             order_id=order_id)

    async def operator() -> None:
        try:
            await asyncio.wait_for(warmed.wait(), timeout=WARMUP_TIMEOUT)
            await asyncio.sleep(max(0.0, began + WARMUP_SECONDS - time.monotonic()))
            outage.down = time.monotonic()
            await asyncio.to_thread(mariadb.kill if crash else mariadb.stop)
            outage.restock = await api.post(
                f"/api/admin/products/{scarce}/restock", {"qty": RESTOCK},
                prefer="respond-async", headers=api.admin_headers())
            outage.health_down = [await api.get("/healthz", gateway=g) for g in (0, 1)]
            await asyncio.sleep(max(0.0, outage.down + DOWN_SECONDS - time.monotonic()))
            await asyncio.to_thread(mariadb.start)
            outage.up = time.monotonic()
            await asyncio.sleep(AFTER_SECONDS)
        finally:
            stop.set()

    outcomes = await asyncio.gather(
        operator(), *(client(n) for n in range(CLIENTS)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} tasks failed, first: {failures[0]!r}"
    assert outage.up < float("inf"), "the database was not restarted"
    load_seconds = time.monotonic() - began

    # --- every request was answered, with a status it may have ---------------------------
    errors = [c for c in calls if c.error]
    assert not errors, f"{len(errors)} requests got no HTTP answer: {errors[:5]}"
    server_errors = [c for c in calls if c.status >= 500]
    assert all(c.status == 503 for c in server_errors), [
        c for c in server_errors if c.status != 503][:5]
    late_503 = [c for c in server_errors if not outage.overlaps(c)]
    assert not late_503, (
        f"503 outside the outage ({outage.down - began:.1f}..{outage.up - began:.1f} s "
        f"after the start, +{RECOVERY_GRACE} s): "
        f"{[(round(c.started - began, 2), c) for c in late_503[:5]]}")
    lost = [c for c in calls if c.kind == "read" and c.status == 404]
    assert not lost, f"{len(lost)} reads of granted holds answered 404 (lost?): {lost[:3]}"
    allowed = {"product": {200, 503}, "read": {200, 503}, "hold": {201, 202, 409, 503},
               "order": {201, 202, 404, 503}, "pay": {200, 202, 503}}
    odd = [c for c in calls if c.status not in allowed[c.kind]]
    assert not odd, f"unexpected statuses: {odd[:5]}"
    for call in calls:
        assert call.reply is not None
        body = call.reply.body
        if call.kind == "product" and call.status == 200:
            assert 0 <= body["available"] <= body["stock"], f"product {body}"
        elif call.kind == "read" and call.status == 200:
            assert body["hold_id"] == call.hold_id and body["status"] in (
                "active", "converted"), body
        elif call.kind == "pay" and call.status == 200:
            assert (body["outcome"], body["order_status"]) == ("applied", "paid"), body

    # The fault landed mid-load: the service saw the database gone, and said so.
    for reply in outage.health_down:
        assert reply.status == 503 and reply.body["checks"]["database"] is False, reply
    assert outage.restock is not None and outage.restock.status == 202, outage.restock
    queued = [c for c in calls if c.kind == "hold" and c.status == 202 and outage.overlaps(c)]
    assert queued, "no hold was queued (202) during the outage: the fault missed the load"

    # --- every queued request is eventually decided ---------------------------------------
    gate = asyncio.Semaphore(50)

    async def settle(call: Call) -> None:
        assert call.reply is not None
        async with gate:
            call.final = await api.settle(call.reply, timeout=SETTLE_TIMEOUT)

    await asyncio.gather(*(settle(c) for c in calls if c.kind in ("hold", "order")
                           and c.status == 202))
    restock = await api.settle(outage.restock, timeout=SETTLE_TIMEOUT)
    assert restock.status == 200, f"restock queued during the outage: {restock}"

    holds = {c.hold_id: c for c in calls if c.kind == "hold" and c.final_status == 201}
    refused_holds = [c for c in calls if c.kind == "hold" and c.final_status == 409]
    for call in refused_holds:
        assert_problem(call.outcome, 409, "Insufficient stock")
    assert all(c.final_status in (201, 409, 503) for c in calls if c.kind == "hold")
    for hold_id, call in holds.items():
        body = call.outcome.body
        assert (body["hold_id"], body["product_id"], body["qty"]) == (
            hold_id, call.product_id, call.qty), body
    assert any(c.product_id == scarce for c in refused_holds), (
        "the scarce product never sold out: the oversell check proved nothing")

    orders: dict[str, Call] = {}
    for call in (c for c in calls if c.kind == "order"):
        if call.final_status == 503:
            continue
        if call.hold_id in holds:
            assert call.final_status == 201, f"order for granted hold {call.hold_id}: {call}"
            body = call.outcome.body
            assert body["hold_id"] == call.hold_id and body["qty"] == holds[call.hold_id].qty
            orders[body["order_id"]] = call
        else:  # its hold was refused (409) after the order was queued behind it
            assert call.final_status == 404, f"order for refused hold {call.hold_id}: {call}"
    pays = {c.order_id: c for c in calls if c.kind == "pay"}
    must_pay = {o for o, c in pays.items() if c.status in (200, 202)}
    # A webhook stored while the database was down (202 pending) answers its applied
    # result once applied (API.md); poll until it is.
    for order_id in (o for o, c in pays.items() if c.status == 202):
        await _wait_applied(api, order_id)

    # --- writes succeed again ---------------------------------------------------------------
    for gateway in (0, 1):
        await _wait_healthy(api, gateway)
    after = [c for c in calls if c.kind == "hold" and c.started > outage.up]
    assert any(c.final_status == 201 for c in after), "no hold granted after the restart"
    probe = await api.settle(await api.hold(plenty, 1, prefer="wait=30"))
    assert probe.status == 201, f"hold after the restart: {probe}"
    probe_order = await api.settle(await api.order(probe.body["hold_id"], prefer="wait=30"))
    assert probe_order.status == 201, f"order after the restart: {probe_order}"
    holds[probe.body["hold_id"]] = Call("hold", plenty, 0, 0, probe, qty=1,
                                        hold_id=probe.body["hold_id"])
    orders[probe_order.body["order_id"]] = Call("order", plenty, 0, 0, probe_order,
                                                hold_id=probe.body["hold_id"])

    # --- the database has exactly what the clients were told ------------------------------
    database = urlsplit(restart_service.env["DATABASE_URL"]).path.lstrip("/")
    ours = (plenty, scarce)  # the other case's products share the database
    db_holds = {row[0]: row[1:] for row in mariadb.query(
        "SELECT id, product_id, qty, status FROM holds WHERE product_id IN (%s, %s)", ours,
        database=database)}
    db_orders = {row[0]: row[1:] for row in mariadb.query(
        "SELECT id, hold_id, product_id, qty, status FROM orders WHERE product_id IN (%s, %s)",
        ours, database=database)}
    db_products = {row[0]: row[1:] for row in mariadb.query(
        "SELECT id, stock, reserved FROM products WHERE id IN (%s, %s)", ours,
        database=database)}

    lost_holds = sorted(set(holds) - set(db_holds))
    assert not lost_holds, f"{len(lost_holds)} granted holds missing: {lost_holds[:5]}"
    lost_orders = sorted(set(orders) - set(db_orders))
    assert not lost_orders, f"{len(lost_orders)} created orders missing: {lost_orders[:5]}"
    # Rows no client was told about may only come from requests answered 503.
    unknown_503 = Counter(c.kind for c in calls if c.status == 503)
    extra_holds = set(db_holds) - set(holds)
    extra_orders = set(db_orders) - set(orders)
    assert len(extra_holds) <= unknown_503["hold"], f"unacknowledged holds: {extra_holds}"
    assert len(extra_orders) <= unknown_503["order"], f"unacknowledged orders: {extra_orders}"

    ordered_holds = {c.hold_id for c in orders.values()}
    order_unknown = {c.hold_id for c in calls if c.kind == "order" and c.final_status == 503}
    for hold_id, call in holds.items():
        product_id, qty, status = db_holds[hold_id]
        assert (product_id, qty) == (call.product_id, call.qty), (hold_id, db_holds[hold_id])
        want = "converted" if hold_id in ordered_holds else "active"
        if hold_id in order_unknown:  # its order request got a 503: either may be true
            assert status in ("active", "converted"), (hold_id, status)
        else:
            assert status == want, f"hold {hold_id} is {status}, want {want}: {call}"
    for order_id, call in orders.items():
        hold_id, product_id, qty, status = db_orders[order_id]
        assert (hold_id, product_id, qty) == (call.hold_id, call.product_id,
                                              holds[call.hold_id].qty), db_orders[order_id]
        want = "paid" if order_id in must_pay else "pending_payment"
        if order_id in pays and order_id not in must_pay:  # its webhook got a 503
            assert status in ("paid", "pending_payment"), (order_id, status)
        else:
            assert status == want, f"order {order_id} is {status}, want {want}: {call}"

    for pid, initial in stocked.items():
        stock, reserved = db_products[pid]
        sold = sum(qty for _, p, qty, status in db_orders.values()
                   if p == pid and status == "paid")
        pending = sum(qty for _, p, qty, status in db_orders.values()
                      if p == pid and status == "pending_payment")
        held = sum(qty for p, qty, status in db_holds.values()
                   if p == pid and status == "active")
        assert stock == initial - sold, f"product {pid}: stock {stock}, {initial} - {sold} sold"
        assert reserved == held + pending, (
            f"product {pid}: reserved {reserved}, held {held} + unpaid {pending}")
        assert 0 <= reserved <= stock, f"product {pid} oversold: {stock=} {reserved=}"
        await api.wait_product(pid, stock=stock, available=stock - reserved)
    granted_scarce = sum(qty for p, qty, _ in db_holds.values() if p == scarce)
    assert granted_scarce > SCARCE, (
        f"{granted_scarce} units of the scarce product granted: the restock queued while "
        f"the database was down was never sold")

    statuses = Counter((c.kind, c.status) for c in calls)
    recovered = min((c.ended for c in after if c.status == 201), default=float("nan"))
    print(f"\n{'crash' if crash else 'clean'}: load {load_seconds:.1f} s, "
          f"outage {outage.up - outage.down:.1f} s, first 201 hold "
          f"{recovered - outage.up:.1f} s after the restart, "
          f"{len(calls)} requests, {len(holds)} holds, {len(orders)} orders, "
          f"{len(must_pay)} paid ({sum(c.status == 202 for c in pays.values())} stored "
          f"while down), {len(queued)} holds queued while down; "
          f"statuses {sorted(statuses.items())}")


async def _wait_applied(api: Api, order_id: str, timeout: float = SETTLE_TIMEOUT) -> None:
    """Re-send the webhook of ``order_id`` until it answers its applied result."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await api.webhook(order_id, "paid", key=f"evt-{order_id}")
        if reply.status == 200:
            assert (reply.body["outcome"], reply.body["order_status"]) == ("applied", "paid"), (
                reply)
            return
        assert reply.status == 202, f"webhook for {order_id} again: {reply}"
        assert time.monotonic() < deadline, f"webhook for {order_id} still pending: {reply}"
        await asyncio.sleep(0.2)


async def _wait_healthy(api: Api, gateway: int, timeout: float = SETTLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        reply = await api.get("/healthz", gateway=gateway)
        if reply.status == 200:
            return
        assert time.monotonic() < deadline, f"gateway {gateway} still unhealthy: {reply}"
        await asyncio.sleep(0.2)
