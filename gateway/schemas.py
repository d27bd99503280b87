"""Request and response schemas (marshmallow). The OpenAPI document is built from them."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from flashsale.limits import (
    CUSTOMER_ID_PATTERN,
    MAX_KEY_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PRICE_CENTS,
    MAX_PRODUCT_ID,
    MAX_STOCK,
)

MAX_ID = MAX_PRODUCT_ID


class StrictInteger(fields.Integer):
    """A JSON number with an integral value (2, 2.0 and 2e0 are the same integer, as in
    JSON Schema); not "2", not 2.5, not true. Bounds are checked before any conversion,
    so a huge number costs nothing."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, float):
            if not value.is_integer():  # NaN and infinities included
                raise self.make_error("invalid")
            if abs(value) > 2**53:  # beyond every bound; int() would be inexact anyway
                raise ValidationError("Number out of range.")
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


class FullMatch(validate.Regexp):
    """``Regexp`` that must match the whole string: Python's ``$`` also matches before a
    final newline ("USD\\n"). The pattern, with ``^``/``$``, is what the OpenAPI shows."""

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or re.fullmatch(str(self.regex.pattern), value) is None:
            raise ValidationError(self._format_error(value))
        return value


class StrictString(fields.String):
    """A string of 1..max_length characters, optionally matching ``pattern`` whole."""

    def __init__(self, max_length: int = MAX_KEY_LENGTH, pattern: str | None = None,
                 **kwargs: Any) -> None:
        checks: list[Any] = [validate.Length(min=1, max=max_length)]
        if pattern is not None:
            checks.append(FullMatch(pattern, error="Must match {regex}."))
        super().__init__(validate=checks, **kwargs)


# Printable ASCII: what a provider's or a client's key can hold.
VISIBLE_ASCII = r"^[\x20-\x7e]+$"
# A product name: any characters but control characters.
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]+$"


class HoldRequest(Schema):
    class Meta:
        unknown = RAISE

    product_id = StrictInteger(required=True,
                               validate=validate.Range(min=1, max=MAX_PRODUCT_ID))
    qty = StrictInteger(required=True)  # upper bound is configuration: see hold_schema()


class HoldWithCustomer(HoldRequest):
    """Without customer tokens, the shop's back end may name the customer in the body."""

    customer_id = StrictString(max_length=64, pattern=CUSTOMER_ID_PATTERN)


@lru_cache(maxsize=16)
def hold_schema(max_qty: int, customer_in_body: bool = False,
                customer_required: bool = False) -> HoldRequest:
    """The hold schema with the configured ``qty`` bound (built once, reused). With
    ``customer_in_body`` it accepts ``customer_id`` (required with ``customer_required``:
    a per-customer limit without tokens); otherwise that field is unknown (422)."""
    schema = HoldWithCustomer() if customer_in_body else HoldRequest()
    schema.fields["qty"].validators = [validate.Range(min=1, max=max_qty)]
    if customer_in_body:
        schema.fields["customer_id"].required = customer_required
    return schema


class OrderRequest(Schema):
    class Meta:
        unknown = RAISE

    # Opaque to clients: a string the service cannot have issued is an unknown hold (404).
    hold_id = StrictString(required=True)


class WebhookRequest(Schema):
    class Meta:
        unknown = EXCLUDE  # providers add fields of their own

    idempotency_key = StrictString(required=True, pattern=VISIBLE_ASCII)
    order_id = StrictString(required=True, pattern=VISIBLE_ASCII)
    status = fields.String(required=True, validate=validate.OneOf(["paid", "failed"]))


class ProductRequest(Schema):
    class Meta:
        unknown = RAISE

    name = StrictString(required=True, max_length=MAX_NAME_LENGTH, pattern=PRINTABLE)
    price_cents = StrictInteger(required=True,
                                validate=validate.Range(min=0, max=MAX_PRICE_CENTS))
    currency = fields.String(required=True, validate=FullMatch(
        r"^[A-Z]{3}$", error="Must be an ISO 4217 code of three capital letters."))
    stock = StrictInteger(required=True, validate=validate.Range(min=0, max=MAX_STOCK))


class RestockRequest(Schema):
    class Meta:
        unknown = RAISE

    qty = StrictInteger(required=True, validate=validate.Range(min=1, max=MAX_STOCK))


# --- responses (documentation only) ---------------------------------------------------

class Product(Schema):
    id = fields.Integer()
    name = fields.String()
    price_cents = fields.Integer()
    currency = fields.String()
    stock = fields.Integer(metadata={"description": "Units not yet sold."})
    available = fields.Integer(
        metadata={"description": "stock minus units held or ordered and unpaid."})


class Hold(Schema):
    hold_id = fields.String()
    product_id = fields.Integer()
    qty = fields.Integer()
    status = fields.String(validate=validate.OneOf(["active", "expired", "converted"]))
    expires_at = fields.DateTime()
    order_id = fields.String(metadata={"description": "Present once converted."})


class Order(Schema):
    order_id = fields.String()
    hold_id = fields.String()
    product_id = fields.Integer()
    qty = fields.Integer()
    amount_cents = fields.Integer()
    currency = fields.String()
    status = fields.String(validate=validate.OneOf(["pending_payment", "paid", "cancelled"]))
    pay_by = fields.DateTime()


class WebhookResult(Schema):
    idempotency_key = fields.String()
    order_id = fields.String()
    outcome = fields.String(validate=validate.OneOf(["applied", "ignored", "pending"]))
    order_status = fields.String(
        validate=validate.OneOf(["paid", "cancelled", "pending_payment"]))


class Accepted(Schema):
    job_id = fields.String()
    status = fields.String(validate=validate.OneOf(["queued", "processing"]))
    status_url = fields.String()
    hold_id = fields.String(metadata={"description": "For POST /api/holds."})
    order_id = fields.String(metadata={"description": "For POST /api/orders."})


class JobResult(Schema):
    status = fields.Integer()
    body = fields.Dict()


class Job(Schema):
    job_id = fields.String()
    status = fields.String(validate=validate.OneOf(["queued", "processing", "done"]))
    result = fields.Nested(JobResult)


class Problem(Schema):
    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.Dict(metadata={"description": "422: the offending fields."})
    available = fields.Integer(metadata={"description": "409 Insufficient stock."})


def load(schema: Schema, data: Any) -> dict[str, Any]:
    """Validate ``data``; raises ValidationError whose messages name the fields."""
    if not isinstance(data, dict):
        raise ValidationError({"_schema": ["The body must be a JSON object."]})
    return schema.load(data)
