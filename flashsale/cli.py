"""The ``flashsale`` command: web, worker, scheduler, migrate, seed, refunds, dead-letters,
run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from typing import Any, cast

import orjson

from flashsale import embedded, logs
from flashsale.config import Settings

log = logging.getLogger("flashsale")

SCHEDULE = (
    # (job id, function, every n seconds; 0 = the sweep interval): fixed ids, so a
    # second scheduler replaces rather than doubles them.
    ("flashsale-sweep", "schedules.jobs.sweep", 0),
    ("flashsale-purge", "schedules.jobs.purge", 3600),
)


def load_settings() -> Settings:
    """Settings from the environment; an unset REDIS_URL means the embedded Redis."""
    settings = Settings.from_env()
    logs.setup(settings.log_json)
    if not settings.redis_url:
        settings = dataclasses.replace(settings, redis_url=embedded.redis_url(settings.data_dir))
    return settings


def init_database(settings: Settings) -> None:
    import models

    models.initialize(settings.database_url)


def cmd_web(args: argparse.Namespace) -> None:
    from gateway import server
    from gateway.app import create_app

    settings = load_settings()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
        pass
    # A crowd arrives at once: a deep listen backlog keeps the kernel from dropping SYNs.
    server.run(create_app(settings), host=args.host, port=settings.port, backlog=4096,
               announce=log.info)


def cmd_worker(args: argparse.Namespace) -> None:
    import redis

    from workers.worker import serve_metrics, work

    settings = load_settings()
    init_database(settings)
    if settings.worker_metrics_port:
        serve_metrics(settings.worker_metrics_port)
    os.environ["REDIS_URL"] = settings.redis_url  # drain jobs read their settings from env
    work(redis.Redis.from_url(settings.redis_url), burst=args.burst)


def cmd_scheduler(args: argparse.Namespace) -> None:
    import redis

    from schedules.scheduler import run

    settings = load_settings()
    every = settings.sweep_interval_seconds
    periodic = [(job_id, func, seconds or every) for job_id, func, seconds in SCHEDULE]
    log.info("scheduler starting: sweep every %ss", every)
    run(redis.Redis.from_url(settings.redis_url), periodic, interval=every)


def cmd_migrate(args: argparse.Namespace) -> None:
    from models.migrate import migrate

    settings = load_settings_without_redis()
    init_database(settings)
    version = migrate()
    print(f"schema at version {version} ({settings.database_url.split('@')[-1]})")


def load_settings_without_redis() -> Settings:
    settings = Settings.from_env()
    logs.setup(settings.log_json)
    return settings


def cmd_seed(args: argparse.Namespace) -> None:
    from flashsale.clock import now_ms
    from models import Product

    settings = load_settings_without_redis()
    init_database(settings)
    product = Product.get_or_none(Product.name == args.name)
    if product is None:
        product = Product.create(name=args.name, price_cents=args.price_cents,
                                 currency=args.currency, stock=args.stock, reserved=0,
                                 created_at=now_ms())
    print(product.id)


def cmd_refunds(args: argparse.Namespace) -> None:
    import peewee as pw

    from flashsale.clock import rfc3339
    from models import Order, Webhook

    settings = load_settings_without_redis()
    init_database(settings)
    # A payment for an order that was never created has no amount here: the provider's
    # record of the event has it.
    rows = (Webhook.select(Webhook.received_at, Webhook.idempotency_key, Webhook.order_id,
                           Order.amount_cents, Order.currency)
            .join(Order, pw.JOIN.LEFT_OUTER, on=(Order.id == Webhook.order_id))
            .where(Webhook.refund_due == True)  # noqa: E712 - peewee expression
            .order_by(Webhook.received_at).dicts())
    print(f"{'received_at':<25} {'idempotency_key':<24} {'order_id':<25} amount")
    count = 0
    for row in cast(Iterable[dict[str, Any]], rows):
        amount = (f"{row['amount_cents'] / 100:.2f} {row['currency']}"
                  if row["amount_cents"] is not None else "(order never created)")
        print(f"{rfc3339(row['received_at']):<25} {row['idempotency_key']:<24} "
              f"{row['order_id']:<25} {amount}")
        count += 1
    print(f"{count} payment(s) to refund")


def cmd_dead_letters(args: argparse.Namespace) -> None:
    """Requests the writer set aside; --replay ID queues one again."""
    from flashsale.clock import rfc3339
    from workers import deadletters
    from workers.planes import Planes

    settings = load_settings()
    init_database(settings)
    if args.replay is not None:
        planes = Planes.connect(settings)
        if not deadletters.replay(planes, args.replay, settings.job_ttl_seconds):
            raise SystemExit(f"no dead letter {args.replay} waiting for a replay")
        print(f"dead letter {args.replay} queued again")
        return
    rows = deadletters.list_dead(args.limit, include_replayed=args.all)
    print(f"{'id':>6} {'created_at':<25} {'product':>8} {'op':<10} {'status':>6} "
          f"{'request_id':<24} error")
    for row in rows:
        print(f"{row['id']:>6} {rfc3339(row['created_at']):<25} {row['product_id']:>8} "
              f"{row['op']:<10} {row['status']:>6} {row['request_id']:<24} "
              f"{row['error'][:120]}")
    print(f"{len(rows)} dead letter(s)" + ("" if args.all else " waiting"))


def cmd_customers(args: argparse.Namespace) -> None:
    """Who holds or bought how many units of a product (units that count for the limit)."""
    from flashsale.clock import now_ms
    from models import Hold, HoldStatus, Order, OrderStatus

    settings = load_settings_without_redis()
    init_database(settings)
    now = now_ms()
    units: dict[str, dict[str, int]] = {}
    held = (Hold.select(Hold.customer_id, pw_sum(Hold.qty))
            .where((Hold.product == args.product_id) & Hold.customer_id.is_null(False)
                   & (Hold.status == HoldStatus.ACTIVE) & (Hold.expires_at > now))
            .group_by(Hold.customer_id).tuples())
    for who, qty in cast(Iterable[tuple[str, int]], held):
        units.setdefault(who, {"held": 0, "pending": 0, "paid": 0})["held"] = int(qty)
    ordered = (Order.select(Order.customer_id, Order.status, pw_sum(Order.qty))
               .where((Order.product == args.product_id) & Order.customer_id.is_null(False)
                      & (((Order.status == OrderStatus.PENDING_PAYMENT) & (Order.pay_by > now))
                         | (Order.status == OrderStatus.PAID)))
               .group_by(Order.customer_id, Order.status).tuples())
    for who, status, qty in cast(Iterable[tuple[str, str, int]], ordered):
        column = "paid" if status == OrderStatus.PAID else "pending"
        units.setdefault(who, {"held": 0, "pending": 0, "paid": 0})[column] = int(qty)
    ranked = sorted(units.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    print(f"{'customer':<40} {'held':>6} {'pending':>8} {'paid':>6} {'total':>6}")
    for who, row in ranked[:args.limit]:
        print(f"{who:<40} {row['held']:>6} {row['pending']:>8} {row['paid']:>6} "
              f"{sum(row.values()):>6}")
    print(f"{len(units)} customer(s) with units of product {args.product_id}")


def cmd_rate_limited(args: argparse.Namespace) -> None:
    """Clients refused by the rate limit in the last minutes, most refused first."""
    import time

    import redis

    from gateway.customers import refused_key

    settings = load_settings()
    conn = redis.Redis.from_url(settings.redis_url)
    minute = int(time.time() // 60)
    totals: dict[str, float] = {}
    for key in (refused_key(m) for m in range(minute - args.minutes + 1, minute + 1)):
        rows = cast(list[tuple[bytes, float]], conn.zrange(key, 0, -1, withscores=True))
        for client, count in rows:
            name = client.decode(errors="replace")
            totals[name] = totals.get(name, 0) + count
    print(f"{'client':<60} {'refused':>8}")
    for name, total in sorted(totals.items(), key=lambda item: -item[1])[:args.limit]:
        print(f"{name:<60} {int(total):>8}")
    print(f"{len(totals)} client(s) rate-limited in the last {args.minutes} minute(s)")


def pw_sum(field: Any) -> Any:
    import peewee

    return peewee.fn.SUM(field)


def cmd_audit(args: argparse.Namespace) -> None:
    """Exit 0 when the database, the cache and the queues agree, 1 when anything drifts."""
    from flashsale import audit
    from workers.planes import Planes

    settings = load_settings()
    init_database(settings)
    report = audit.run(Planes.connect(settings), product_ids=args.product,
                       grace=args.grace, webhook_grace=args.webhook_grace, repair=args.repair)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2))
        print()
    else:
        print(report.text())
    sys.exit(0 if report.ok else 1)


def cmd_inspect(args: argparse.Namespace) -> None:
    """Queues, leases, drainers, the ready list and dead letters, as tables."""
    from flashsale import inspect
    from models import Product
    from workers import deadletters
    from workers.planes import Planes

    settings = load_settings()
    init_database(settings)
    planes = Planes.connect(settings)
    try:
        product_ids = [p.id for p in Product.select(Product.id)]
        dead: list[dict[str, Any]] | None = deadletters.list_dead(args.limit)
    except Exception as exc:  # the queues are worth seeing even without the database
        log.warning("database unavailable: %s", exc)
        product_ids, dead = [], None
    print(inspect.render(planes, product_ids, settings.job_ttl_seconds, dead, args.limit))


def cmd_run(args: argparse.Namespace) -> None:
    """Everything on one machine: embedded Redis and SQLite unless told otherwise."""
    from honcho.manager import Manager

    settings = load_settings()
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               PORT=str(settings.port), PYTHONUNBUFFERED="1")
    token_source = "ADMIN_TOKEN" if settings.admin_token else (
        f"kept in {embedded.admin_token_path(settings.data_dir)}; ADMIN_TOKEN overrides it")
    env["ADMIN_TOKEN"] = settings.admin_token or embedded.admin_token(settings.data_dir)
    os.environ.update(env)
    cmd_migrate(args)
    seeded = _seed_demo(settings)
    exe = f"{sys.executable} -m flashsale.cli"
    manager = Manager()
    manager.add_process("web", f"{exe} web", env=env)
    for n in range(args.workers):
        manager.add_process(f"worker.{n + 1}", f"{exe} worker", env=env)
    manager.add_process("scheduler", f"{exe} scheduler", env=env)
    url = f"http://127.0.0.1:{settings.port}"
    print(f"""
flash-sale checkout is starting on {url}  (Ctrl-C stops it)
  database: {settings.database_url}
  redis:    {settings.redis_url}
  admin:    Authorization: Bearer {env['ADMIN_TOKEN']}
            ({token_source})
  docs:     {url}/docs    metrics: {url}/metrics

Try it:
  curl -s {url}/api/products/{seeded}
  curl -s -X POST {url}/api/holds -H 'Content-Type: application/json' \\
       -d '{{"product_id": {seeded}, "qty": 1}}'
""", flush=True)
    try:
        with foreground():
            manager.loop()
    finally:
        if not os.environ.get("FLASHSALE_KEEP_REDIS") and embedded.is_embedded(
                settings.redis_url, settings.data_dir):
            embedded.stop(settings.data_dir)
    # Ctrl-C (130) or SIGTERM (143) is how this is meant to stop: not a failure.
    sys.exit(0 if manager.returncode in (130, 143) else manager.returncode)


@contextlib.contextmanager
def foreground() -> Iterator[None]:
    """Make this process group the terminal's foreground group while it runs, so that
    Ctrl-C reaches only `flashsale run` and its processes, not a `make` that started it
    (make would print an error line for the interrupt)."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else -1
    before = os.tcgetpgrp(fd) if fd >= 0 else -1
    if before != os.getpgrp():  # no terminal, or started in the background: leave it be
        yield
        return
    ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may not
    try:  # change the foreground group without this
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:  # a session leader already owns its terminal
        pass
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, before)
        signal.signal(signal.SIGTTOU, ttou)


def _seed_demo(settings: Settings) -> int:
    from flashsale.clock import now_ms
    from models import Product

    init_database(settings)
    product = Product.get_or_none(Product.name == DEMO["name"])
    if product is None:
        product = Product.create(**DEMO, reserved=0, created_at=now_ms())
    return product.id


DEMO = {"name": "Demo sneaker drop", "price_cents": 1999, "currency": "USD", "stock": 100}


def add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="check that the database, the product cache and "
                           "the queues agree; exit 1 on any discrepancy")
    audit.add_argument("--json", action="store_true", help="one JSON document")
    audit.add_argument("--repair", action="store_true",
                       help="rewrite drifted caches from the database and wake stalled "
                            "queues (never changes stock)")
    audit.add_argument("--product", type=int, action="append",
                       help="only this product (repeatable)")
    audit.add_argument("--grace", type=float, default=2.0,
                       help="seconds between the reads of a product that looks off while "
                            "it is being drained (default 2)")
    audit.add_argument("--webhook-grace", type=float, default=10.0,
                       help="a webhook pending this long after its order exists is "
                            "reported (default 10 s)")
    audit.set_defaults(func=cmd_audit)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has options of its own
        from bench.__main__ import main as bench_main

        sys.exit(bench_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="flashsale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    web = sub.add_parser("web", help="the HTTP gateway (PORT)")
    web.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    web.set_defaults(func=cmd_web)
    worker = sub.add_parser("worker", help="an rq worker draining product queues")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("scheduler", help="periodic expiry, webhook retry and re-wake") \
        .set_defaults(func=cmd_scheduler)
    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=cmd_migrate)
    seed = sub.add_parser("seed", help="create a product directly in the database")
    seed.add_argument("--name", default=DEMO["name"])
    seed.add_argument("--price-cents", type=int, default=DEMO["price_cents"])
    seed.add_argument("--currency", default=DEMO["currency"])
    seed.add_argument("--stock", type=int, default=DEMO["stock"])
    seed.set_defaults(func=cmd_seed)
    sub.add_parser("refunds", help="payments to refund: for cancelled orders, or for "
                   "orders never created").set_defaults(func=cmd_refunds)
    dead = sub.add_parser("dead-letters", help="requests the writer set aside; replay one")
    dead.add_argument("--replay", type=int, metavar="ID", help="queue dead letter ID again")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--all", action="store_true", help="include replayed ones")
    dead.set_defaults(func=cmd_dead_letters)
    customers = sub.add_parser("customers", help="top customers of a product: units held, "
                               "on order and bought")
    customers.add_argument("product_id", type=int)
    customers.add_argument("--limit", type=int, default=20)
    customers.set_defaults(func=cmd_customers)
    limited = sub.add_parser("rate-limited", help="clients refused by the rate limit lately")
    limited.add_argument("--minutes", type=int, default=10, choices=range(1, 61),
                         metavar="1-60")
    limited.add_argument("--limit", type=int, default=50)
    limited.set_defaults(func=cmd_rate_limited)
    sub.add_parser("bench", help="load-test a deployment: flashsale bench --help "
                   "(docs/BENCHMARKS.md)")
    add_audit_parser(sub)
    inspect = sub.add_parser("inspect", help="queues, in-flight batches, leases, drainers, "
                             "the ready list and dead letters, as tables")
    inspect.add_argument("--limit", type=int, default=50, help="rows per table (default 50)")
    inspect.set_defaults(func=cmd_inspect)
    run = sub.add_parser("run", help="all-in-one local mode (web, workers, scheduler)")
    run.add_argument("--workers", type=int, default=2)
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
