"""RFC 9457 problem documents, shared by the gateway and the workers."""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://flashsale.dev/problems/"

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(status: int, title: str | None = None, detail: str = "", slug: str | None = None,
            **extra: Any) -> dict[str, Any]:
    """A problem document; ``slug`` names its type under PROBLEM_BASE."""
    title = title or TITLES.get(status, "Error")
    slug = slug or title.lower().replace(" ", "-").replace("'", "")
    doc: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status,
                           "detail": detail or title}
    doc.update(extra)
    return doc


INSUFFICIENT_STOCK = "Insufficient stock"
HOLD_EXPIRED = "Hold has expired"
CUSTOMER_LIMIT = "Customer limit reached"
STOCK_LIMIT = "Stock limit reached"
IDEMPOTENCY_REUSED = "Idempotency-Key reused with a different request"


def insufficient_stock(available: int, qty: int) -> dict[str, Any]:
    return problem(409, INSUFFICIENT_STOCK,
                   f"{qty} unit(s) requested, {available} available", available=available)


def customer_limit(limit: int, held: int, qty: int) -> dict[str, Any]:
    return problem(409, CUSTOMER_LIMIT,
                   f"{qty} unit(s) requested; this customer has {held} of at most {limit}",
                   slug="customer-limit", limit=limit, held=held)


def not_found(what: str, ident: object) -> dict[str, Any]:
    # ascii(): an id from a hostile path can hold anything, lone surrogates included.
    shown = ascii(ident if not isinstance(ident, str) or len(ident) <= 80 else ident[:80] + "...")
    return problem(404, f"{what} not found", f"No {what.lower()} with id {shown}",
                   slug="not-found")


def idempotency_reused(detail: str = "") -> dict[str, Any]:
    return problem(422, IDEMPOTENCY_REUSED,
                   detail or "This key was first used with a different request body",
                   slug="idempotency-key-reused")
