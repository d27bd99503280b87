"""Peewee models, the deferred database and the schema migration."""

from models.db import Statement, atomic, db, execute_batch, initialize, is_sqlite
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
    "RequestRecord", "Statement", "Webhook", "atomic", "db", "execute_batch", "initialize",
    "is_sqlite",
]
