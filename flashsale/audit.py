"""``flashsale audit``: do the database, the product cache and the queues agree?

Every invariant of API.md that can be checked at rest, product by product:

- the row: ``stock >= 0``, ``0 <= reserved <= stock``; ``reserved`` equals the units of
  active holds plus ``pending_payment`` orders; ``stock`` equals what was stocked minus
  what was sold since (``check_stored``);
- holds and orders agree (one order per converted hold, same product and quantity, the
  amount the price gives), and every hold or order acknowledged with a 201 still exists
  (for as long as the ``requests`` table keeps the answer, 48 h);
- the cached product equals the row, and the admission counters are 0 when nothing is
  queued; no request both applied and still queued; no in-flight batch without a live
  lease; no queue without a drainer on its way (``check_live``);
- no pending webhook older than a threshold whose order exists; no dead letter.

The database is read in one read-only snapshot (no locks) and each product's Redis keys
in one atomic script, so the audit is safe during a sale. What a running sale makes
briefly untrue (a cache refreshed just after a commit, a product between two drainers)
is read again after a grace period, and reported only if it persists.

``repair`` fixes only what the database says for sure: the cache (from the row, only
while no drainer holds the product, compare-and-set against what was read) and lost
wake-ups (``workers.client.rewake_stalled``). Never stock.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis

from flashsale.clock import now_ms
from workers import keys
from workers.decide import ProductState
from workers.planes import HEARTBEAT_MS, Planes, as_planes

CACHE, WAKE = "cache", "wake"  # what --repair can fix
CACHED_FIELDS = ("name", "price_cents", "currency", "stock", "available")
QUEUE_SCAN = 1000  # queued envelopes looked up in the requests table, per product


@dataclass(frozen=True)
class Finding:
    """One discrepancy (or, with ``notice``, something worth knowing that is not drift)."""

    product_id: int | None
    check: str
    message: str
    expected: Any = None
    actual: Any = None
    repair: str | None = None
    notice: bool = False

    @property
    def delta(self) -> int | float | None:
        if isinstance(self.expected, int | float) and isinstance(self.actual, int | float):
            return self.actual - self.expected
        return None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}

    def line(self) -> str:
        where = "service" if self.product_id is None else (
            "catalog" if self.product_id == keys.CATALOG else f"product {self.product_id}")
        text = f"{where}: {self.check}: {self.message}"
        delta = self.delta
        if delta is not None:
            text += f" (off by {delta:+g})"
        if self.repair:
            text += "  [--repair fixes it]"
        return text


# --- the database, read in one snapshot ---------------------------------------------------

@dataclass
class Stored(ProductState):
    """One product as the database has it, with the figures its counters must match."""

    held: int = 0  # units of active holds
    ordered: int = 0  # units of pending_payment orders
    # what was stocked at a known time (creation or the last restock, from the requests
    # table) minus what was sold since; None when no such record is kept any more
    expected_stock: int | None = None
    stock_basis: str = ""
    converted_without_order: int = 0
    order_mismatches: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # acknowledged with 201, no row
    dead_letters: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class PendingWebhook:
    key: str
    product_id: int
    order_id: str
    received_at: int
    order_created_at: int | None  # None: no such order


def check_stored(p: Stored) -> list[Finding]:
    """The product row against the holds, orders and records that explain it (pure)."""
    found: list[Finding] = []
    if p.stock < 0:
        found.append(Finding(p.id, "stock", f"stock is {p.stock}", 0, p.stock))
    if p.reserved < 0 or p.reserved > p.stock:
        found.append(Finding(p.id, "reserved", f"reserved {p.reserved} outside 0..stock "
                             f"({p.stock})", None, p.reserved))
    if p.reserved != p.held + p.ordered:
        found.append(Finding(
            p.id, "reserved", f"row says {p.reserved} reserved, active holds ({p.held}) and "
            f"pending orders ({p.ordered}) reserve {p.held + p.ordered}",
            p.held + p.ordered, p.reserved))
    if p.expected_stock is not None and p.stock != p.expected_stock:
        found.append(Finding(p.id, "stock", f"row says stock {p.stock}, {p.stock_basis} "
                             f"gives {p.expected_stock}", p.expected_stock, p.stock))
    if p.converted_without_order:
        found.append(Finding(p.id, "orders", f"{p.converted_without_order} converted "
                             "hold(s) without an order", 0, p.converted_without_order))
    for problem in p.order_mismatches:
        found.append(Finding(p.id, "orders", problem))
    if p.lost:
        found.append(Finding(p.id, "acknowledged", f"{len(p.lost)} hold(s)/order(s) "
                             f"answered 201 are not in the database: {', '.join(p.lost[:5])}",
                             0, len(p.lost)))
    if p.dead_letters:
        newest = p.dead_letters[0]
        found.append(Finding(p.id, "dead letter", f"{len(p.dead_letters)} request(s) set "
                             f"aside, newest #{newest['id']} {newest['op']} "
                             f"{newest['request_id']}: {newest['error'][:120]} "
                             "(flashsale dead-letters)", 0, len(p.dead_letters)))
    return found


def check_webhooks(pending: Iterable[PendingWebhook], now: int, grace_ms: int
                   ) -> list[Finding]:
    """A pending webhook whose order exists is applied within seconds by the sweep."""
    found = []
    for hook in pending:
        since = max(hook.received_at, hook.order_created_at or 0)
        age_s = (now - since) / 1000
        if age_s * 1000 <= grace_ms:
            continue
        if hook.order_created_at is not None:
            found.append(Finding(hook.product_id, "webhook", f"{hook.key} for {hook.order_id}"
                                 f" pending {age_s:.0f} s after its order existed"))
        else:
            found.append(Finding(hook.product_id, "webhook", f"{hook.key} waits for "
                                 f"{hook.order_id}, unknown for {age_s:.0f} s", notice=True))
    return found


def read_stored(product_ids: list[int] | None = None) -> tuple[list[Stored],
                                                               list[PendingWebhook]]:
    """Every product (or those named) and the figures to check it, in one snapshot."""
    from models import db, is_sqlite

    if not is_sqlite():  # a consistent snapshot whatever the server's default level
        db.execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    with db.atomic():
        products = _products(product_ids)
        _reserving(products)
        _stock_ledger(products)
        _integrity(products)
        _acknowledged(products)
        webhooks = _pending_webhooks(product_ids)
    _dead_letters(products)
    return list(products.values()), webhooks


def _rows(sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    from models import db

    return list(db.execute_sql(sql.replace("%s", db.param), list(params)).fetchall())


def _products(ids: list[int] | None) -> dict[int, Stored]:
    sql = "SELECT id, name, price_cents, currency, stock, reserved FROM products"
    params: list[Any] = []
    if ids:
        sql += f" WHERE id IN ({', '.join(['%s'] * len(ids))})"
        params = list(ids)
    return {row[0]: Stored(*row) for row in _rows(sql + " ORDER BY id", params)}


def _reserving(products: dict[int, Stored]) -> None:
    for pid, units in _rows("SELECT product_id, SUM(qty) FROM holds WHERE status = 'active' "
                            "GROUP BY product_id"):
        if pid in products:
            products[pid].held = int(units)
    for pid, units in _rows("SELECT product_id, SUM(qty) FROM orders "
                            "WHERE status = 'pending_payment' GROUP BY product_id"):
        if pid in products:
            products[pid].ordered = int(units)


def _stock_ledger(products: dict[int, Stored]) -> None:
    """Stock as last set (creation or restock, whose answers carry it) minus sales since.

    A sale in the very batch that set the stock is ambiguous (its order within the batch
    is not kept): then the product is not checked this way.
    """
    anchors: dict[int, tuple[int, int | None, str]] = {}  # pid -> (at, stock, what)
    records = [(pid, at, body, "its creation") for pid, at, body in _rows(
        "SELECT p.id, r.created_at, r.body FROM products p JOIN requests r "
        "ON r.id = p.request_id WHERE r.status_code = 201")]
    records += [(pid, at, body, "the last restock") for pid, at, body in _rows(
        "SELECT product_id, created_at, body FROM requests "
        "WHERE op = 'restock' AND status_code = 200")]
    for pid, at, body, what in records:
        level = int(orjson.loads(body)["stock"])
        known = anchors.get(pid)
        if known is None or at > known[0]:
            anchors[pid] = (at, level, what)
        elif at == known[0] and level != known[1]:  # two in one batch: order unknown
            anchors[pid] = (at, None, what)
    for pid, (at, stock, what) in anchors.items():
        if pid not in products or stock is None:
            continue
        sold, same_batch = _rows(
            "SELECT COALESCE(SUM(qty), 0), COALESCE(SUM(CASE WHEN closed_at = %s THEN 1 "
            "ELSE 0 END), 0) FROM orders WHERE product_id = %s AND status = 'paid' "
            "AND closed_at >= %s", [at, pid, at])[0]
        if int(same_batch) == 0:
            products[pid].expected_stock = int(stock) - int(sold)
            products[pid].stock_basis = (f"{what} ({stock}) minus {int(sold)} sold since")


def _integrity(products: dict[int, Stored]) -> None:
    for pid, count in _rows(
            "SELECT h.product_id, COUNT(*) FROM holds h LEFT JOIN orders o ON o.hold_id = h.id "
            "WHERE h.status = 'converted' AND o.id IS NULL GROUP BY h.product_id"):
        if pid in products:
            products[pid].converted_without_order = int(count)
    for order_id, pid, why in _rows(
            "SELECT o.id, o.product_id, CASE "
            "WHEN h.status <> 'converted' THEN 'its hold is not converted' "
            "WHEN h.qty <> o.qty THEN 'qty differs from its hold' "
            "WHEN h.product_id <> o.product_id THEN 'product differs from its hold' "
            "WHEN o.amount_cents <> o.qty * p.price_cents THEN 'amount is not qty x price' "
            "ELSE 'currency differs from the product' END "
            "FROM orders o JOIN holds h ON h.id = o.hold_id JOIN products p "
            "ON p.id = o.product_id WHERE h.status <> 'converted' OR h.qty <> o.qty "
            "OR h.product_id <> o.product_id OR o.amount_cents <> o.qty * p.price_cents "
            "OR o.currency <> p.currency"):
        if pid in products:
            products[pid].order_mismatches.append(f"order {order_id}: {why}")


def _acknowledged(products: dict[int, Stored]) -> None:
    """Holds and orders answered 201 that are gone. A replayed Idempotency-Key has a
    request row of its own with the first answer: it is found by the id in the body."""
    for op, table, id_field in (("hold", "holds", "hold_id"), ("order", "orders", "order_id")):
        suspects = _rows(
            f"SELECT r.product_id, r.body FROM requests r LEFT JOIN {table} t "
            f"ON t.request_id = r.id WHERE r.op = %s AND r.status_code = 201 AND t.id IS NULL",
            [op])
        named = {orjson.loads(body).get(id_field): pid for pid, body in suspects}
        named.pop(None, None)
        existing: set[str] = set()
        ids = list(named)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            existing |= {row[0] for row in _rows(
                f"SELECT id FROM {table} WHERE id IN ({', '.join(['%s'] * len(chunk))})",
                chunk)}
        for resource_id, pid in named.items():
            if resource_id not in existing and pid in products:
                products[pid].lost.append(resource_id)


def _pending_webhooks(ids: list[int] | None) -> list[PendingWebhook]:
    rows = _rows("SELECT w.idempotency_key, w.product_id, w.order_id, w.received_at, "
                 "o.created_at FROM webhooks w LEFT JOIN orders o ON o.id = w.order_id "
                 "WHERE w.outcome = 'pending'")
    return [PendingWebhook(*row) for row in rows if not ids or row[1] in ids]


def _dead_letters(products: dict[int, Stored]) -> None:
    from workers import deadletters

    for dead in deadletters.list_dead(limit=10_000):
        if dead["product_id"] in products:
            products[dead["product_id"]].dead_letters.append(dead)


# --- Redis, one product at a time ---------------------------------------------------------

# snapshot: KEYS product, queue, inflight, lease, wake -> one product's state, atomically
SNAPSHOT = """
return {redis.call('HGETALL', KEYS[1]), redis.call('LLEN', KEYS[2]),
        redis.call('LLEN', KEYS[3]), redis.call('PTTL', KEYS[4]), redis.call('PTTL', KEYS[5])}
"""

# repair: KEYS product, lease, queue, inflight; ARGV the cache as read (sorted "k=v" lines),
# then the row's field/value pairs. Overwrites the cache only if no drainer holds the
# product and nobody changed the cache since it was read; keeps the admission counters
# unless nothing is queued (then they are 0).
REPAIR = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local h = redis.call('HGETALL', KEYS[1])
local seen = {}
for i = 1, #h, 2 do seen[#seen + 1] = h[i] .. '=' .. h[i + 1] end
table.sort(seen)
if table.concat(seen, '\\n') ~= ARGV[1] then return 0 end
local busy = redis.call('LLEN', KEYS[3]) + redis.call('LLEN', KEYS[4]) > 0
local queued = redis.call('HGET', KEYS[1], 'queued') or 0
local adders = redis.call('HGET', KEYS[1], 'adders') or 0
if not busy then queued, adders = 0, 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'queued', queued, 'adders', adders, unpack(ARGV, 2))
return 1
"""


@dataclass(frozen=True)
class Live:
    """One product's Redis state, read atomically."""

    cache: dict[str, str]
    queued: int
    inflight: int
    lease_ms: int  # PTTL: -2 no lease
    wake_ms: int

    @property
    def leased(self) -> bool:
        return self.lease_ms != -2

    @property
    def busy(self) -> bool:
        return self.leased or self.queued > 0 or self.inflight > 0


@dataclass(frozen=True)
class Control:
    """The service-wide side: who drains, and what waits for a drainer."""

    ready: frozenset[int]
    drainers: int  # drain jobs with a live heartbeat
    workers: int  # rq workers listening on the drain queue
    jobs_waiting: int


def check_live(pid: int, row: Mapping[str, Any] | None, before: Live, after: Live,
               control: Control, applied_in_queue: list[str]) -> list[Finding]:
    """Cache, admission counters and queue progress of one product (pure).

    ``before`` and ``after`` are read around ``row``: the cache is compared only when
    nothing changed it meanwhile.
    """
    found: list[Finding] = []
    live = after
    if row is not None and before.cache == after.cache:
        found += _check_cache(pid, row, live)
    if not live.busy:
        for counter in ("queued", "adders"):
            value = int(live.cache.get(counter, "0") or 0)
            if value:
                found.append(Finding(pid, "admission", f"{counter} is {value} with nothing "
                                     "queued", 0, value, CACHE))
    if live.inflight and not live.leased:
        found.append(Finding(pid, "in flight", f"{live.inflight} request(s) in flight and "
                             "no drainer holds the lease", repair=WAKE))
    if (live.queued or live.inflight) and not live.leased:
        if pid not in control.ready:
            found.append(Finding(pid, "queue", f"{live.queued} queued, not on the ready "
                                 "list, no lease: no drainer will come (lost wake-up)",
                                 repair=WAKE))
        elif not (control.drainers or control.jobs_waiting):
            found.append(Finding(pid, "queue", f"{live.queued} queued and ready, but no "
                                 "drainer is at work and no drain job waits", repair=WAKE))
    if applied_in_queue:
        found.append(Finding(pid, "queue", f"{len(applied_in_queue)} request(s) applied "
                             f"and still queued: {', '.join(applied_in_queue[:3])}",
                             0, len(applied_in_queue)))
    return found


def _check_cache(pid: int, row: Mapping[str, Any], live: Live) -> list[Finding]:
    cache = live.cache
    if "missing" in cache:
        return [Finding(pid, "cache", "cached as unknown, but the product exists",
                        repair=CACHE)]
    if "stock" not in cache:
        return []  # not cached: the next request fills it from the row
    found = []
    for name in CACHED_FIELDS:
        want, got = row[name], cache.get(name)
        same = str(want) == got
        if not same:
            numeric = isinstance(want, int) and got is not None and got.lstrip("-").isdigit()
            found.append(Finding(pid, "cache", f"{name} is {got} in the cache, {want} in "
                                 "the row",
                                 want, int(got) if numeric and got else got, CACHE))
    return found


def control_state(conn: redis.Redis) -> Control:
    now = int(time.time() * 1000)
    pipe = conn.pipeline(transaction=False)
    pipe.lrange(keys.READY, 0, -1)
    pipe.zcount(keys.DRAINERS, now - HEARTBEAT_MS, "+inf")
    pipe.scard(keys.DRAIN_WORKERS)
    pipe.llen(keys.DRAIN_JOBS)
    ready, drainers, workers, jobs = pipe.execute()
    return Control(frozenset(int(p) for p in ready if p.isdigit()), drainers, workers, jobs)


def read_live(conn: Any, pid: int) -> Live:
    """``conn``: the data plane."""
    cache_raw, queued, inflight, lease_ms, wake_ms = conn.register_script(SNAPSHOT)(
        keys=[keys.product(pid), keys.queue(pid), keys.inflight(pid), keys.lease(pid),
              keys.wake(pid)])
    pairs = [v.decode() for v in cache_raw]
    return Live(dict(zip(pairs[::2], pairs[1::2], strict=True)), queued, inflight,
                lease_ms, wake_ms)


def applied_but_queued(conn: Any, pid: int) -> list[str]:
    """Queued request ids that the requests table says were applied already."""
    items: list[bytes] = conn.lrange(keys.queue(pid), 0, QUEUE_SCAN - 1)  # type: ignore[assignment]
    ids = [item.partition(b" ")[0].decode(errors="replace") for item in items]
    if not ids:
        return []
    return [row[0] for row in _rows(
        f"SELECT id FROM requests WHERE id IN ({', '.join(['%s'] * len(ids))})", ids)]


def row_view(pid: int) -> dict[str, Any] | None:
    """The product as the cache should hold it, read now (not in the snapshot)."""
    rows = _rows("SELECT name, price_cents, currency, stock, reserved FROM products "
                 "WHERE id = %s", [pid])
    if not rows:
        return None
    return ProductState(pid, *rows[0]).view()


def audit_live(conn: Any, pid: int, control: Control) -> list[Finding]:
    """``conn``: the data plane."""
    before = read_live(conn, pid)
    row = row_view(pid) if pid != keys.CATALOG else None
    after = read_live(conn, pid)
    return check_live(pid, row, before, after, control, applied_but_queued(conn, pid))


# --- the whole audit ----------------------------------------------------------------------

@dataclass
class Report:
    products: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def drift(self) -> list[Finding]:
        return [f for f in self.findings if not f.notice]

    @property
    def ok(self) -> bool:
        return not self.drift

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "products": self.products,
                "findings": [f.as_dict() for f in self.drift],
                "notices": [f.as_dict() for f in self.findings if f.notice],
                "repaired": self.repaired}

    def text(self) -> str:
        lines = [f.line() for f in self.drift] + [f"note: {f.line()}" for f in self.findings
                                                   if f.notice]
        lines += [f"repaired: {r}" for r in self.repaired]
        affected = {f.product_id for f in self.drift}
        fixable = sum(1 for f in self.drift if f.repair)
        summary = (f"audit: {self.products} product(s) checked, "
                   + ("everything agrees" if self.ok else
                      f"{len(self.drift)} discrepancy(ies) in {len(affected)} place(s)"
                      + (f", {fixable} fixable with --repair" if fixable else "")))
        return "\n".join([*lines, summary])


def run(conn: Planes | redis.Redis, *, product_ids: list[int] | None = None, grace: float = 2.0,
        rounds: int = 3, webhook_grace: float = 10.0, repair: bool = False) -> Report:
    """Audit every product (or those named); with ``repair``, fix the cache and lost
    wake-ups, then check those products again."""
    planes = as_planes(conn)
    stored, webhooks = read_stored(product_ids)
    report = Report(products=len(stored))
    for product in stored:
        report.findings += check_stored(product)
    report.findings += check_webhooks(webhooks, now_ms(), int(webhook_grace * 1000))
    partitions = [p.id for p in stored] + ([] if product_ids else [keys.CATALOG])
    live = _settled_live(planes, partitions, grace, rounds)
    control = control_state(planes.control)
    if control.workers == 0 and any(f.check in ("queue", "in flight") for f in live):
        live.append(Finding(None, "workers", "no rq worker listens on the drain queue"))
    if repair and live:
        report.repaired = _repair(planes, live)
        if report.repaired:
            live = _settled_live(planes, sorted({f.product_id for f in live
                                               if f.product_id is not None}), grace, rounds)
    report.findings += live
    return report


def _settled_live(planes: Planes, partitions: list[int], grace: float, rounds: int
                  ) -> list[Finding]:
    """Live findings that persist over ``rounds`` reads ``grace`` seconds apart."""
    failing = list(partitions)
    findings: dict[int, list[Finding]] = {}
    for attempt in range(rounds):
        if attempt:
            time.sleep(grace)
        control = control_state(planes.control)
        findings = {pid: found for pid in failing
                    if (found := audit_live(planes.data, pid, control))}
        failing = list(findings)
        if not failing:
            break
    return [f for found in findings.values() for f in found]


def _repair(planes: Planes, findings: list[Finding]) -> list[str]:
    done = []
    by_product: dict[int, set[str]] = defaultdict(set)
    for f in findings:
        if f.repair and f.product_id is not None:
            by_product[f.product_id].add(f.repair)
    stalled = [pid for pid, what in by_product.items() if WAKE in what]
    for pid, what in sorted(by_product.items()):
        if CACHE in what:
            fixed = repair_cache(planes.data, pid)
            done.append(f"product {pid}: cache rewritten from the row" if fixed
                        else f"product {pid}: cache not rewritten (a drainer is at work or "
                             "the cache changed; run again)")
    if stalled:
        from workers.client import rewake_stalled

        woken = rewake_stalled(planes, stalled)
        done.append(f"woke {woken} stalled partition(s) of {len(stalled)}: "
                    f"{', '.join(map(str, stalled[:20]))}")
    return done


def repair_cache(conn: Any, pid: int) -> bool:
    """Rewrite the cached product from the row, if nothing changes it meanwhile."""
    from workers.protocol import product_fields

    live = read_live(conn, pid)
    row = row_view(pid)
    if row is None:
        return False
    seen = sorted(f"{k}={v}".encode() for k, v in live.cache.items())
    flat: list[Any] = []
    for name, value in product_fields(row).items():
        flat += [name, value]
    return bool(conn.register_script(REPAIR)(
        keys=[keys.product(pid), keys.lease(pid), keys.queue(pid), keys.inflight(pid)],
        args=[b"\n".join(seen), *flat]))
