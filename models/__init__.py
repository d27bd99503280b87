"""Peewee models, the deferred database and the schema migration."""

from models.db import atomic, db, initialize, is_sqlite
from models.tables import (
    Hold,
    HoldStatus,
    IdempotencyRecord,
    Order,
    OrderStatus,
    Product,
    RequestRecord,
    Webhook,
)

__all__ = [
    "Hold", "HoldStatus", "IdempotencyRecord", "Order", "OrderStatus", "Product",
    "RequestRecord", "Webhook", "atomic", "db", "initialize", "is_sqlite",
]
