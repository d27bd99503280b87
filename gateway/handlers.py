"""HTTP handlers: load the body, call one function, shape the response."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import time
from typing import Any

import orjson
from aiohttp import web
from marshmallow import validate

from flashsale.limits import is_visible_ascii, parse_product_id
from flashsale.problems import not_found, problem
from gateway import schemas
from gateway.customers import idempotency_scope, rate_limit, token_customer
from gateway.errors import ProblemError, body_bytes
from gateway.replies import job_status
from gateway.submit import (
    Answer,
    Preference,
    Write,
    cache_created,
    fingerprint,
    idempotency_key,
    product_from_cache,
    submit,
)
from gateway.typedefs import EXECUTOR, REDIS, SETTINGS
from workers import keys, reads

MAX_BODY = 64 * 1024
SIGNATURE_TOLERANCE_S = 300
MAX_SIGNATURE_PARTS = 16
_TIMESTAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(status=status, body=body_bytes(body), content_type=JSON,
                        headers=headers)


async def read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY,
                                            actual_size=request.content_length)
    if request.content_type != JSON:
        raise ProblemError(problem(415, detail="The body must be application/json"))
    return await request.read()


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProblemError(problem(400, "Malformed JSON", str(exc),
                                   slug="malformed-json")) from None


async def read_json(request: web.Request) -> Any:
    return parse_json(await read_body(request))


def preference(request: web.Request) -> Preference:
    """The client's Prefer header. Preferences we do not know, or values we cannot use,
    are ignored (RFC 7240); bytes that are not printable ASCII are a 400."""
    settings = request.app[SETTINGS]
    values = request.headers.getall("Prefer", [])
    if not all(is_visible_ascii(value) for value in values):
        raise ProblemError(problem(400, "Invalid Prefer header",
                                   "Prefer must be printable ASCII", slug="invalid-prefer"))
    return Preference.parse(values, settings.default_wait_seconds, settings.max_wait_seconds)


def respond(answer: Answer, prefer: Preference, location: str | None = None) -> web.Response:
    """The final result when there is one, else 202 pointing at the job."""
    headers = {"Preference-Applied": prefer.applied} if prefer.applied else {}
    if answer.result is not None:
        if location and answer.result["status"] == 201:
            headers["Location"] = location.format(**answer.result["body"])
        return _result_response(answer.result, headers)
    url = f"/api/jobs/{answer.job_id}"
    body = {"job_id": answer.job_id,
            "status": answer.status if answer.status == "processing" else "queued",
            "status_url": url}
    if answer.resource:
        body[answer.resource[0]] = answer.resource[1]
    headers.update({"Location": url, "Retry-After": "1"})
    return json_response(body, 202, headers)


def _result_response(result: dict[str, Any], headers: dict[str, str]) -> web.Response:
    status = int(result["status"])
    content_type = "application/problem+json" if status >= 400 else JSON
    return web.Response(status=status, body=body_bytes(result["body"]),
                        content_type=content_type, headers=headers)


async def in_executor(request: web.Request, func: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], func, *args)


# --- products -------------------------------------------------------------------------

async def get_product(request: web.Request) -> web.Response:
    product_id = _positive_int(request.match_info["product_id"], "Product")
    product = await product_from_cache(request.app, product_id)
    if product is None:
        raise ProblemError(not_found("Product", product_id))
    return json_response(product)


def _positive_int(raw: str, what: str) -> int:
    product_id = parse_product_id(raw)
    if product_id is None:
        raise ProblemError(not_found(what, raw))
    return product_id


# --- holds ----------------------------------------------------------------------------

async def create_hold(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    customer = token_customer(request)
    key, prefer = idempotency_key(request), preference(request)
    no_tokens = settings.customer_jwt_secret is None
    schema = schemas.hold_schema(settings.max_qty_per_hold, customer_in_body=no_tokens,
                                 customer_required=no_tokens and
                                 settings.max_qty_per_customer is not None)
    data = await read_json(request)
    body = plain_hold(schema, data) or schemas.load(schema, data)
    customer = customer or body.get("customer_id")
    await rate_limit(request, customer)
    product_id, qty = body["product_id"], body["qty"]
    args = {**body, "hold_id": keys.new_id("hold", product_id)}
    if customer is not None:
        args["customer_id"] = customer
    write = Write(product_id=product_id, op="hold", resource="hold_id", admission_qty=qty,
                  args=args, **keyed(idempotency_scope("holds", customer), key, body))
    return await queue_write(request, write, "/api/holds/{hold_id}", prefer)


def plain_hold(schema: Any, data: Any) -> dict[str, Any] | None:
    """The common hold body, ``{"product_id": n, "qty": n}`` with plain integers within the
    schema's own bounds, accepted without marshmallow (a tenth of a hold's CPU); anything
    else is None, and marshmallow judges it and words the 422 as always."""
    if type(data) is not dict or len(data) != 2:
        return None
    product_id, qty = data.get("product_id"), data.get("qty")
    if type(product_id) is not int or type(qty) is not int:
        return None
    bounds = _int_bounds(schema)
    if bounds is None or not (bounds[0] <= product_id <= bounds[1]
                              and bounds[2] <= qty <= bounds[3]):
        return None
    return {"product_id": product_id, "qty": qty}


@functools.lru_cache(maxsize=16)
def _int_bounds(schema: Any) -> tuple[int, int, int, int] | None:
    """(product_id min, max, qty min, max) from the schema's Range validators; None when
    the schema asks for more than two bounded integers (a required customer_id, ...)."""
    found: list[int] = []
    for name in ("product_id", "qty"):
        ranges = schema.fields[name].validators
        if len(ranges) != 1 or type(ranges[0]) is not validate.Range:
            return None
        bound = ranges[0]
        if None in (bound.min, bound.max) or not (bound.min_inclusive and bound.max_inclusive):
            return None
        found += [bound.min, bound.max]
    if any(field.required for name, field in schema.fields.items()
           if name not in ("product_id", "qty")):
        return None
    return found[0], found[1], found[2], found[3]


async def get_hold(request: web.Request) -> web.Response:
    return await _view(request, "hold_id", "hold", "Hold", reads.hold_view)


# --- orders ---------------------------------------------------------------------------

async def create_order(request: web.Request) -> web.Response:
    customer = token_customer(request)
    key, prefer = idempotency_key(request), preference(request)
    body = schemas.load(schemas.OrderRequest(), await read_json(request))
    await rate_limit(request, customer)
    product_id = keys.parse_partition(body["hold_id"], "hold")
    if product_id is None:
        raise ProblemError(not_found("Hold", body["hold_id"]))
    args = {**body, "order_id": keys.order_id_for(body["hold_id"])}
    if customer is not None:  # the drainer answers another customer's hold 404
        args["customer_id"] = customer
    write = Write(product_id=product_id, op="order", resource="order_id", must_exist=True,
                  unknown=not_found("Hold", body["hold_id"]), args=args,
                  **keyed(idempotency_scope("orders", customer), key, body))
    return await queue_write(request, write, "/api/orders/{order_id}", prefer)


async def get_order(request: web.Request) -> web.Response:
    return await _view(request, "order_id", "ord", "Order", reads.order_view)


async def queue_write(request: web.Request, write: Write, location: str | None = None,
                      prefer: Preference | None = None) -> web.Response:
    """Submit a queued write and answer as the client's Prefer header asks."""
    prefer = prefer or preference(request)
    return respond(await submit(request.app, write, prefer.wait), prefer, location)


def keyed(scope: str, key: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """The Write fields of an Idempotency-Key: its scope and the request's fingerprint."""
    if key is None:
        return {}
    return {"idempotency": (scope, key), "fingerprint": fingerprint(scope, body)}


async def _view(request: web.Request, param: str, kind: str, what: str,
                reader: Any) -> web.Response:
    """GET one hold or order from the database; 404 unless the id is ours and exists
    (and, with customer tokens, is the caller's)."""
    customer = token_customer(request)
    ident = request.match_info[param]
    view = None
    if keys.parse_partition(ident, kind) is not None:
        view = await in_executor(request, reader, ident)
    if view is None or (customer is not None and view.get("customer_id") != customer):
        raise ProblemError(not_found(what, ident))
    return json_response(view)


# --- jobs -----------------------------------------------------------------------------

async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    if keys.parse_partition(job_id, "job") is None:
        raise ProblemError(not_found("Job", job_id))
    status, result = await job_status(request.app[REDIS], job_id)
    if status == "missing":
        result = await in_executor(request, reads.job_result, job_id)
        if result is None:
            raise ProblemError(not_found("Job", job_id))
        status = "done"
    if result is not None and "Authorization" in request.headers:
        # A job id is a capability, but with customer tokens a customer never sees
        # another's hold or order through it either.
        customer = token_customer(request)
        owner = result.get("body", {}).get("customer_id")
        if customer is not None and owner is not None and owner != customer:
            raise ProblemError(not_found("Job", job_id))
    body: dict[str, Any] = {"job_id": job_id, "status": status}
    if result is not None:
        body["result"] = result
    return json_response(body)


# --- payments -------------------------------------------------------------------------

async def payment_webhook(request: web.Request) -> web.Response:
    raw = await read_body(request)
    secret = request.app[SETTINGS].webhook_secret
    if secret is not None:
        verify_signature(secret, request.headers.get("X-Webhook-Signature", ""), raw)
    body = schemas.load(schemas.WebhookRequest(), parse_json(raw))
    product_id = keys.parse_partition(body["order_id"], "ord")
    if product_id is not None and await product_from_cache(request.app, product_id) is None:
        product_id = None  # no such product: kept with other unknown orders' webhooks
    same = fingerprint("webhook", {"order_id": body["order_id"], "status": body["status"]})
    write = Write(product_id=keys.CATALOG if product_id is None else product_id, op="webhook",
                  args={**body, "fingerprint": same},
                  idempotency=("webhook", body["idempotency_key"]), fingerprint=same)
    answer = await submit(request.app, write, request.app[SETTINGS].default_wait_seconds)
    if answer.result is None:  # stored in the queue; applied when its turn comes
        return json_response({"idempotency_key": body["idempotency_key"],
                              "order_id": body["order_id"], "outcome": "pending"}, 202)
    return _result_response(answer.result, {})


def verify_signature(secret: str, header: str, raw: bytes) -> None:
    """``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``; 401 if not valid.

    Anything but that shape (a huge or signed ``t``, a ``v1`` that is not 64 hex digits,
    bytes that are not ASCII) is simply not a valid signature.
    """
    timestamps, signatures = [], []
    for item in header.split(",")[:MAX_SIGNATURE_PARTS]:
        name, _, value = item.strip().partition("=")
        if name == "t" and _TIMESTAMP.fullmatch(value):
            timestamps.append(int(value))
        elif name == "v1" and _HEX_SHA256.fullmatch(value):
            signatures.append(value.lower())
    if not timestamps or not signatures:
        raise _unauthorized("Missing or malformed X-Webhook-Signature")
    timestamp = timestamps[0]
    if abs(time.time() - timestamp) > SIGNATURE_TOLERANCE_S:
        raise _unauthorized("The signature timestamp is too far from now")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw,
                        hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, v) for v in signatures):
        raise _unauthorized("The signature does not match the body")


def _unauthorized(detail: str, scheme: str | None = None) -> ProblemError:
    headers = {"WWW-Authenticate": scheme} if scheme else None
    return ProblemError(problem(401, detail=detail), headers)


# --- admin ----------------------------------------------------------------------------

def require_admin(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if token is None:
        raise ProblemError(problem(403, detail="Admin endpoints are disabled: ADMIN_TOKEN is "
                                               "not set"))
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() != "bearer" or not is_visible_ascii(credentials) or \
            not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        raise _unauthorized("A valid bearer token is required", 'Bearer realm="admin"')


async def create_product(request: web.Request) -> web.Response:
    require_admin(request)
    body = schemas.load(schemas.ProductRequest(), await read_json(request))
    prefer = preference(request)
    write = Write(product_id=keys.CATALOG, op="create_product", args=body)
    answer = await submit(request.app, write, prefer.wait)
    if answer.result is not None and answer.result["status"] == 201:  # no stale "missing"
        await cache_created(request.app, answer.result["body"])
    return respond(answer, prefer, "/api/products/{id}")


async def restock(request: web.Request) -> web.Response:
    require_admin(request)
    product_id = _positive_int(request.match_info["product_id"], "Product")
    body = schemas.load(schemas.RestockRequest(), await read_json(request))
    if await product_from_cache(request.app, product_id) is None:
        raise ProblemError(not_found("Product", product_id))
    write = Write(product_id=product_id, op="restock", must_exist=True,
                  args={**body, "product_id": product_id})
    return await queue_write(request, write)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/products/{product_id}", get_product)
    app.router.add_post("/api/holds", create_hold)
    app.router.add_get("/api/holds/{hold_id}", get_hold)
    app.router.add_post("/api/orders", create_order)
    app.router.add_get("/api/orders/{order_id}", get_order)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_post("/api/payments/webhook", payment_webhook)
    app.router.add_post("/api/admin/products", create_product)
    app.router.add_post("/api/admin/products/{product_id}/restock", restock)
