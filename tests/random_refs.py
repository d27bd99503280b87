"""Unique names and keys, so tests never collide with each other or with earlier runs."""

from __future__ import annotations

import uuid


def random_suffix() -> str:
    return uuid.uuid4().hex[:8]


def random_product_name(name: str = "") -> str:
    """A product name no other test uses, e.g. ``product-sold-out-1a2b3c4d``."""
    return f"product-{name}-{random_suffix()}" if name else f"product-{random_suffix()}"


def random_idempotency_key(name: str = "") -> str:
    """A fresh ``Idempotency-Key`` value."""
    return f"key-{name}-{uuid.uuid4().hex}" if name else f"key-{uuid.uuid4().hex}"


def random_event_id() -> str:
    """A fresh payment provider event id (the webhook ``idempotency_key``)."""
    return f"evt_{uuid.uuid4().hex}"


def random_database_name(prefix: str) -> str:
    """A database name that is a valid unquoted MySQL identifier."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
