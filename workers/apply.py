"""Apply the batches of one or several products in one database transaction.

lock -> load -> pure decision (``Ledger``, per product) -> bulk write -> commit. The
products' rows are locked in id order, and the statements every batch runs (the locks,
the replay check, the new holds, the request records) are shared by all products of the
transaction, so one commit and a handful of statements serve everything ready. If that
transaction fails, each product is applied on its own, and a product's batch that fails
is retried one request per transaction, so only the offending request fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import peewee as pw

from flashsale.clock import now_ms
from flashsale.problems import problem
from models import (
    Hold,
    HoldStatus,
    IdempotencyRecord,
    Order,
    OrderStatus,
    Product,
    RequestRecord,
    Statement,
    Webhook,
    atomic,
    db,
    execute_batch,
    is_sqlite,
)
from workers import deadletters, keys
from workers.deadletters import DeadRequest
from workers.decide import Ledger, Policy, ProductState, Request, Result, WebhookState
from workers.keys import hold_id_for, order_id_for
from workers.reads import hold_state, order_state

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a committed batch answers, and the product as it now stands."""

    results: dict[str, Result]
    product: dict[str, Any] | None
    revised: dict[str, Result] = field(default_factory=dict)
    dead: list[DeadRequest] = field(default_factory=list)  # set aside, answered alone
    # The round trip of its transaction's writes and COMMIT (on SQLite the COMMIT after
    # them): the wait for durability, an fsync with the default settings.
    commit_seconds: float = 0.0


def apply_batches(batches: dict[int, list[Request]], policy: Policy) -> dict[int, Outcome]:
    """Apply several products' batches, each in its own queue order, in one transaction.

    A transaction only ever groups products of one database: with the database sharded
    by product, the drainer groups the products of one shard (docs/ARCHITECTURE.md).
    """
    if len(batches) > 1:
        try:
            return _transaction(partial(_apply_many, batches, policy))
        except Exception as exc:
            if database_unavailable(exc):
                raise
            log.warning("transaction of %d products failed (%r); applying each alone",
                        len(batches), exc)
    return {pid: apply_batch(pid, requests, policy) for pid, requests in batches.items()}


def apply_batch(product_id: int, requests: list[Request], policy: Policy) -> Outcome:
    """Apply ``requests`` in order in one transaction; one per request if that fails.

    A request that fails on its own (a tripped guard, a value the database refuses, a
    bug) is answered alone and set aside as a dead letter; the others are applied. Only
    an unreachable database stops the batch: it stays in flight and is applied again.
    """
    try:
        return _transaction(partial(_apply_many, {product_id: requests}, policy))[product_id]
    except Exception as exc:
        if database_unavailable(exc):
            raise
        log.warning("batch of %d on product %d failed (%r); applying one by one",
                    len(requests), product_id, exc)
    outcome = Outcome(results={}, product=None)
    for req in requests:
        try:
            one = _transaction(partial(_apply_many, {product_id: [req]}, policy))[product_id]
            outcome.commit_seconds += one.commit_seconds
        except Exception as exc:
            if database_unavailable(exc):
                raise
            log.error("request %s on product %d set aside: %r", req.id, product_id, exc)
            one = _set_aside(product_id, req, exc)
        outcome.results.update(one.results)
        outcome.revised.update(one.revised)
        outcome.dead.extend(one.dead)
        outcome.product = one.product or outcome.product
    return outcome


DEADLOCK_RETRIES = 3


def _transaction(work: Callable[[], dict[int, Outcome]]) -> dict[int, Outcome]:
    """``work`` in one transaction, run again when the database chose it as a deadlock
    victim or timed out a lock wait (concurrent inserts into shared indexes can). On
    MySQL its COMMIT went with its writes (``_write``); a COMMIT sent alone at the end of
    the block (SQLite's) is added to the outcomes' ``commit_seconds``."""
    for attempt in range(DEADLOCK_RETRIES):
        try:
            with atomic():
                outcomes = work()
                ending = time.perf_counter()
            ended = time.perf_counter() - ending
            for outcome in outcomes.values():
                outcome.commit_seconds += ended
            return outcomes
        except pw.OperationalError as exc:
            if not exc.args or exc.args[0] not in (1205, 1213) or \
                    attempt == DEADLOCK_RETRIES - 1:
                raise
            log.warning("transaction retried after %r", exc)
    raise AssertionError("unreachable")


# MySQL client and server errors that mean "not now" rather than "not this request":
# lost or refused connections, a server going away or shutting down, lock timeouts.
_TRANSIENT_MYSQL = {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031}


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot be used now, whatever the request."""
    if isinstance(exc, pw.InterfaceError):
        return True
    if isinstance(exc, pw.OperationalError):
        code = exc.args[0] if exc.args else None
        if isinstance(code, int):
            return code in _TRANSIENT_MYSQL
        return any(word in str(exc).lower() for word in ("locked", "busy", "unable to open"))
    return isinstance(exc, (ConnectionError, TimeoutError))


def _set_aside(product_id: int, req: Request, exc: Exception) -> Outcome:
    """Answer a request that cannot be applied, and keep it as a dead letter."""
    if isinstance(exc, pw.IntegrityError):
        result = Result(409, problem(409, "Conflict", "The request conflicts with the current "
                                     "state and was not applied", slug="conflict"))
    elif isinstance(exc, pw.DataError):
        result = Result(422, problem(422, "Request cannot be applied", "A value derived from "
                                     "the request does not fit what the service stores",
                                     slug="cannot-be-applied"))
    else:
        result = Result(500, problem(500, detail="The request could not be applied; it was "
                                     "set aside for an operator", slug="set-aside"))
    dead = DeadRequest(req, product_id, f"{type(exc).__name__}: {exc}"[:2000], result.status)
    try:
        with atomic():
            product = _lock_product(product_id)
            RequestRecord.insert(
                id=req.id, product_id=product_id, op=req.op, status_code=result.status,
                body=orjson.dumps(result.body).decode(), created_at=now_ms(),
            ).on_conflict_ignore().execute()
            deadletters.record(dead, now_ms())
    except Exception as again:
        if database_unavailable(again):
            raise
        log.error("request %s on product %d: could not record it (%r); answered only",
                  req.id, product_id, again)
        product = None
    return Outcome({req.id: result}, product.view() if product else None, dead=[dead])


def _apply_many(batches: dict[int, list[Request]], policy: Policy) -> dict[int, Outcome]:
    pids = sorted(batches)
    # One round trip: lock the products' rows, and read the results of requests already
    # applied (by this batch's crashed predecessor, or an Idempotency-Key's first request).
    locks = _lock_statements(pids)
    rows = execute_batch(locks + _committed_statements([r.id for pid in pids
                                                        for r in batches[pid]]))
    products = _products(rows[:len(locks)])
    committed = _results(rows[len(locks):])
    now = now_ms()  # read under the locks: decisions of one partition never go back in time
    done: list[tuple[Ledger, int, list[Request]]] = []
    for pid in pids:
        requests = batches[pid]
        ledger = Ledger(product=products.get(pid), now=now, policy=policy,
                        results={r.id: committed[r.id] for r in requests if r.id in committed})
        _load(ledger, pid, requests)
        todo = [r for r in requests if r.id not in ledger.results]
        ledger.apply([r for r in todo if r.op != "create_product"])
        ledger.answers.update(_create_products(todo, now))
        done.append((ledger, pid, todo))
    writing = time.perf_counter()
    _write(done)  # the transaction's last statements, and its COMMIT
    write_seconds = time.perf_counter() - writing
    return {pid: Outcome({r.id: ledger.results.get(r.id) or ledger.answers[r.id]
                          for r in batches[pid]},
                         ledger.product.view() if ledger.product else None,
                         ledger.revised_results(), commit_seconds=write_seconds)
            for ledger, pid, _ in done}


# The statements every batch runs are written out: building them with peewee's query
# builder cost more CPU than the database spent running them.

def _lock_statements(product_ids: list[int]) -> list[Statement]:
    """Lock the products' rows in id order against any other writer until commit. The
    catalog partition has no product row: its own row in partition_locks is locked."""
    lock = "" if is_sqlite() else " FOR UPDATE"
    ids = [pid for pid in product_ids if pid != keys.CATALOG]
    statements: list[Statement] = []
    if len(ids) < len(product_ids):
        statements.append((f"SELECT id FROM partition_locks WHERE id = {db.param}{lock}",
                           (keys.CATALOG,)))
    for chunk in _chunks(ids):
        statements.append((f"SELECT id, name, price_cents, currency, stock, reserved "
                           f"FROM products WHERE id IN ({_params(len(chunk))}) "
                           f"ORDER BY id{lock}", chunk))
    return statements


def _products(results: list[list[tuple[Any, ...]]]) -> dict[int, ProductState]:
    """The locked products' rows (the partition lock's row says nothing)."""
    return {row[0]: ProductState(*row) for rows in results for row in rows if len(row) > 1}


def _lock_product(product_id: int) -> ProductState | None:
    return _products(execute_batch(_lock_statements([product_id]))).get(product_id)


def _committed_statements(request_ids: list[str]) -> list[Statement]:
    return [(f"SELECT id, status_code, body FROM requests WHERE id IN "
             f"({_params(len(chunk))})", chunk) for chunk in _chunks(request_ids)]


def _results(results: list[list[tuple[Any, ...]]]) -> dict[str, Result]:
    return {request_id: Result(status, orjson.loads(body))
            for rows in results for request_id, status, body in rows}


def _committed(request_ids: list[str]) -> dict[str, Result]:
    """Results of requests already applied."""
    return _results(execute_batch(_committed_statements(request_ids)))


def _params(n: int) -> str:
    return ", ".join([db.param] * n)


def _insert(table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
            ) -> list[Statement]:
    """One multi-row INSERT per 500 rows."""
    row = "(" + _params(len(columns)) + ")"
    return [(f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * len(chunk)),
             [v for r in chunk for v in r]) for chunk in _chunks(rows)]


def _chunks(values: Iterable[Any], size: int = 500) -> Iterable[list[Any]]:
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _load(ledger: Ledger, product_id: int, requests: list[Request]) -> None:
    """Read, in a few queries, every row the batch's decisions depend on (the committed
    results of its own requests are loaded for all products at once)."""
    todo = [r for r in requests if r.id not in ledger.results]
    ops = {r.op for r in todo}

    idem = {r.idem[0] for r in todo if r.idem and r.op != "webhook"}
    if idem:
        records = list(IdempotencyRecord.select().where(IdempotencyRecord.id.in_(idem)))
        ledger.idempotency.update({rec.id: (rec.fingerprint, rec.request_id)
                                   for rec in records})
        ledger.results.update(_committed([rec.request_id for rec in records
                                          if rec.request_id not in ledger.results]))
    if ops == {"hold"} and product_id != keys.CATALOG:  # a rush: no other row to read
        _load_holders(ledger, product_id, todo)
        return

    hold_ids = {str(r.args["hold_id"]) for r in todo if r.op == "order"}
    hook_keys = {str(r.args["idempotency_key"]) for r in todo if r.op == "webhook"}
    hook_orders = {str(r.args["order_id"]) for r in todo if r.op == "webhook"}
    # Webhooks already waiting for the orders that this batch's orders and webhooks name.
    new_orders = hook_orders | {str(r.args["order_id"]) for r in todo if r.op == "order"}
    if hook_keys:
        _load_webhooks(ledger, Webhook.idempotency_key.in_(list(hook_keys)))
    if "retry_webhooks" in ops:
        _load_webhooks(ledger, (Webhook.product_id == product_id)
                       & (Webhook.outcome == "pending"))
    if product_id == keys.CATALOG:  # webhooks for orders of no product: nothing else
        return
    _load_holders(ledger, product_id, todo)
    if hold_ids:
        _load_holds(ledger, (Hold.id.in_(list(hold_ids))) & (Hold.product == product_id))
        _load_orders(ledger, Order.hold.in_(list(hold_ids)))
    if hook_orders:  # their orders, or the holds that would have become them
        _load_orders(ledger, Order.id.in_(list(hook_orders)))
        _load_holds(ledger, Hold.id.in_([hold_id_for(o) for o in hook_orders])
                    & (Hold.product == product_id))
    if "expire" in ops:
        _load_holds(ledger, (Hold.product == product_id) & (Hold.status == HoldStatus.ACTIVE)
                    & (Hold.expires_at <= ledger.now))
        _load_orders(ledger, (Order.product == product_id)
                     & (Order.status == OrderStatus.PENDING_PAYMENT)
                     & (Order.pay_by <= ledger.now))
        # webhooks waiting for orders that the expiring holds will never become
        new_orders |= {order_id_for(h.id) for h in ledger.holds.values()
                       if h.status == HoldStatus.ACTIVE}
    if new_orders:  # webhooks that arrived before their order
        _load_webhooks(ledger, (Webhook.order_id.in_(list(new_orders)))
                       & (Webhook.outcome == "pending"))
    if "retry_webhooks" in ops:
        pending = {h.order_id for h in ledger.webhooks.values() if h.outcome == "pending"}
        if pending:
            _load_orders(ledger, Order.id.in_(list(pending)))
            _load_holds(ledger, Hold.id.in_([hold_id_for(o) for o in pending])
                        & (Hold.product == product_id))


def _load_holders(ledger: Ledger, product_id: int, todo: list[Request]) -> None:
    """The units of the product held by the customers of the batch's holds, when a
    customer may hold only so many."""
    if ledger.policy.max_qty_per_customer is not None:
        _load_customer_units(ledger, product_id, {str(r.args["customer_id"]) for r in todo
                                                  if r.op == "hold" and r.args.get("customer_id")})


def _load_customer_units(ledger: Ledger, product_id: int, customers: set[str]) -> None:
    """Units each customer has of the product now: active holds, pending and paid orders
    (expired holds and cancelled or timed-out orders no longer count)."""
    if not customers:
        return
    now = ledger.now
    holds = (Hold.select(Hold.customer_id, pw.fn.SUM(Hold.qty))
             .where((Hold.product == product_id) & Hold.customer_id.in_(list(customers))
                    & (Hold.status == HoldStatus.ACTIVE) & (Hold.expires_at > now))
             .group_by(Hold.customer_id))
    orders = (Order.select(Order.customer_id, pw.fn.SUM(Order.qty))
              .where((Order.product == product_id) & Order.customer_id.in_(list(customers))
                     & (((Order.status == OrderStatus.PENDING_PAYMENT) & (Order.pay_by > now))
                        | (Order.status == OrderStatus.PAID)))
              .group_by(Order.customer_id))
    units = dict.fromkeys(customers, 0)
    for customer, qty in [*holds.tuples(), *orders.tuples()]:
        units[customer] += int(qty)
    ledger.customer_units.update(units)


def _load_holds(ledger: Ledger, where: pw.Expression) -> None:
    for row in Hold.select().where(where):
        ledger.holds.setdefault(row.id, hold_state(row))


def _load_orders(ledger: Ledger, where: pw.Expression) -> None:
    for row in Order.select().where(where):
        order = ledger.orders.setdefault(row.id, order_state(row))
        if order.hold_id in ledger.holds:
            ledger.holds[order.hold_id].order_id = order.id


def _load_webhooks(ledger: Ledger, where: pw.Expression) -> None:
    for row in Webhook.select().where(where):
        ledger.webhooks.setdefault(row.idempotency_key, WebhookState(
            key=row.idempotency_key, order_id=row.order_id, product_id=row.product_id,
            status=row.status, fingerprint=row.fingerprint, request_id=row.request_id,
            received_at=row.received_at, outcome=row.outcome,
            response=Result(row.response_status, orjson.loads(row.response_body)),
            refund_due=row.refund_due, applied_at=row.applied_at,
            arrival=row.arrival if row.arrival is not None else row.received_at * 1000))


def _create_products(requests: list[Request], now: int) -> dict[str, Result]:
    """Product creation, serialized on the catalog partition."""
    results = {}
    for req in requests:
        if req.op != "create_product":
            continue
        args = req.args
        product_id = Product.insert(name=args["name"], price_cents=args["price_cents"],
                                    currency=args["currency"], stock=args["stock"],
                                    reserved=0, created_at=now, request_id=req.id).execute()
        view = ProductState(id=product_id, name=args["name"], price_cents=args["price_cents"],
                            currency=args["currency"], stock=args["stock"], reserved=0).view()
        results[req.id] = Result(201, view)
    return results


def _write(done: list[tuple[Ledger, int, list[Request]]]) -> None:
    """Persist what the ledgers decided and commit, in one round trip: a handful of
    multi-row statements for all the transaction's products, and per product only what
    its rarer requests changed (holds before the orders that name them, requests last),
    then COMMIT (on MySQL; it runs only if every statement before it succeeded)."""
    statements = _update_products([lg.product for lg, _, _ in done
                                   if lg.product is not None and lg.product_dirty])
    statements += _insert("holds", ("id", "product_id", "qty", "status", "created_at",
                                    "expires_at", "request_id", "customer_id"),
                          [(h.id, h.product_id, h.qty, str(h.status), h.created_at,
                            h.expires_at, h.request_id, h.customer_id)
                           for lg, _, _ in done for h in lg.new_holds])
    for ledger, pid, _ in done:
        statements += _write_rest(ledger, pid)
    statements += _insert("requests", ("id", "product_id", "op", "status_code", "body",
                                       "created_at"),
                          [(r.id, pid, r.op, lg.answers[r.id].status,
                            orjson.dumps(lg.answers[r.id].body).decode(), lg.now)
                           for lg, pid, todo in done for r in todo])
    execute_batch(statements, commit=True)


def _update_products(products: list[ProductState]) -> list[Statement]:
    """The counters of every product the transaction changed, by primary key only.

    On MySQL, one UPDATE per 500 products: their new counters as a derived table joined
    to ``products`` with STRAIGHT_JOIN, so that the derived table is read first and each
    product row is found by its key (``eq_ref``) and locked alone. A single
    ``UPDATE ... CASE id ... WHERE id IN (...)`` was planned as a scan of the whole
    (small) table, which under REPEATABLE READ locked every product row it passed, so
    two drainers' rounds on different products waited for each other and deadlocked.
    One product, or SQLite: an UPDATE by primary key each."""
    if len(products) == 1 or is_sqlite():
        return [(f"UPDATE products SET stock = {db.param}, reserved = {db.param} "
                 f"WHERE id = {db.param}", (p.stock, p.reserved, p.id)) for p in products]
    statements: list[Statement] = []
    for chunk in _chunks(products):
        rows = " UNION ALL ".join(
            [f"SELECT {db.param} AS id, {db.param} AS stock, {db.param} AS reserved"]
            + [f"SELECT {_params(3)}"] * (len(chunk) - 1))
        statements.append((f"UPDATE ({rows}) AS v STRAIGHT_JOIN products AS p ON p.id = v.id "
                           "SET p.stock = v.stock, p.reserved = v.reserved",
                           [v for p in chunk for v in (p.id, p.stock, p.reserved)]))
    return statements


def _write_rest(ledger: Ledger, product_id: int) -> list[Statement]:
    """The statements of what a product's rarer requests changed (peewee queries,
    rendered to be sent with the round's others)."""
    if not ledger.changed_more_than_holds():  # (a rush's batch)
        return []
    queries: list[Any] = []
    new_ids = {h.id for h in ledger.new_holds}
    queries += _update_status(Hold, [ledger.holds[i] for i in ledger.dirty_holds
                                     if i not in new_ids])
    for rows in _chunks([{"id": o.id, "hold": o.hold_id, "product": o.product_id, "qty": o.qty,
                          "amount_cents": o.amount_cents, "currency": o.currency,
                          "status": str(o.status), "created_at": o.created_at,
                          "pay_by": o.pay_by, "closed_at": o.closed_at,
                          "request_id": o.request_id, "customer_id": o.customer_id}
                         for o in ledger.new_orders]):
        queries.append(Order.insert_many(rows))
    new_ids = {o.id for o in ledger.new_orders}
    dirty_orders = [ledger.orders[i] for i in ledger.dirty_orders if i not in new_ids]
    for order in dirty_orders:
        queries.append(Order.update(status=str(order.status), closed_at=order.closed_at)
                       .where(Order.id == order.id))
    for hook in ledger.new_webhooks:
        queries.append(Webhook.insert(**_webhook_row(hook)))
    for hook in ledger.webhook_updates():
        queries.append(Webhook.update(**_webhook_row(hook)).where(
            Webhook.idempotency_key == hook.key))
    for request_id, result in ledger.revised_results().items():
        queries.append(RequestRecord.update(status_code=result.status,
                                            body=orjson.dumps(result.body).decode())
                       .where(RequestRecord.id == request_id))
    if ledger.new_idempotency:
        queries.append(IdempotencyRecord.insert_many(
            [{"id": k, "fingerprint": fp, "request_id": rid, "created_at": ledger.now,
              "product_id": product_id}
             for k, (fp, rid) in ledger.new_idempotency.items()]))
    return [query.sql() for query in queries]


def _update_status(model: type[Hold], rows: list[Any]) -> list[Any]:
    by_status: dict[str, list[str]] = {}
    for row in rows:
        by_status.setdefault(str(row.status), []).append(row.id)
    return [model.update(status=status).where(model.id.in_(chunk))
            for status, ids in by_status.items() for chunk in _chunks(ids)]


def _webhook_row(hook: WebhookState) -> dict[str, Any]:
    return {"idempotency_key": hook.key, "order_id": hook.order_id,
            "product_id": hook.product_id, "status": hook.status,
            "fingerprint": hook.fingerprint, "outcome": hook.outcome,
            "response_status": hook.response.status,
            "response_body": orjson.dumps(hook.response.body).decode(),
            "refund_due": hook.refund_due, "received_at": hook.received_at,
            "arrival": hook.arrival,
            "applied_at": hook.applied_at, "request_id": hook.request_id}
