"""The OpenAPI 3 document, generated from the marshmallow schemas (apispec)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    spec = APISpec(title="Flash-sale checkout", version="0.1.0", openapi_version="3.1.0",
                   plugins=[MarshmallowPlugin()])
    spec.path(path="/api/holds", operations={"post": {"summary": "Reserve units"}})
    return spec.to_dict()
