"""The OpenAPI 3.1 document of the HTTP contract, generated from the marshmallow schemas.

Schemas come from ``gateway.schemas``; parameters, headers and the common responses are
registered once as components, and every route is one ``Operation``. Every bound the
service enforces is stated (``flashsale.limits`` and the configuration): what the
marshmallow fields can't say is added by ``_touch_up``. What depends on configuration
(``MAX_QTY_PER_HOLD``, customer tokens, the per-customer and rate limits) is read from the
serving process's settings, so the document is true of the deployment that serves it at
``GET /api/openapi.json``; it is built once per configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from flashsale import limits
from flashsale.config import Settings
from flashsale.problems import (
    CUSTOMER_LIMIT,
    HOLD_EXPIRED,
    IDEMPOTENCY_REUSED,
    INSUFFICIENT_STOCK,
    STOCK_LIMIT,
)
from gateway import schemas
from gateway.errors import PROBLEM_JSON
from gateway.handlers import JSON, MAX_BODY, SIGNATURE_TOLERANCE_S

VERSION = "0.1.0"
DEFAULTS = Settings()
KIB = MAX_BODY // 1024

SCHEMAS = ("OrderRequest", "WebhookRequest", "ProductRequest", "RestockRequest",
           "Product", "Hold", "Order", "WebhookResult", "Accepted", "Job", "Problem")

INTRO = f"""Sells limited stock to a crowd without overselling.

**Conventions.** Bodies are JSON (`{JSON}`). Every error, unknown routes (404) and wrong
methods (405) included, is an RFC 9457 problem document (`{PROBLEM_JSON}`) with `type`,
`title`, `status` and `detail`, plus the extra members named on each response. Malformed
JSON: 400. A body that is not `{JSON}`: 415. A body over {KIB} KiB: 413. A well-formed body
that breaks the schema (missing or unknown field, wrong type, value out of range): 422, with
the offending fields in `errors`. An integral number such as `2.0` is the integer `2`, as in
JSON Schema. Bad input never changes anything. Timestamps are RFC 3339 UTC
(`2026-11-24T10:00:00.123Z`). Money is in minor units (`price_cents`, `amount_cents`) with a
`currency` code.

**Ids and bounds.** Product ids are integers from 1 to {limits.MAX_PRODUCT_ID}. Hold, order
and job ids are opaque strings to clients, but only ids the service issues exist: a path
naming any other id (or product id) is answered 404. Every other bound (quantities, prices,
stock, lengths, header formats) is stated on the schema it applies to; a value outside it is
answered 422 in a body and 400 in a header.

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
least 24 hours. A queued request the service cannot apply is answered on its own (409 or
422) and set aside for an operator; the product's other requests go on.

**Idempotency-Key.** `POST /api/holds` and `POST /api/orders` accept an `Idempotency-Key`
header. The same key with the same body returns the first request's status and body and
creates nothing new, also while the first is still queued (then 202 with the same
`job_id`). The same key with a different body: 422. Keys are kept at least 24 hours.

**Time decides expiry.** A hold past `expires_at` is never reported `active` and an unpaid
order past `pay_by` is never reported `pending_payment`, even before the background sweep
has released their units (it does so within seconds).
"""


# --- bounds ----------------------------------------------------------------------------------

HEX_ID_LENGTH = 16


def id_schema(kind: str) -> dict[str, Any]:
    """A hold, order or job id as the service issues them: ``<kind>_<product id>_<hex>``."""
    return {"type": "string", "pattern": limits.id_pattern(kind),
            "minLength": len(f"{kind}_0_") + HEX_ID_LENGTH,
            "maxLength": len(f"{kind}_{limits.MAX_PRODUCT_ID}_") + HEX_ID_LENGTH}


JOB_URL_PATTERN = "^/api/jobs/" + limits.id_pattern("job").removeprefix("^")

# 1-255 printable ASCII characters once unquoted; a field value starts and ends with a
# visible character (RFC 9110), so a bare key does too. "" is empty, hence left out.
IDEMPOTENCY_KEY_PATTERN = (
    r'^(?:[!#-~](?:[ -~]{0,253}[!-~])?'  # bare, not starting with a quote
    r'|"(?:[ -~]{0,253}[!#-~])?'  # bare, starting but not ending with a quote
    r'|"[ -~]{1,255}")$'  # quoted
)
MAX_SIGNATURES = 15  # the gateway reads the first 16 entries: t and up to 15 v1
SIGNATURE_PATTERN = rf"^t=[0-9]{{1,12}}(?:,v1=[0-9a-f]{{64}}){{1,{MAX_SIGNATURES}}}$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
VISIBLE_ASCII_PATTERN = r"^[ -~]*$"  # a header value of printable ASCII (RFC 9110 without obs-text)
MAX_AMOUNT_CENTS = limits.MAX_QTY_PER_HOLD_LIMIT * limits.MAX_PRICE_CENTS


# --- components --------------------------------------------------------------------------

def header(description: str, example: str, required: bool = False,
           **schema: Any) -> dict[str, Any]:
    """A response header; ``required`` when every response that declares it carries it."""
    return {"description": description, "required": required,
            "schema": {"type": "string", **schema}, "example": example}


HEADER_NAMES = {"JobLocation": "Location"}  # component name -> the header it describes
HEADERS = {
    "Location": header("The URL of the created resource.", "/api/holds/hold_1_0123456789abcdef",
                       required=True, format="uri-reference"),
    "JobLocation": header("The job to poll: `/api/jobs/{job_id}`.",
                          "/api/jobs/job_1_0123456789abcdef", required=True,
                          pattern=JOB_URL_PATTERN),
    "Retry-After": header("Seconds to wait before polling (or retrying).", "1", required=True,
                          pattern="^[0-9]{1,9}$"),
    "Preference-Applied": header("The `Prefer` preferences this response honoured.",
                                 "respond-async"),
    "WWW-Authenticate": header("The scheme the endpoint expects.", 'Bearer realm="admin"',
                               required=True),
    "RateLimit-Policy": header("The client's quota: `q` requests a `w`-second window.",
                               '"minute";q=600;w=60', required=True),
    "RateLimit": header("What is left of it: `r` requests, the window moving on in `t` "
                        "seconds.", '"minute";r=599;t=60', required=True),
}

PARAMETERS: dict[str, dict[str, Any]] = {
    "Prefer": {"in": "header", "name": "Prefer",
               "schema": {"type": "string", "pattern": VISIBLE_ASCII_PATTERN},
               "examples": {"async": {"value": "respond-async"},
                            "wait": {"value": "wait=10"}},
               "description": (
                   "How long to wait for the result (RFC 7240). `wait=N`: up to N seconds, "
                   "N in plain decimal (fractions allowed, negative meaning 0, capped at "
                   f"{DEFAULTS.max_wait_seconds:g}); `respond-async`: answer 202 at once "
                   "unless a `wait` is also given. Preferences the gateway does not know or "
                   "cannot use are ignored, as RFC 7240 asks; without a usable one the "
                   "gateway waits `DEFAULT_WAIT_SECONDS`. Printable ASCII only, like every "
                   "header the service reads: any other byte is 400. A response that "
                   "honoured it carries `Preference-Applied`.")},
    "Idempotency-Key": {"in": "header", "name": "Idempotency-Key",
                        "schema": {"type": "string", "minLength": 1,
                                   "maxLength": limits.MAX_KEY_LENGTH + 2,
                                   "pattern": IDEMPOTENCY_KEY_PATTERN},
                        "example": "order-7f3c2a",
                        "description": (
                            f"1-{limits.MAX_KEY_LENGTH} printable ASCII characters, sent "
                            "bare or as a quoted string (`\"k\"` and `k` are the same key); "
                            "empty, longer, or with any other byte: 400. The same key with "
                            "the same body replays the first response and creates nothing "
                            "new; with a different body: 422. Keys are separate per endpoint "
                            "and kept at least 24 hours.")},
    "X-Webhook-Signature": {
        "in": "header", "name": "X-Webhook-Signature",
        "schema": {"type": "string", "pattern": SIGNATURE_PATTERN,
                   "maxLength": len("t=,") + 12 + MAX_SIGNATURES * len(",v1=" + "0" * 64)},
        "example": "t=1795514400,v1=" + "5f2b" * 16,
        "description": (
            "Required when `WEBHOOK_SECRET` is set: `t=<unix seconds>,v1=<hex "
            "HMAC-SHA256(secret, \"<t>.<raw body>\")>`, lowercase hex. Up to "
            f"{MAX_SIGNATURES} `v1` entries may be given (a provider rotating its secret); "
            f"one must match. `t` more than {SIGNATURE_TOLERANCE_S} s from now, a missing, "
            "malformed or wrong signature: 401, and nothing is stored.")},
    "product_id": {"in": "path", "name": "product_id", "required": True,
                   "schema": {"type": "integer", "format": "int32", "minimum": 1,
                              "maximum": limits.MAX_PRODUCT_ID},
                   "example": 1,
                   "description": (
                       f"A product id: ASCII digits `{limits.PRODUCT_ID_PATTERN}`, 1 to "
                       f"{limits.MAX_PRODUCT_ID}, no sign or leading zero. Anything else "
                       "names no product: 404.")},
    "hold_id": {"in": "path", "name": "hold_id", "required": True, "schema": id_schema("hold"),
                "example": "hold_1_0123456789abcdef",
                "description": "A hold id as `POST /api/holds` issued it; any other: 404."},
    "order_id": {"in": "path", "name": "order_id", "required": True,
                 "schema": id_schema("ord"), "example": "ord_1_0123456789abcdef",
                 "description": "An order id as `POST /api/orders` issued it; any other: 404."},
    "job_id": {"in": "path", "name": "job_id", "required": True, "schema": id_schema("job"),
               "example": "job_1_0123456789abcdef",
               "description": "A job id from a 202's `Location`; any other: 404."},
}


def reply(description: str, schema: str | dict[str, Any] | None = None,
          headers: tuple[str, ...] = (), media: str = JSON,
          links: tuple[str, ...] = ()) -> dict[str, Any]:
    """A response object: description, optional body schema, header component names and
    the links (``LINKS``) from it to the operations its body feeds."""
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    if headers:
        response["headers"] = {HEADER_NAMES.get(name, name): name for name in headers}
    if links:
        response["links"] = {name: LINKS[name] for name in links}
    return response


def link(operation_id: str, description: str, parameters: dict[str, str] | None = None,
         body: dict[str, str] | None = None) -> dict[str, Any]:
    """An OpenAPI link; ``body`` names the request body fields the response supplies."""
    found: dict[str, Any] = {"operationId": operation_id, "description": description}
    if parameters:
        found["parameters"] = parameters
    if body:
        found["requestBody"] = body
    return found


# How a client goes on from a response: the ids in a body feed the next operations.
LINKS = {
    "GetProduct": link("getProduct", "Read the product.",
                       {"product_id": "$response.body#/id"}),
    "HoldProduct": link("createHold", "Reserve units of the product.",
                        body={"product_id": "$response.body#/id"}),
    "RestockProduct": link("restockProduct", "Add units to the product.",
                           {"product_id": "$response.body#/id"}),
    "GetHold": link("getHold", "Read the hold.", {"hold_id": "$response.body#/hold_id"}),
    "OrderHold": link("createOrder", "Turn the hold into an order.",
                      body={"hold_id": "$response.body#/hold_id"}),
    "GetOrder": link("getOrder", "Read the order.", {"order_id": "$response.body#/order_id"}),
    "PayOrder": link("paymentWebhook", "The payment provider's notification for the order.",
                     body={"order_id": "$response.body#/order_id"}),
    "GetJob": link("getJob", "Poll the job.", {"job_id": "$response.body#/job_id"}),
}
PRODUCT_LINKS = ("GetProduct", "HoldProduct", "RestockProduct")
ORDER_LINKS = ("GetOrder", "GetHold", "PayOrder")


def problem(description: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    return reply(description, "Problem", headers, PROBLEM_JSON)


RESPONSES = {
    "MalformedJson": problem("Malformed JSON."),
    "Unauthorized": problem("Missing or wrong `Authorization: Bearer <ADMIN_TOKEN>`.",
                            ("WWW-Authenticate",)),
    "CustomerUnauthorized": problem("`CUSTOMER_JWT_SECRET` is set and the customer token is "
                                    "missing, malformed, badly signed or expired.",
                                    ("WWW-Authenticate",)),
    "AdminDisabled": problem("`ADMIN_TOKEN` is not set: admin endpoints are disabled."),
    "NotFound": problem("Unknown resource, or an id the service cannot have issued."),
    "TooLarge": problem(f"The body is larger than {KIB} KiB."),
    "NotJson": problem(f"The body is not `{JSON}`."),
    "Invalid": problem("The body breaks the schema (missing or unknown field, wrong type, "
                       "value out of range); `errors` names the offending fields."),
    "Unavailable": problem("Redis or the database is unreachable, or (for writes, problem "
                           "type `busy`) this gateway already has its fill of requests "
                           "waiting and queued nothing; retry after `Retry-After` seconds.",
                           ("Retry-After",)),
    "Accepted": reply("Queued and not decided within the wait. Poll `Location` (the job) "
                      "every `Retry-After` seconds until its `status` is `done`.", "Accepted",
                      ("JobLocation", "Retry-After", "Preference-Applied"), links=("GetJob",)),
}

# Every endpoint that takes a JSON body can fail these ways.
BODY_ERRORS = {400: "MalformedJson", 413: "TooLarge", 415: "NotJson", 422: "Invalid"}
ADMIN_ERRORS = {401: "Unauthorized", 403: "AdminDisabled"}
IDEMPOTENT_ERRORS = {
    400: problem("Malformed JSON, or an `Idempotency-Key` that is not 1-255 printable ASCII "
                 "characters."),
    422: problem("The body breaks the schema (`errors` names the fields), title "
                 f"`{IDEMPOTENCY_REUSED}`: the key was first used with another body, or "
                 "title `Request cannot be applied`: a value derived from it does not fit."),
}
CREATED = ("Location", "Preference-Applied")


# --- operations ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Deployment:
    """What of the document depends on configuration: it states this deployment's bounds."""

    max_qty_per_hold: int = DEFAULTS.max_qty_per_hold
    customer_tokens: bool = False  # CUSTOMER_JWT_SECRET is set
    max_qty_per_customer: int | None = None
    rate_limit_per_minute: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> Deployment:
        return cls(settings.max_qty_per_hold, settings.customer_jwt_secret is not None,
                   settings.max_qty_per_customer, settings.rate_limit_per_minute)

    @property
    def rate_headers(self) -> tuple[str, ...]:
        """Headers on every answer of a counted write (draft-ietf-httpapi-ratelimit-headers)."""
        return ("RateLimit-Policy", "RateLimit") if self.rate_limit_per_minute else ()


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
    security: str | None = None  # a security scheme component


def customer_errors(d: Deployment) -> dict[int, str | dict[str, Any]]:
    """With customer tokens, holds and orders answer 401 without a valid one."""
    return {401: "CustomerUnauthorized"} if d.customer_tokens else {}


def counted_write(d: Deployment, responses: dict[int, str | dict[str, Any]],
                  counted: tuple[int, ...]) -> dict[int, str | dict[str, Any]]:
    """A hold or order write's responses; with ``RATE_LIMIT_PER_MINUTE``, 429 and the
    RateLimit headers on the ``counted`` answers (those given after the request counted)."""
    if not d.rate_limit_per_minute:
        return responses
    found = dict(responses)
    for status in counted:
        response = found[status]
        response = dict(RESPONSES[response]) if isinstance(response, str) else dict(response)
        headers = dict(response.get("headers", {}))
        headers.update({name: name for name in d.rate_headers})
        found[status] = {**response, "headers": headers}
    found[429] = problem(f"More than {d.rate_limit_per_minute} `POST /api/holds` and `POST "
                         "/api/orders` from this client in the last minute (its customer, "
                         "else its address): nothing was queued. Retry after `Retry-After` "
                         "seconds.", ("Retry-After", *d.rate_headers))
    return found


def hold_operations(d: Deployment) -> tuple[Operation, ...]:
    customer = "customerToken" if d.customer_tokens else None
    limit = d.max_qty_per_customer
    who = ("the customer of the bearer token" if d.customer_tokens else
           "`customer_id`, named by the shop's back end" + (" (required)" if limit else ""))
    conflict = f"Title `{INSUFFICIENT_STOCK}`; `available` is the number of units available " \
               "when decided."
    if limit:
        conflict += (f" Or title `{CUSTOMER_LIMIT}`: the customer would have more than {limit} "
                     "units of the product (active holds, unpaid and paid orders); `limit` and "
                     "`held` (the units the customer has when decided).")
    create = Operation(
        "post", "/api/holds", "createHold", "holds", "Reserve units of a product",
        "Queued behind the product's other stock operations; holds on one product are "
        "granted in the order the gateway accepted them. The units stay reserved until "
        f"`expires_at`, `HOLD_TTL_SECONDS` (default {DEFAULTS.hold_ttl_seconds}) after "
        f"creation. `qty` is 1 to `MAX_QTY_PER_HOLD` ({d.max_qty_per_hold} here; a deployment "
        f"setting, default {DEFAULTS.max_qty_per_hold}, at most "
        f"{limits.MAX_QTY_PER_HOLD_LIMIT}). The customer is {who}. A 202 names the `hold_id` "
        "the hold will have if it is granted.",
        counted_write(d, {
            201: reply("Granted.", "Hold", CREATED, links=("GetHold", "OrderHold")),
            202: "Accepted", 404: problem("Unknown product."),
            409: problem(conflict, ("Preference-Applied",)),
            **BODY_ERRORS, **IDEMPOTENT_ERRORS, **customer_errors(d), 503: "Unavailable"},
            (201, 202, 404, 409)),
        body="HoldRequest", example={"product_id": 1, "qty": 2},
        params=("Prefer", "Idempotency-Key"), security=customer)
    read = Operation(
        "get", "/api/holds/{hold_id}", "getHold", "holds", "Read a hold",
        "A hold whose `expires_at` has passed is never reported `active`. A converted hold "
        "names its `order_id` and stays `converted` whatever becomes of the order."
        + (" Another customer's hold is answered 404." if d.customer_tokens else ""),
        {200: reply("The hold.", "Hold"), 404: "NotFound", **customer_errors(d),
         503: "Unavailable"},
        params=("hold_id",), security=customer)
    return create, read


def order_operations(d: Deployment) -> tuple[Operation, ...]:
    customer = "customerToken" if d.customer_tokens else None
    theirs = " Another customer's hold or order is answered 404." if d.customer_tokens else ""
    create = Operation(
        "post", "/api/orders", "createOrder", "orders", "Turn a hold into an order",
        "The hold becomes `converted`; its units stay reserved until payment, a failed "
        "payment, or `pay_by`, `ORDER_PAYMENT_TTL_SECONDS` (default "
        f"{DEFAULTS.order_payment_ttl_seconds}) after creation. One order per hold, ever: a "
        "second order for the same hold answers 200 with the first order. An order's id "
        "follows from its hold's, so the `order_id` a 202 names is the order's id." + theirs,
        counted_write(d, {
            201: reply("Created.", "Order", CREATED, links=ORDER_LINKS),
            200: reply("The hold already has this order.", "Order", ("Preference-Applied",),
                       links=ORDER_LINKS),
            202: "Accepted",
            404: problem("Unknown hold, or a `hold_id` the service cannot have issued."),
            409: problem(f"Title `{HOLD_EXPIRED}`: the hold expired before the order was "
                         "processed.", ("Preference-Applied",)),
            **BODY_ERRORS, **IDEMPOTENT_ERRORS, **customer_errors(d), 503: "Unavailable"},
            (200, 201, 202, 404, 409)),
        body="OrderRequest", example={"hold_id": "hold_1_0123456789abcdef"},
        params=("Prefer", "Idempotency-Key"), security=customer)
    read = Operation(
        "get", "/api/orders/{order_id}", "getOrder", "orders", "Read an order",
        "An order past `pay_by` is never reported `pending_payment`: it is `cancelled` and "
        "its units return to `available` within seconds." + theirs,
        {200: reply("The order.", "Order"), 404: "NotFound", **customer_errors(d),
         503: "Unavailable"},
        params=("order_id",), security=customer)
    return create, read


OTHER_OPERATIONS = (
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
        "nothing; a `paid` webhook for an order cancelled by timeout, or for an order that "
        "can no longer be created, is recorded, `ignored`, and listed for refund by "
        "`flashsale refunds`. A webhook for an order that does not exist yet (it may still "
        "be queued) is stored, answered 202 `pending`, and applied as soon as the order "
        "exists. The same `idempotency_key` again returns the first response's status and "
        "body (a pending webhook applied since answers with its applied result); with a "
        "different `order_id` or `status`: 422. Fields other than `idempotency_key`, "
        "`order_id` and `status` are ignored. `Prefer` is not read: the gateway waits "
        "`DEFAULT_WAIT_SECONDS`.",
        {200: reply("Applied or ignored.", "WebhookResult"),
         202: reply("Stored, `outcome: pending`: the order does not exist yet, or the "
                    "webhook is still queued.", "WebhookResult"),
         401: problem("`WEBHOOK_SECRET` is set and the signature is missing, malformed or "
                      f"wrong, or its `t` is more than {SIGNATURE_TOLERANCE_S} s from now. "
                      "Nothing is stored."),
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
        {201: reply("Created.", "Product", CREATED, links=PRODUCT_LINKS), 202: "Accepted",
         **ADMIN_ERRORS, **BODY_ERRORS, 503: "Unavailable"},
        body="ProductRequest",
        example={"name": "Sneaker drop", "price_cents": 1999, "currency": "USD",
                 "stock": 100},
        params=("Prefer",), security="adminToken"),
    Operation(
        "post", "/api/admin/products/{product_id}/restock", "restockProduct", "admin",
        "Add units to a product",
        "Queued behind the product's holds and orders like a hold; the result is the "
        "product after the restock. Not idempotent: each request adds `qty`. A product "
        f"holds at most {limits.MAX_STOCK} units in stock.",
        {200: reply("Restocked.", "Product", ("Preference-Applied",), links=PRODUCT_LINKS),
         202: "Accepted", **ADMIN_ERRORS, 404: problem("Unknown product."),
         409: problem(f"Title `{STOCK_LIMIT}`: the stock would exceed {limits.MAX_STOCK} "
                      "units; `limit` is that bound.", ("Preference-Applied",)),
         **BODY_ERRORS, 503: "Unavailable"},
        body="RestockRequest", example={"qty": 50}, params=("product_id", "Prefer"),
        security="adminToken"),
    Operation(
        "get", "/healthz", "healthz", "operations", "Liveness and dependencies",
        "200 when this process can reach Redis and the database, else 503.",
        {200: reply("Both reachable.", {
            "type": "object", "required": ["status", "checks"],
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
        "The OpenAPI 3.1 document of this API, for this deployment's configuration.",
        {200: reply("The document.", {"type": "object"})}),
)

PRODUCT_OPERATION = Operation(
    "get", "/api/products/{product_id}", "getProduct", "products", "Read a product",
    "`stock`: units not yet sold. `available`: `stock` minus the units reserved by "
    "active holds and unpaid orders; never negative. Served from a cache that reflects "
    "every committed stock operation within 1 second.",
    {200: reply("The product.", "Product"), 404: "NotFound", 503: "Unavailable"},
    params=("product_id",))


def operations(d: Deployment) -> tuple[Operation, ...]:
    """Every route of the API, as this deployment answers it."""
    return (PRODUCT_OPERATION, *hold_operations(d), *order_operations(d), *OTHER_OPERATIONS)


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
        # By reference: the hold schema is registered as an instance, not by its class.
        media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{op.body}"}}
        if op.example:
            media["example"] = op.example
        spec["requestBody"] = {"required": True, "content": {JSON: media}}
    if op.security:
        spec["security"] = [{op.security: []}]
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


# --- what the marshmallow schemas can't say ----------------------------------------------

def _bound(prop: dict[str, Any], **bounds: Any) -> None:
    """Add the bounds a marshmallow field does not state; never override one it does."""
    for key, value in bounds.items():
        prop.setdefault(key, value)


def _touch_up(doc: dict[str, Any], d: Deployment) -> None:
    """Configuration-dependent bounds, the limits of responses, extensions."""
    found = doc["components"]["schemas"]
    _requests(found, d)
    _responses(found)
    # RFC 9457 lets a problem carry extension members (e.g. `checks` on a 503 /healthz).
    found["Problem"].pop("additionalProperties", None)


def _requests(found: dict[str, Any], d: Deployment) -> None:
    hold = found["HoldRequest"]["properties"]
    _bound(hold["product_id"], minimum=1, maximum=limits.MAX_PRODUCT_ID)
    _bound(hold["qty"], minimum=1, maximum=d.max_qty_per_hold)
    hold["qty"]["description"] = (
        "1 to `MAX_QTY_PER_HOLD` units: the bound is configuration (default "
        f"{DEFAULTS.max_qty_per_hold}, this deployment {d.max_qty_per_hold}); a larger `qty` "
        "is answered 422.")
    if "customer_id" in hold:
        hold["customer_id"]["description"] = (
            "The customer, as the shop's back end knows it: 1 to 64 visible ASCII "
            "characters." + (" Required: `MAX_QTY_PER_CUSTOMER` is set."
                             if d.max_qty_per_customer else ""))
    order = found["OrderRequest"]["properties"]
    _bound(order["hold_id"], minLength=1, maxLength=limits.MAX_KEY_LENGTH)
    order["hold_id"]["description"] = (
        "A `hold_id` as `POST /api/holds` issued it; a string the service cannot have "
        "issued names no hold (404).")
    webhook = found["WebhookRequest"]
    webhook["description"] = "Other fields are accepted and ignored."
    for name in ("idempotency_key", "order_id"):
        _bound(webhook["properties"][name], minLength=1, maxLength=limits.MAX_KEY_LENGTH)
    product = found["ProductRequest"]["properties"]
    _bound(product["name"], minLength=1, maxLength=limits.MAX_NAME_LENGTH)
    _bound(product["price_cents"], minimum=0, maximum=limits.MAX_PRICE_CENTS)
    _bound(product["currency"], pattern=CURRENCY_PATTERN)
    _bound(product["stock"], minimum=0, maximum=limits.MAX_STOCK)
    _bound(found["RestockRequest"]["properties"]["qty"], minimum=1, maximum=limits.MAX_STOCK)


def _responses(found: dict[str, Any]) -> None:
    """Response bodies: which members are always there, and the bounds of their values."""
    product_id = {"minimum": 1, "maximum": limits.MAX_PRODUCT_ID}
    units = {"minimum": 0, "maximum": limits.MAX_STOCK}
    customer = {"type": "string", "pattern": limits.CUSTOMER_ID_PATTERN, "minLength": 1,
                "maxLength": 64, "description": "The customer, when the request named one."}
    product = found["Product"]
    product["required"] = ["id", "name", "price_cents", "currency", "stock", "available"]
    _bound(product["properties"]["id"], **product_id)
    _bound(product["properties"]["name"], minLength=1, maxLength=limits.MAX_NAME_LENGTH)
    _bound(product["properties"]["price_cents"], minimum=0, maximum=limits.MAX_PRICE_CENTS)
    _bound(product["properties"]["currency"], pattern=CURRENCY_PATTERN)
    _bound(product["properties"]["stock"], **units)
    _bound(product["properties"]["available"], **units)

    hold = found["Hold"]
    hold["required"] = ["hold_id", "product_id", "qty", "status", "expires_at"]
    hold["properties"]["hold_id"].update(id_schema("hold"))
    hold["properties"]["order_id"].update(id_schema("ord"))
    hold["properties"].setdefault("customer_id", customer)
    _bound(hold["properties"]["product_id"], **product_id)
    _bound(hold["properties"]["qty"], minimum=1, maximum=limits.MAX_QTY_PER_HOLD_LIMIT)

    order = found["Order"]
    order["required"] = ["order_id", "hold_id", "product_id", "qty", "amount_cents",
                         "currency", "status", "pay_by"]
    order["properties"]["order_id"].update(id_schema("ord"))
    order["properties"]["hold_id"].update(id_schema("hold"))
    order["properties"].setdefault("customer_id", customer)
    _bound(order["properties"]["product_id"], **product_id)
    _bound(order["properties"]["qty"], minimum=1, maximum=limits.MAX_QTY_PER_HOLD_LIMIT)
    _bound(order["properties"]["amount_cents"], minimum=0, maximum=MAX_AMOUNT_CENTS)
    _bound(order["properties"]["currency"], pattern=CURRENCY_PATTERN)

    result = found["WebhookResult"]
    result["required"] = ["idempotency_key", "order_id", "outcome"]
    result["properties"]["order_status"]["description"] = "The order's status, once applied."
    # An applied webhook always says what became of the order.
    result["if"] = {"properties": {"outcome": {"const": "applied"}}, "required": ["outcome"]}
    result["then"] = {"required": ["order_status"]}

    accepted = found["Accepted"]
    accepted["required"] = ["job_id", "status", "status_url"]
    accepted["properties"]["job_id"].update(id_schema("job"))
    accepted["properties"]["status_url"]["pattern"] = JOB_URL_PATTERN
    accepted["properties"]["hold_id"].update(id_schema("hold"))
    accepted["properties"]["order_id"].update(id_schema("ord"))

    job = found["Job"]
    job["required"] = ["job_id", "status"]
    job["properties"]["job_id"].update(id_schema("job"))
    job["if"] = {"properties": {"status": {"const": "done"}}, "required": ["status"]}
    job["then"] = {"required": ["result"]}
    found["JobResult"]["required"] = ["status", "body"]
    _bound(found["JobResult"]["properties"]["status"], minimum=200, maximum=599)

    problem_ = found["Problem"]
    problem_["required"] = ["type", "title", "status", "detail"]
    _bound(problem_["properties"]["status"], minimum=400, maximum=599)
    extra = problem_["properties"]
    extra.setdefault("limit", {"type": "integer", "description": f"409 `{STOCK_LIMIT}`: the "
                               f"most units in stock; 409 `{CUSTOMER_LIMIT}`: the most units "
                               "of the product one customer may have."})
    extra.setdefault("held", {"type": "integer", "minimum": 0, "description":
                              f"409 `{CUSTOMER_LIMIT}`: the units the customer has."})


def customers_intro(d: Deployment) -> str:
    """The document's paragraph on customers, for this deployment's settings."""
    if d.customer_tokens:
        who = ("`CUSTOMER_JWT_SECRET` is set: holds, orders and their reads need "
               "`Authorization: Bearer <JWT>` (HS256, `exp` required, `sub` the customer id, "
               "1-64 visible ASCII characters); missing, malformed, badly signed or expired: "
               "401 with `WWW-Authenticate: Bearer`. Another customer's hold or order is "
               "answered 404. Idempotency keys are scoped per customer.")
    else:
        who = ("Customer tokens are off: the hold body may name the customer in "
               "`customer_id`; the shop's back end vouches for it.")
    if d.max_qty_per_customer:
        who += (f" A customer may hold, have on order or have bought at most "
                f"{d.max_qty_per_customer} units of one product (`MAX_QTY_PER_CUSTOMER`), "
                "decided in queue order.")
    if d.rate_limit_per_minute:
        who += (f" A client (its customer, else its address) may send at most "
                f"{d.rate_limit_per_minute} `POST /api/holds` and `POST /api/orders` a minute "
                "over all gateways (`RATE_LIMIT_PER_MINUTE`): 429 beyond, with `Retry-After`; "
                "their answers carry `RateLimit-Policy` and `RateLimit`.")
    return f"\n**Customers and fairness.** {who}\n"


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document as a JSON-ready dict for ``settings`` (by default this
    process's environment, the configuration it serves under). Built once per configuration."""
    settings = settings if settings is not None else Settings.from_env()
    return _document(Deployment.of(settings))


@lru_cache(maxsize=8)
def _document(d: Deployment) -> dict[str, Any]:
    spec = APISpec(title="Flash-sale checkout", version=VERSION, openapi_version="3.1.0",
                   plugins=[MarshmallowPlugin()],
                   info={"description": INTRO + customers_intro(d)})
    # The hold schema is the very one the handler loads with, configured bounds included.
    hold = schemas.hold_schema(d.max_qty_per_hold, customer_in_body=not d.customer_tokens,
                               customer_required=not d.customer_tokens and
                               d.max_qty_per_customer is not None)
    spec.components.schema("HoldRequest", schema=hold)
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
        "description": "The value of `ADMIN_TOKEN` (printable ASCII). Missing or wrong: 401 "
                       "with `WWW-Authenticate`. When `ADMIN_TOKEN` is unset, admin "
                       "endpoints answer 403."})
    if d.customer_tokens:
        spec.components.security_scheme("customerToken", {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "An HS256 JWT signed with `CUSTOMER_JWT_SECRET`, with `exp` and "
                           "`sub` (the customer id, 1-64 visible ASCII characters)."})
    for name, description in TAGS:
        spec.tag({"name": name, "description": description})
    for op in operations(d):
        spec.path(path=op.path, operations={op.method: operation(op)})
    doc = spec.to_dict()
    _touch_up(doc, d)
    return doc
