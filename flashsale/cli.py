"""The ``flashsale`` command: web, worker, scheduler, migrate, seed, refunds, dead-letters,
run."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys
from collections.abc import Iterable
from typing import Any, cast

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
    from aiohttp import web

    from gateway.app import create_app

    settings = load_settings()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
        pass
    # A crowd arrives at once: a deep listen backlog keeps the kernel from dropping SYNs.
    web.run_app(create_app(settings), host=args.host, port=settings.port, access_log=None,
                backlog=4096, print=lambda msg: log.info(msg.strip()))


def cmd_worker(args: argparse.Namespace) -> None:
    import redis

    from workers.worker import work

    settings = load_settings()
    init_database(settings)
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
    import redis

    from flashsale.clock import rfc3339
    from workers import deadletters

    settings = load_settings()
    init_database(settings)
    if args.replay is not None:
        conn = redis.Redis.from_url(settings.redis_url)
        if not deadletters.replay(conn, args.replay, settings.job_ttl_seconds):
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


def cmd_run(args: argparse.Namespace) -> None:
    """Everything on one machine: embedded Redis and SQLite unless told otherwise."""
    from honcho.manager import Manager

    settings = load_settings()
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               PORT=str(settings.port), PYTHONUNBUFFERED="1")
    env.setdefault("ADMIN_TOKEN", settings.admin_token or secrets.token_urlsafe(16))
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

Try it:
  curl -s {url}/api/products/{seeded}
  curl -s -X POST {url}/api/holds -H 'Content-Type: application/json' \\
       -d '{{"product_id": {seeded}, "qty": 1}}'
""", flush=True)
    try:
        manager.loop()
    finally:
        if not os.environ.get("FLASHSALE_KEEP_REDIS") and embedded.is_embedded(
                settings.redis_url, settings.data_dir):
            embedded.stop(settings.data_dir)
    sys.exit(manager.returncode)


def _seed_demo(settings: Settings) -> int:
    from flashsale.clock import now_ms
    from models import Product

    init_database(settings)
    product = Product.get_or_none(Product.name == DEMO["name"])
    if product is None:
        product = Product.create(**DEMO, reserved=0, created_at=now_ms())
    return product.id


DEMO = {"name": "Demo sneaker drop", "price_cents": 1999, "currency": "USD", "stock": 100}


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
    sub.add_parser("bench", help="load-test a deployment: flashsale bench --help "
                   "(docs/BENCHMARKS.md)")
    run = sub.add_parser("run", help="all-in-one local mode (web, workers, scheduler)")
    run.add_argument("--workers", type=int, default=2)
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
