"""Peewee models, the deferred database and the schema migration."""

from models.db import atomic, db, initialize, is_sqlite
from models.tables import (
    DeadLetter,
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
    "DeadLetter", "Hold", "HoldStatus", "IdempotencyRecord", "Order", "OrderStatus", "Product",
    "RequestRecord", "Webhook", "atomic", "db", "initialize", "is_sqlite",
]
