"""Request schemas: what a 422 names, and what passes."""

from __future__ import annotations

from typing import Any

import pytest
from marshmallow import ValidationError

from gateway import schemas

MAX_QTY = 10


def errors(schema: Any, data: Any) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        schemas.load(schema, data)
    assert isinstance(caught.value.messages, dict)
    return caught.value.messages


# --- holds ------------------------------------------------------------------------------

def test_a_valid_hold_loads() -> None:
    assert schemas.load(schemas.hold_schema(MAX_QTY), {"product_id": 1, "qty": MAX_QTY}) == \
        {"product_id": 1, "qty": MAX_QTY}


@pytest.mark.parametrize(("body", "bad"), [
    ({"product_id": 1}, "qty"),
    ({"qty": 1}, "product_id"),
    ({"product_id": 1, "qty": 1, "coupon": "x"}, "coupon"),
    ({"product_id": "1", "qty": 1}, "product_id"),
    ({"product_id": 1, "qty": "2"}, "qty"),
    ({"product_id": 1, "qty": True}, "qty"),
    ({"product_id": True, "qty": 1}, "product_id"),
    ({"product_id": 1, "qty": 2.5}, "qty"),
    ({"product_id": 1, "qty": 1e300}, "qty"),
    ({"product_id": 2**31, "qty": 1}, "product_id"),
    ({"product_id": 1, "qty": None}, "qty"),
    ({"product_id": 1, "qty": [2]}, "qty"),
    ({"product_id": 0, "qty": 1}, "product_id"),
    ({"product_id": -3, "qty": 1}, "product_id"),
    ({"product_id": 2**63, "qty": 1}, "product_id"),
    ({"product_id": 1, "qty": 0}, "qty"),
    ({"product_id": 1, "qty": -1}, "qty"),
    ({"product_id": 1, "qty": MAX_QTY + 1}, "qty"),
], ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_an_invalid_hold_names_the_offending_field(body: dict[str, Any], bad: str) -> None:
    assert list(errors(schemas.hold_schema(MAX_QTY), body)) == [bad]


def test_an_integral_number_is_an_integer_as_json_schema_says() -> None:
    # The OpenAPI document says "integer": 2.0 and 2e0 are that integer, 2.5 is not.
    assert schemas.load(schemas.hold_schema(MAX_QTY), {"product_id": 1e0, "qty": 2.0}) == \
        {"product_id": 1, "qty": 2}


@pytest.mark.parametrize("currency",
                         ["USD\n", "usd", "US", "USDX", "\uff35\uff33\uff24", "U\u0000D"])
def test_currency_is_exactly_three_capital_ascii_letters(currency: str) -> None:
    body = {"name": "x", "price_cents": 1, "currency": currency, "stock": 1}
    assert list(errors(schemas.ProductRequest(), body)) == ["currency"]


@pytest.mark.parametrize(("field", "value"), [
    ("price_cents", 10**9 + 1), ("price_cents", 2**63), ("stock", 10**9 + 1),
    ("name", "a\nb"), ("name", "x" * 201), ("name", "\u0085"),
])
def test_product_bounds_keep_derived_values_in_range(field: str, value: Any) -> None:
    body = {"name": "x", "price_cents": 1, "currency": "USD", "stock": 1, field: value}
    assert list(errors(schemas.ProductRequest(), body)) == [field]


@pytest.mark.parametrize("value", ["k\u00e9y", "a\nb", "\udcff", ""])
def test_webhook_keys_are_printable_ascii(value: str) -> None:
    body = {"idempotency_key": value, "order_id": "ord_1_0123456789abcdef", "status": "paid"}
    assert list(errors(schemas.WebhookRequest(), body)) == ["idempotency_key"]


def test_qty_bound_comes_from_configuration_per_schema() -> None:
    small, large = schemas.hold_schema(3), schemas.hold_schema(50)

    assert "qty" in errors(small, {"product_id": 1, "qty": 4})
    assert schemas.load(large, {"product_id": 1, "qty": 50})["qty"] == 50
    assert "qty" in errors(schemas.hold_schema(3), {"product_id": 1, "qty": 4})


@pytest.mark.parametrize("body", [[], "x", 1, None, [{"product_id": 1, "qty": 1}]],
                         ids=repr)
def test_a_body_that_is_not_an_object_is_rejected(body: Any) -> None:
    assert errors(schemas.hold_schema(MAX_QTY), body) == \
        {"_schema": ["The body must be a JSON object."]}


# --- orders -----------------------------------------------------------------------------

def test_a_valid_order_loads() -> None:
    assert schemas.load(schemas.OrderRequest(), {"hold_id": "hold_1_ab"}) == \
        {"hold_id": "hold_1_ab"}


@pytest.mark.parametrize(("body", "bad"), [
    ({}, "hold_id"),
    ({"hold_id": ""}, "hold_id"),
    ({"hold_id": 12}, "hold_id"),
    ({"hold_id": None}, "hold_id"),
    ({"hold_id": "h" * 256}, "hold_id"),
    ({"hold_id": "h", "qty": 1}, "qty"),
], ids=repr)
def test_an_invalid_order_names_the_offending_field(body: dict[str, Any], bad: str) -> None:
    assert list(errors(schemas.OrderRequest(), body)) == [bad]


# --- webhooks ---------------------------------------------------------------------------

WEBHOOK = {"idempotency_key": "evt_1", "order_id": "ord_1_00", "status": "paid"}


def test_webhook_extra_fields_are_ignored() -> None:
    body = {**WEBHOOK, "provider": "acme", "amount": 1999, "meta": {"a": 1}}

    assert schemas.load(schemas.WebhookRequest(), body) == WEBHOOK


@pytest.mark.parametrize(("change", "bad"), [
    ({"status": "refunded"}, "status"),
    ({"status": True}, "status"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"idempotency_key": 123}, "idempotency_key"),
    ({"order_id": None}, "order_id"),
], ids=repr)
def test_an_invalid_webhook_names_the_offending_field(change: dict[str, Any], bad: str) -> None:
    assert list(errors(schemas.WebhookRequest(), {**WEBHOOK, **change})) == [bad]


@pytest.mark.parametrize("missing", list(WEBHOOK))
def test_a_webhook_missing_a_field_is_rejected(missing: str) -> None:
    body = {k: v for k, v in WEBHOOK.items() if k != missing}

    assert list(errors(schemas.WebhookRequest(), body)) == [missing]


# --- admin ------------------------------------------------------------------------------

PRODUCT = {"name": "Widget", "price_cents": 1999, "currency": "USD", "stock": 100}


def test_a_valid_product_loads() -> None:
    assert schemas.load(schemas.ProductRequest(), PRODUCT) == PRODUCT


@pytest.mark.parametrize(("change", "bad"), [
    ({"currency": "usd"}, "currency"),
    ({"currency": "US"}, "currency"),
    ({"price_cents": -1}, "price_cents"),
    ({"price_cents": "1999"}, "price_cents"),
    ({"stock": -1}, "stock"),
    ({"stock": False}, "stock"),
    ({"name": ""}, "name"),
    ({"sku": "x"}, "sku"),
], ids=repr)
def test_an_invalid_product_names_the_offending_field(change: dict[str, Any], bad: str) -> None:
    assert list(errors(schemas.ProductRequest(), {**PRODUCT, **change})) == [bad]


@pytest.mark.parametrize("body", [{"qty": 0}, {"qty": "5"}, {"qty": True}, {}, {"qty": 1, "x": 1}],
                         ids=repr)
def test_an_invalid_restock_is_rejected(body: dict[str, Any]) -> None:
    assert errors(schemas.RestockRequest(), body)
