"""Request and response schemas (marshmallow). The OpenAPI document is built from them."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

MAX_INT = 2**31 - 1
MAX_ID = 2**63 - 1


class StrictInteger(fields.Integer):
    """An integer that is really an integer in the JSON: not "2", not 2.0, not true."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictString(fields.String):
    def __init__(self, max_length: int = 255, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(min=1, max=max_length), **kwargs)


class HoldRequest(Schema):
    class Meta:
        unknown = RAISE

    product_id = StrictInteger(required=True, validate=validate.Range(min=1, max=MAX_ID))
    qty = StrictInteger(required=True)  # upper bound is configuration: see hold_schema()


@lru_cache(maxsize=8)
def hold_schema(max_qty: int) -> HoldRequest:
    """The hold schema with the configured ``qty`` bound (built once, reused)."""
    schema = HoldRequest()
    schema.fields["qty"].validators = [validate.Range(min=1, max=max_qty)]
    return schema


class OrderRequest(Schema):
    class Meta:
        unknown = RAISE

    hold_id = StrictString(required=True)


class WebhookRequest(Schema):
    class Meta:
        unknown = EXCLUDE  # providers add fields of their own

    idempotency_key = StrictString(required=True)
    order_id = StrictString(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["paid", "failed"]))


class ProductRequest(Schema):
    class Meta:
        unknown = RAISE

    name = StrictString(required=True, max_length=200)
    price_cents = StrictInteger(required=True, validate=validate.Range(min=0, max=MAX_ID))
    currency = fields.String(required=True, validate=validate.Regexp(
        r"^[A-Z]{3}$", error="Must be an ISO 4217 code of three capital letters."))
    stock = StrictInteger(required=True, validate=validate.Range(min=0, max=MAX_INT))


class RestockRequest(Schema):
    class Meta:
        unknown = RAISE

    qty = StrictInteger(required=True, validate=validate.Range(min=1, max=MAX_INT))


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
