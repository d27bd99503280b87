"""The OpenAPI 3.1 document of the HTTP contract, generated from the marshmallow schemas.

Schemas come from ``gateway.schemas``; parameters, headers and the common responses are
registered once as components, and every route is one row of ``OPERATIONS``. The
document is built once per process and served at ``GET /api/openapi.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from flashsale.config import Settings
from gateway import schemas
from gateway.errors import PROBLEM_JSON
from gateway.handlers import JSON, MAX_BODY, SIGNATURE_TOLERANCE_S

VERSION = "0.1.0"
DEFAULTS = Settings()
KIB = MAX_BODY // 1024

SCHEMAS = ("HoldRequest", "OrderRequest", "WebhookRequest", "ProductRequest", "RestockRequest",
           "Product", "Hold", "Order", "WebhookResult", "Accepted", "Job", "Problem")

INTRO = f"""Sells limited stock to a crowd without overselling.

**Conventions.** Bodies are JSON (`{JSON}`). Every error, unknown routes (404) and wrong
methods (405) included, is an RFC 9457 problem document (`{PROBLEM_JSON}`) with `type`,
`title`, `status` and `detail`, plus the extra members named on each response. Malformed
JSON: 400. A body that is not `{JSON}`: 415. A body over {KIB} KiB: 413. A well-formed body
that breaks the schema (missing or unknown field, wrong type, value out of range): 422, with
the offending fields in `errors`. Bad input never changes anything. Timestamps are RFC 3339
UTC (`2026-11-24T10:00:00.123Z`). Product ids are positive integers; hold, order and job ids
are opaque strings. Money is in minor units (`price_cents`, `amount_cents`) with a
`currency` code.

**Asynchronous writes.** `POST /api/holds`, `POST /api/orders` and the admin writes are
queued behind the product's other stock operations. The client chooses how long to wait with
`Prefer` (RFC 7240): no header waits `DEFAULT_WAIT_SECONDS` (default
{DEFAULTS.default_wait_seconds:g}); `wait=N` waits up to N seconds (0 allowed, at most
{DEFAULTS.max_wait_seconds:g}); `respond-async` answers 202 at once. A result ready in time
is the final response (201, 409, ...). Otherwise the answer is `202 Accepted` with
`Location: /api/jobs/{{job_id}}` and `Retry-After: 1`: poll that URL until `status` is
`done`; its `result` is exactly the response the synchronous call would have given. A 202
for a hold or an order names the id the new resource will have if it is created. Requests
the gateway can decide alone (invalid body, unknown product, a product clearly sold out) are
answered at once with their final 4xx, even with `respond-async`. Job results are kept at
least 24 hours.

**Idempotency-Key.** `POST /api/holds` and `POST /api/orders` accept an `Idempotency-Key`
header. The same key with the same body returns the first request's status and body and
creates nothing new, also while the first is still queued (then 202 with the same
`job_id`). The same key with a different body: 422. Keys are kept at least 24 hours.

**Time decides expiry.** A hold past `expires_at` is never reported `active` and an unpaid
order past `pay_by` is never reported `pending_payment`, even before the background sweep
has released their units (it does so within seconds).
"""


# --- components --------------------------------------------------------------------------

def header(description: str, example: str, **schema: Any) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string", **schema},
            "example": example}


HEADERS = {
    "Location": header("The URL of the created resource, or of the job for a 202.",
                       "/api/jobs/job_1_0123456789abcdef"),
    "Retry-After": header("Seconds to wait before polling (or retrying).", "1"),
    "Preference-Applied": header("The `Prefer` preferences this response honoured.",
                                 "respond-async"),
    "WWW-Authenticate": header("The scheme the admin endpoints expect.",
                               'Bearer realm="admin"'),
}

PARAMETERS: dict[str, dict[str, Any]] = {
    "Prefer": {"in": "header", "name": "Prefer", "schema": {"type": "string"},
               "examples": {"async": {"value": "respond-async"},
                            "wait": {"value": "wait=10"}},
               "description": (
                   "How long to wait for the result (RFC 7240). `wait=N`: up to N seconds "
                   f"(fractions allowed, capped at {DEFAULTS.max_wait_seconds:g}); "
                   "`respond-async`: answer 202 at once unless a `wait` is also given. "
                   "Without it the gateway waits `DEFAULT_WAIT_SECONDS`. A response that "
                   "honoured it carries `Preference-Applied`.")},
    "Idempotency-Key": {"in": "header", "name": "Idempotency-Key",
                        "schema": {"type": "string", "minLength": 1},
                        "example": "order-7f3c2a",
                        "description": (
                            "1-255 characters, sent bare or as a quoted string (`\"k\"` and "
                            "`k` are the same key); empty or longer: 400. The same key with "
                            "the same body replays the first response and creates nothing "
                            "new; with a different body: 422. Keys are separate per endpoint "
                            "and kept at least 24 hours.")},
    "X-Webhook-Signature": {
        "in": "header", "name": "X-Webhook-Signature", "schema": {"type": "string"},
        "example": "t=1795514400,v1=5f2b...",
        "description": (
            "Required when `WEBHOOK_SECRET` is set: `t=<unix seconds>,v1=<hex "
            "HMAC-SHA256(secret, \"<t>.<raw body>\")>`. Several `v1` entries may be given; "
            f"one must match. `t` more than {SIGNATURE_TOLERANCE_S} s from now, a missing or "
            "a wrong signature: 401, and nothing is stored.")},
    "product_id": {"in": "path", "name": "product_id", "required": True,
                   "schema": {"type": "integer", "minimum": 1, "maximum": schemas.MAX_ID},
                   "description": "A product id; anything else is answered 404."},
    "hold_id": {"in": "path", "name": "hold_id", "required": True, "schema": {"type": "string"},
                "example": "hold_1_0123456789abcdef"},
    "order_id": {"in": "path", "name": "order_id", "required": True,
                 "schema": {"type": "string"}, "example": "ord_1_0123456789abcdef"},
    "job_id": {"in": "path", "name": "job_id", "required": True, "schema": {"type": "string"},
               "example": "job_1_0123456789abcdef"},
}


def reply(description: str, schema: str | dict[str, Any] | None = None,
          headers: tuple[str, ...] = (), media: str = JSON) -> dict[str, Any]:
    """A response object: description, optional body schema, header component names."""
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    if headers:
        response["headers"] = {name: name for name in headers}
    return response


def problem(description: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    return reply(description, "Problem", headers, PROBLEM_JSON)


RESPONSES = {
    "MalformedJson": problem("Malformed JSON."),
    "Unauthorized": problem("Missing or wrong `Authorization: Bearer <ADMIN_TOKEN>`.",
                            ("WWW-Authenticate",)),
    "AdminDisabled": problem("`ADMIN_TOKEN` is not set: admin endpoints are disabled."),
    "NotFound": problem("Unknown resource."),
    "TooLarge": problem(f"The body is larger than {KIB} KiB."),
    "NotJson": problem(f"The body is not `{JSON}`."),
    "Invalid": problem("The body breaks the schema (missing or unknown field, wrong type, "
                       "value out of range); `errors` names the offending fields."),
    "Unavailable": problem("Redis is unreachable; retry after `Retry-After` seconds.",
                           ("Retry-After",)),
    "Accepted": reply("Queued and not decided within the wait. Poll `Location` (the job) "
                      "every `Retry-After` seconds until its `status` is `done`.", "Accepted",
                      ("Location", "Retry-After", "Preference-Applied")),
}

# Every endpoint that takes a JSON body can fail these ways.
BODY_ERRORS = {400: "MalformedJson", 413: "TooLarge", 415: "NotJson", 422: "Invalid"}
ADMIN_ERRORS = {401: "Unauthorized", 403: "AdminDisabled"}
IDEMPOTENT_ERRORS = {
    400: problem("Malformed JSON, or an `Idempotency-Key` that is empty or over 255 "
                 "characters."),
    422: problem("The body breaks the schema (`errors` names the fields), or title "
                 "`Idempotency-Key reused with a different request`: the key was first "
                 "used with another body."),
}
CREATED = ("Location", "Preference-Applied")


# --- operations ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    description: str
    responses: dict[int, str | dict[str, Any]]
    body: str | None = None
    example: dict[str, Any] | None = None
    params: tuple[str, ...] = ()
    admin: bool = False


OPERATIONS = (
    Operation(
        "get", "/api/products/{product_id}", "getProduct", "products", "Read a product",
        "`stock`: units not yet sold. `available`: `stock` minus the units reserved by "
        "active holds and unpaid orders; never negative. Served from a cache that reflects "
        "every committed stock operation within 1 second.",
        {200: reply("The product.", "Product"), 404: "NotFound", 503: "Unavailable"},
        params=("product_id",)),
    Operation(
        "post", "/api/holds", "createHold", "holds", "Reserve units of a product",
        "Queued behind the product's other stock operations; holds on one product are "
        "granted in the order the gateway accepted them. The units stay reserved until "
        f"`expires_at`, `HOLD_TTL_SECONDS` (default {DEFAULTS.hold_ttl_seconds}) after "
        "creation. `qty` must be 1 to `MAX_QTY_PER_HOLD` (a deployment setting, default "
        f"{DEFAULTS.max_qty_per_hold}). A 202 names the `hold_id` the hold will have if it "
        "is granted.",
        {201: reply("Granted.", "Hold", CREATED), 202: "Accepted",
         404: problem("Unknown product."),
         409: problem("Title `Insufficient stock`; `available` is the number of units "
                      "available when decided.", ("Preference-Applied",)),
         **BODY_ERRORS, **IDEMPOTENT_ERRORS, 503: "Unavailable"},
        body="HoldRequest", example={"product_id": 1, "qty": 2},
        params=("Prefer", "Idempotency-Key")),
    Operation(
        "get", "/api/holds/{hold_id}", "getHold", "holds", "Read a hold",
        "A hold whose `expires_at` has passed is never reported `active`. A converted hold "
        "names its `order_id` and stays `converted` whatever becomes of the order.",
        {200: reply("The hold.", "Hold"), 404: "NotFound", 503: "Unavailable"},
        params=("hold_id",)),
    Operation(
        "post", "/api/orders", "createOrder", "orders", "Turn a hold into an order",
        "The hold becomes `converted`; its units stay reserved until payment, a failed "
        "payment, or `pay_by`, `ORDER_PAYMENT_TTL_SECONDS` (default "
        f"{DEFAULTS.order_payment_ttl_seconds}) after creation. One order per hold, ever: a "
        "second order for the same hold answers 200 with the first order. An order's id "
        "follows from its hold's, so the `order_id` a 202 names is the order's id.",
        {201: reply("Created.", "Order", CREATED),
         200: reply("The hold already has this order.", "Order", ("Preference-Applied",)),
         202: "Accepted", 404: problem("Unknown hold."),
         409: problem("Title `Hold has expired`: the hold expired before the order was "
                      "processed.", ("Preference-Applied",)),
         **BODY_ERRORS, **IDEMPOTENT_ERRORS, 503: "Unavailable"},
        body="OrderRequest", example={"hold_id": "hold_1_0123456789abcdef"},
        params=("Prefer", "Idempotency-Key")),
    Operation(
        "get", "/api/orders/{order_id}", "getOrder", "orders", "Read an order",
        "An order past `pay_by` is never reported `pending_payment`: it is `cancelled` and "
        "its units return to `available` within seconds.",
        {200: reply("The order.", "Order"), 404: "NotFound", 503: "Unavailable"},
        params=("order_id",)),
    Operation(
        "get", "/api/jobs/{job_id}", "getJob", "jobs", "Poll a queued request",
        "`status` is `queued`, `processing` or `done`; when `done`, `result` is `{status, "
        "body}`, exactly the response the synchronous call would have given. Results are "
        "kept at least 24 hours.",
        {200: reply("The job.", "Job"), 404: problem("Unknown or expired job."),
         503: "Unavailable"},
        params=("job_id",)),
    Operation(
        "post", "/api/payments/webhook", "paymentWebhook", "payments",
        "Payment provider notification",
        "`paid` on a `pending_payment` order makes it `paid` and sells its units (`stock` "
        "decreases); `failed` makes it `cancelled` and releases its units. Paid and "
        "cancelled orders are final: a later webhook for them is `ignored` and changes "
        "nothing; a `paid` webhook for an order cancelled by timeout is recorded, `ignored`, "
        "and listed for refund by `flashsale refunds`. A webhook for an order that does not "
        "exist yet (it may still be queued) is stored, answered 202 `pending`, and applied "
        "as soon as the order exists. The same `idempotency_key` again returns the first "
        "response's status and body (a pending webhook applied since answers with its "
        "applied result); with a different `order_id` or `status`: 422. Fields other than "
        "`idempotency_key`, `order_id` and `status` are ignored. `Prefer` is not read: the "
        "gateway waits `DEFAULT_WAIT_SECONDS`.",
        {200: reply("Applied or ignored.", "WebhookResult"),
         202: reply("Stored, `outcome: pending`: the order does not exist yet, or the "
                    "webhook is still queued.", "WebhookResult"),
         401: problem("`WEBHOOK_SECRET` is set and the signature is missing or wrong, or "
                      f"its `t` is more than {SIGNATURE_TOLERANCE_S} s from now. Nothing is "
                      "stored."),
         **BODY_ERRORS,
         422: problem("The body breaks the schema, or the `idempotency_key` was first used "
                      "with a different body."),
         503: "Unavailable"},
        body="WebhookRequest",
        example={"idempotency_key": "evt_123", "order_id": "ord_1_0123456789abcdef",
                 "status": "paid"},
        params=("X-Webhook-Signature",)),
    Operation(
        "post", "/api/admin/products", "createProduct", "admin", "Create a product",
        "Queued on the catalog partition and answered like the other queued writes; "
        "normally 201 at once.",
        {201: reply("Created.", "Product", CREATED), 202: "Accepted", **ADMIN_ERRORS,
         **BODY_ERRORS, 503: "Unavailable"},
        body="ProductRequest",
        example={"name": "Sneaker drop", "price_cents": 1999, "currency": "USD",
                 "stock": 100},
        params=("Prefer",), admin=True),
    Operation(
        "post", "/api/admin/products/{product_id}/restock", "restockProduct", "admin",
        "Add units to a product",
        "Queued behind the product's holds and orders like a hold; the result is the "
        "product after the restock. Not idempotent: each request adds `qty`.",
        {200: reply("Restocked.", "Product", ("Preference-Applied",)), 202: "Accepted",
         **ADMIN_ERRORS, 404: problem("Unknown product."), **BODY_ERRORS,
         503: "Unavailable"},
        body="RestockRequest", example={"qty": 50}, params=("product_id", "Prefer"),
        admin=True),
    Operation(
        "get", "/healthz", "healthz", "operations", "Liveness and dependencies",
        "200 when this process can reach Redis and the database, else 503.",
        {200: reply("Both reachable.", {
            "type": "object",
            "properties": {"status": {"const": "ok"},
                           "checks": {"type": "object",
                                      "additionalProperties": {"type": "boolean"}}}}),
         503: problem("A dependency is unreachable; `checks` says which "
                      "(`{\"redis\": true, \"database\": false}`).")}),
    Operation(
        "get", "/metrics", "metrics", "operations", "Prometheus metrics",
        "This gateway's HTTP counters and latencies, the depth of the product queues it has "
        "seen, and the batch counters all workers share.",
        {200: reply("Prometheus text exposition format.", {"type": "string"},
                    media="text/plain; version=0.0.4"),
         503: "Unavailable"}),
    Operation(
        "get", "/api/openapi.json", "openapi", "operations", "This document",
        "The OpenAPI 3.1 document of this API.",
        {200: reply("The document.", {"type": "object"})}),
)


def operation(op: Operation) -> dict[str, Any]:
    """The apispec operation object of one table row."""
    spec: dict[str, Any] = {
        "operationId": op.operation_id, "tags": [op.tag], "summary": op.summary,
        "description": op.description,
        "responses": {str(status): response for status, response in sorted(op.responses.items())},
    }
    if op.params:
        spec["parameters"] = list(op.params)
    if op.body:
        media: dict[str, Any] = {"schema": op.body}
        if op.example:
            media["example"] = op.example
        spec["requestBody"] = {"required": True, "content": {JSON: media}}
    if op.admin:
        spec["security"] = [{"adminToken": []}]
    return spec


TAGS = (
    ("products", "The catalog as buyers see it."),
    ("holds", "Reserve units for a short time."),
    ("orders", "Turn a hold into an order awaiting payment."),
    ("jobs", "Results of queued requests answered 202."),
    ("payments", "Payment provider webhooks."),
    ("admin", "Catalog management; `Authorization: Bearer <ADMIN_TOKEN>`."),
    ("operations", "Health, metrics and this document."),
)


def _touch_up(doc: dict[str, Any]) -> None:
    """What the marshmallow schemas can't say: configuration-dependent bounds, extensions."""
    found = doc["components"]["schemas"]
    found["HoldRequest"]["properties"]["qty"].update(
        minimum=1, description="1 to `MAX_QTY_PER_HOLD` units: the bound is configuration "
        f"(default {DEFAULTS.max_qty_per_hold}); a larger `qty` is answered 422.")
    found["WebhookRequest"]["description"] = "Other fields are accepted and ignored."
    # RFC 9457 lets a problem carry extension members (e.g. `checks` on a 503 /healthz).
    found["Problem"].pop("additionalProperties", None)


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document as a JSON-ready dict (built once per process)."""
    spec = APISpec(title="Flash-sale checkout", version=VERSION, openapi_version="3.1.0",
                   plugins=[MarshmallowPlugin()], info={"description": INTRO})
    for name in SCHEMAS:
        spec.components.schema(name, schema=getattr(schemas, name))
    for name, value in HEADERS.items():
        spec.components.header(name, value)
    for name, value in PARAMETERS.items():
        spec.components.parameter(name, value["in"], value)
    for name, value in RESPONSES.items():
        spec.components.response(name, value)
    spec.components.security_scheme("adminToken", {
        "type": "http", "scheme": "bearer",
        "description": "The value of `ADMIN_TOKEN`. When it is unset, admin endpoints "
                       "answer 403."})
    for name, description in TAGS:
        spec.tag({"name": name, "description": description})
    for op in OPERATIONS:
        spec.path(path=op.path, operations={op.method: operation(op)})
    doc = spec.to_dict()
    _touch_up(doc)
    return doc
