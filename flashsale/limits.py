"""The documented bounds of every value the service accepts, and the checks of them.

Each bound is chosen so that every value derived from accepted input fits its database
column and stays an exact integer for JSON clients (at most 2**53 - 1): an amount is
``qty * price_cents`` <= MAX_QTY_PER_HOLD_LIMIT * MAX_PRICE_CENTS = 10**15.
Ids are checked here before they reach Redis or the database: a request naming an id the
service cannot have issued is answered 404 (path) or 422 (body) at the door.
"""

from __future__ import annotations

import re

# products.id is a signed 32-bit AUTO_INCREMENT column.
MAX_PRODUCT_ID = 2**31 - 1
MAX_PRICE_CENTS = 10**9
MAX_STOCK = 10**9
MAX_QTY_PER_HOLD_LIMIT = 10**6  # the largest MAX_QTY_PER_HOLD a deployment may set
MAX_NAME_LENGTH = 200
MAX_KEY_LENGTH = 255  # Idempotency-Key, webhook idempotency_key and order_id

# Ids the service issues: "<kind>_<product id>_<16 hex digits>", the product id in ASCII
# digits without leading zeros (job ids of the catalog partition use 0).
PRODUCT_ID_PATTERN = r"^[1-9][0-9]{0,9}$"
CUSTOMER_ID_PATTERN = r"^[\x21-\x7e]{1,64}$"  # a customer id: 1-64 visible ASCII characters
ID_PATTERN = r"^(?:hold|ord|job)_(?:0|[1-9][0-9]{0,9})_[0-9a-f]{16}$"  # any kind
ID_MAX_LENGTH = 32


def id_pattern(kind: str) -> str:
    """The pattern (ECMA and Python alike) of the ids of ``kind`` the service issues."""
    partition = "(?:0|[1-9][0-9]{0,9})" if kind == "job" else "[1-9][0-9]{0,9}"
    return f"^{kind}_{partition}_[0-9a-f]{{16}}$"


_ID = re.compile(r"(hold|ord|job)_(0|[1-9][0-9]{0,9})_[0-9a-f]{16}", re.ASCII)  # any kind
_PRODUCT_ID = re.compile(PRODUCT_ID_PATTERN.strip("^$"), re.ASCII)
# Printable ASCII, space included (RFC 9110 field values without obs-text).
_VISIBLE = re.compile(r"[\x20-\x7e]*", re.ASCII)


def parse_id(value: str, kind: str) -> int | None:
    """The product id inside an id of ``kind`` that the service could have issued."""
    match = _ID.fullmatch(value)
    if match is None or match.group(1) != kind:
        return None
    product_id = int(match.group(2))
    if product_id > MAX_PRODUCT_ID or (product_id == 0 and kind != "job"):
        return None
    return product_id


def parse_product_id(raw: str) -> int | None:
    """A product id from a path segment: ASCII digits, 1 to MAX_PRODUCT_ID."""
    if _PRODUCT_ID.fullmatch(raw) is None:
        return None
    value = int(raw)
    return value if value <= MAX_PRODUCT_ID else None


def is_visible_ascii(value: str) -> bool:
    """True when ``value`` holds only printable ASCII (space to tilde)."""
    return _VISIBLE.fullmatch(value) is not None
