"""The HTTP client of the benchmark: one aiohttp session, requests spread over gateways.

A hold answered 202 is followed through ``/api/jobs/{id}`` until it is done, so the
outcome and latency of a hold are those of its final result, whichever way it came.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp
import orjson

JSON_HEADERS = {"Content-Type": "application/json"}
POLL_FIRST_S = 0.05  # first job poll after a 202; doubles up to POLL_MAX_S
POLL_MAX_S = 0.5
CREATE_ATTEMPTS = 5  # a product creation turned away with Retry-After is sent again
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class Kind(StrEnum):
    """What became of one request."""

    OK = "ok"  # 201 hold / 200 read
    REFUSED = "refused"  # 409
    SERVER_ERROR = "server_error"  # 5xx (but a shed 503)
    SHED = "shed"  # 503 with Retry-After: turned away before being queued; retried after
    TRANSPORT = "transport"  # connection error or timeout
    OTHER = "other"  # any other status


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    status: int  # 0 for a transport error
    latency_s: float
    body: Any = None
    accepted: bool = False  # answered 202 first, then followed to its result
    error: str = ""
    retry_after_s: float = 0.0  # of a shed request: how long the client waits to retry


@dataclass
class Target:
    """A deployment under test: its gateways (used in turn) and, if started here, its pids."""

    name: str
    urls: list[str]
    admin_token: str | None = None
    gateway_pids: list[int] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    _next: int = 0

    def base(self) -> str:
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        return url


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delay form), or None when absent or not a number."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value)


def classify(status: int, retry_after_s: float | None = None) -> Kind:
    if status == 503 and retry_after_s is not None:
        return Kind.SHED
    if status in (200, 201):
        return Kind.OK
    if status == 409:
        return Kind.REFUSED
    if status >= 500:
        return Kind.SERVER_ERROR
    return Kind.OTHER


def new_session(request_timeout_s: float) -> aiohttp.ClientSession:
    """One session for the whole run: unlimited pooled connections, no cookie handling."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None,
                                     force_close=False, enable_cleanup_closed=False)
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=request_timeout_s),
                                 cookie_jar=aiohttp.DummyCookieJar(),
                                 json_serialize=lambda o: orjson.dumps(o).decode(),
                                 skip_auto_headers=("User-Agent",))


class Http:
    """The requests the scenarios make, against one target."""

    def __init__(self, session: aiohttp.ClientSession, target: Target,
                 request_timeout_s: float, gateway: int | None = None) -> None:
        self.session = session
        self.target = target
        self.request_timeout_s = request_timeout_s
        self.gateway = gateway  # None: the target's gateways in turn

    def pinned(self, client: int) -> Http:
        """The same target as client number ``client`` sees it: always the same gateway
        (client modulo gateways), as a client behind a TCP load balancer keeps its
        connection to one. Alternating per request gave every client a connection to
        every gateway, twice the connections a real crowd opens."""
        return Http(self.session, self.target, self.request_timeout_s,
                    client % len(self.target.urls))

    def base(self) -> str:
        if self.gateway is None:
            return self.target.base()
        return self.target.urls[self.gateway]

    async def create_product(self, stock: int, label: str) -> int:
        """A fresh product with ``stock`` units, through the admin API; returns its id."""
        name = f"bench-{label}-{secrets.token_hex(4)}"
        body = {"name": name, "price_cents": 1000, "currency": "USD", "stock": stock}
        headers = {"Authorization": f"Bearer {self.target.admin_token or ''}",
                   "Prefer": "wait=30", **JSON_HEADERS}
        url = self.base() + "/api/admin/products"
        for _ in range(CREATE_ATTEMPTS):
            async with self.session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                wait = retry_after(resp.headers.get("Retry-After")) if status == 503 else None
            if wait is None:
                break
            # Turned away (503, Retry-After): the gateway is still answering the end of the
            # last scenario's crowd (wrk leaves its last requests in flight). Retry after it.
            await asyncio.sleep(wait)
        doc = orjson.loads(raw) if raw else None
        if status == 202 and isinstance(doc, dict):
            status, doc = await self._follow(doc["job_id"], time.monotonic() + 30)
        if status != 201 or not isinstance(doc, dict):
            raise RuntimeError(f"creating a product on {self.target.name} answered {status}: "
                               f"{raw[:300]!r}")
        return int(doc["id"])

    async def product(self, product_id: int) -> dict[str, Any]:
        url = f"{self.base()}/api/products/{product_id}"
        async with self.session.get(url) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {url} answered {resp.status}: {raw[:300]!r}")
        doc: dict[str, Any] = orjson.loads(raw)
        return doc

    async def hold(self, body: bytes) -> Outcome:
        """POST one hold (``body`` is the encoded JSON); a 202 is followed to its result."""
        start = time.perf_counter()
        url = self.base() + "/api/holds"
        try:
            async with self.session.post(url, data=body, headers=JSON_HEADERS) as resp:
                status = resp.status
                raw = await resp.read()
                wait = retry_after(resp.headers.get("Retry-After")) if status == 503 else None
            if wait is not None:
                return Outcome(Kind.SHED, status, time.perf_counter() - start,
                               retry_after_s=wait)
            doc = orjson.loads(raw) if raw else None
            accepted = status == 202
            if accepted and isinstance(doc, dict):
                deadline = time.monotonic() + self.request_timeout_s
                status, doc = await self._follow(doc["job_id"], deadline)
        except TRANSPORT_ERRORS as exc:
            return Outcome(Kind.TRANSPORT, 0, time.perf_counter() - start,
                           error=type(exc).__name__)
        except orjson.JSONDecodeError:
            return Outcome(Kind.OTHER, status, time.perf_counter() - start,
                           error="invalid JSON")
        return Outcome(classify(status), status, time.perf_counter() - start, doc, accepted)

    async def read(self, path: str) -> Outcome:
        """GET ``path``; the body is read but not parsed (the read scenario only times it)."""
        start = time.perf_counter()
        try:
            async with self.session.get(self.base() + path) as resp:
                status = resp.status
                await resp.read()
        except TRANSPORT_ERRORS as exc:
            return Outcome(Kind.TRANSPORT, 0, time.perf_counter() - start,
                           error=type(exc).__name__)
        return Outcome(classify(status), status, time.perf_counter() - start)

    async def _follow(self, job_id: str, deadline: float) -> tuple[int, Any]:
        """Poll a job until it is done; its result's (status, body). Bounded by ``deadline``."""
        delay = POLL_FIRST_S
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
            async with self.session.get(f"{self.base()}/api/jobs/{job_id}") as resp:
                raw = await resp.read()
                if resp.status != 200:
                    return resp.status, orjson.loads(raw) if raw else None
            doc = orjson.loads(raw)
            if doc.get("status") == "done":
                result = doc.get("result") or {}
                return int(result.get("status", 0)), result.get("body")
        raise TimeoutError(f"job {job_id} not done in time")
