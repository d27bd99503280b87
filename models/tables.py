"""Peewee models. Times are integer milliseconds since the epoch (UTC).

The schema is the final guard against overselling: CHECK constraints on the product's
counters, one order per hold, one row per request id and per webhook idempotency key.
"""

from __future__ import annotations

from enum import StrEnum

import peewee as pw

from models.db import db


class HoldStatus(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    CONVERTED = "converted"


class OrderStatus(StrEnum):
    PENDING_PAYMENT = "pending_payment"
    PAID = "paid"
    CANCELLED = "cancelled"


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Product(BaseModel):
    id = pw.AutoField()
    name = pw.CharField(max_length=200)
    price_cents = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    # Units not yet sold, and units reserved by active holds and unpaid orders.
    stock = pw.BigIntegerField(constraints=[pw.Check("stock >= 0")])
    reserved = pw.BigIntegerField(default=0, constraints=[pw.Check("reserved >= 0")])
    created_at = pw.BigIntegerField()
    request_id = pw.CharField(max_length=64, null=True, unique=True)

    class Meta:
        table_name = "products"
        constraints = [pw.Check("reserved <= stock")]


class Hold(BaseModel):
    id = pw.CharField(max_length=64, primary_key=True)
    product = pw.ForeignKeyField(Product, backref="holds", on_delete="RESTRICT")
    product_id: int  # the foreign key's column, as peewee exposes it
    qty = pw.IntegerField(constraints=[pw.Check("qty > 0")])
    status = pw.CharField(max_length=16, default=HoldStatus.ACTIVE)
    created_at = pw.BigIntegerField()
    expires_at = pw.BigIntegerField()
    request_id = pw.CharField(max_length=64, unique=True)
    customer_id = pw.CharField(max_length=64, null=True)  # migration 3

    class Meta:
        table_name = "holds"
        indexes = ((("status", "expires_at"), False), (("product", "status", "expires_at"), False),
                   (("product", "customer_id", "status"), False))


class Order(BaseModel):
    id = pw.CharField(max_length=64, primary_key=True)
    hold = pw.ForeignKeyField(Hold, unique=True, on_delete="RESTRICT")
    product = pw.ForeignKeyField(Product, backref="orders", on_delete="RESTRICT")
    hold_id: str
    product_id: int
    qty = pw.IntegerField(constraints=[pw.Check("qty > 0")])
    amount_cents = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    status = pw.CharField(max_length=16, default=OrderStatus.PENDING_PAYMENT)
    created_at = pw.BigIntegerField()
    pay_by = pw.BigIntegerField()
    closed_at = pw.BigIntegerField(null=True)
    request_id = pw.CharField(max_length=64, unique=True)
    customer_id = pw.CharField(max_length=64, null=True)  # migration 3

    class Meta:
        table_name = "orders"
        indexes = ((("status", "pay_by"), False), (("product", "status", "pay_by"), False),
                   (("product", "customer_id", "status"), False))


class Webhook(BaseModel):
    """One payment-provider event, by its idempotency key; applied at most once."""

    idempotency_key = pw.CharField(max_length=255, primary_key=True)
    order_id = pw.CharField(max_length=255, index=True)
    product_id = pw.IntegerField()
    status = pw.CharField(max_length=16)
    fingerprint = pw.CharField(max_length=64)
    outcome = pw.CharField(max_length=16)
    response_status = pw.SmallIntegerField()
    response_body = pw.TextField()
    refund_due = pw.BooleanField(default=False)
    received_at = pw.BigIntegerField()
    applied_at = pw.BigIntegerField(null=True)
    arrival = pw.BigIntegerField(null=True)  # order of arrival (migration 5)
    request_id = pw.CharField(max_length=64, unique=True)

    class Meta:
        table_name = "webhooks"
        indexes = ((("outcome", "product_id"), False),)


class RequestRecord(BaseModel):
    """The committed result of one queued request (its job): exactly one per request id."""

    id = pw.CharField(max_length=64, primary_key=True)
    product_id = pw.IntegerField()
    op = pw.CharField(max_length=16)
    status_code = pw.SmallIntegerField()
    body = pw.TextField()
    created_at = pw.BigIntegerField(index=True)

    class Meta:
        table_name = "requests"


class IdempotencyRecord(BaseModel):
    """An Idempotency-Key, once its request is committed; survives a Redis restart."""

    id = pw.CharField(max_length=300, primary_key=True)  # "<scope>:<key>"
    product_id = pw.BigIntegerField(null=True)  # the partition (shard key); migration 4
    fingerprint = pw.CharField(max_length=64)
    request_id = pw.CharField(max_length=64, unique=True)
    created_at = pw.BigIntegerField(index=True)

    class Meta:
        table_name = "idempotency_keys"


class DeadLetter(BaseModel):
    """A request the writer could not apply: answered alone, kept here for an operator
    to read and replay (``flashsale dead-letters``)."""

    id = pw.AutoField()
    request_id = pw.CharField(max_length=64, index=True)
    product_id = pw.BigIntegerField()
    op = pw.CharField(max_length=32)
    envelope = pw.TextField()
    error = pw.TextField()
    status_code = pw.SmallIntegerField()
    created_at = pw.BigIntegerField(index=True)
    replayed_at = pw.BigIntegerField(null=True)

    class Meta:
        table_name = "dead_letters"


class PartitionLock(BaseModel):
    """A row to lock for a partition that has no product row: the catalog (id 0)."""

    id = pw.IntegerField(primary_key=True)

    class Meta:
        table_name = "partition_locks"


class SchemaVersion(BaseModel):
    version = pw.IntegerField(primary_key=True)
    applied_at = pw.BigIntegerField()

    class Meta:
        table_name = "schema_version"


TABLES = [Product, Hold, Order, Webhook, RequestRecord, IdempotencyRecord, DeadLetter,
          PartitionLock, SchemaVersion]
