"""Schema creation and upgrades: ordered steps, each applied once, recorded in a table."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_schema

from models.db import db, is_sqlite
from models.tables import (
    DeadLetter,
    Hold,
    IdempotencyRecord,
    Order,
    PartitionLock,
    Product,
    RequestRecord,
    SchemaVersion,
    Webhook,
)

log = logging.getLogger(__name__)


def _create(tables: list[type[Any]]) -> None:
    if is_sqlite():
        db.create_tables(tables, safe=True)
        return
    # Ids and idempotency keys are compared byte for byte ("K" is not "k").
    for model in tables:
        model._meta.table_settings = ["DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"]
    try:
        db.create_tables(tables, safe=True)
    finally:
        for model in tables:
            model._meta.table_settings = []


def _v1_create_tables() -> None:
    _create([Product, Hold, Order, Webhook, RequestRecord, IdempotencyRecord, SchemaVersion])


def _v2_dead_letters_and_catalog_lock() -> None:
    _create([DeadLetter, PartitionLock])
    PartitionLock.insert(id=0).on_conflict_ignore().execute()


def _v3_customers() -> None:
    """Holds and orders record their customer, indexed for the per-customer limit. (A
    schema created by v1 of this code has them already.)"""
    migrator = SchemaMigrator.from_database(db.obj)
    for model in (Hold, Order):
        table = model._meta.table_name
        if "customer_id" not in {c.name for c in db.get_columns(table)}:
            migrate_schema(migrator.add_column(table, "customer_id", model.customer_id))
        index = f"{table}_product_id_customer_id_status"
        if index not in {i.name for i in db.get_indexes(table)}:
            migrate_schema(migrator.add_index(table, ("product_id", "customer_id", "status"),
                                              False))


def _v4_idempotency_partition() -> None:
    """Idempotency records carry their product, like every table a product's transaction
    writes, so that the schema can be sharded by product (docs/SCALING.md)."""
    migrator = SchemaMigrator.from_database(db.obj)
    table = IdempotencyRecord._meta.table_name
    if "product_id" not in {c.name for c in db.get_columns(table)}:
        migrate_schema(migrator.add_column(table, "product_id", IdempotencyRecord.product_id))


def _v5_webhook_arrival() -> None:
    """Webhooks waiting for one order are applied in the order they arrived."""
    migrator = SchemaMigrator.from_database(db.obj)
    table = Webhook._meta.table_name
    if "arrival" not in {c.name for c in db.get_columns(table)}:
        migrate_schema(migrator.add_column(table, "arrival", Webhook.arrival))


# Append new steps; never edit an applied one. A step uses playhouse.migrate to add
# columns or indexes so existing rows are kept.
STEPS: list[tuple[int, Callable[[], None]]] = [
    (1, _v1_create_tables),
    (2, _v2_dead_letters_and_catalog_lock),
    (3, _v3_customers),
    (4, _v4_idempotency_partition),
    (5, _v5_webhook_arrival),
]


def migrate() -> int:
    """Bring the schema up to date; returns the version reached. Safe to run repeatedly."""
    db.create_tables([SchemaVersion], safe=True)
    done = {row.version for row in SchemaVersion.select()}
    for version, step in STEPS:
        if version in done:
            continue
        with db.atomic():
            step()
            SchemaVersion.insert(version=version, applied_at=int(time.time() * 1000)) \
                .on_conflict_ignore().execute()
        log.info("schema migrated to version %s", version)
    return max(v for v, _ in STEPS)
