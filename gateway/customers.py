"""Who the customer is (a bearer JWT, or the shop's word in the body) and how fast a client
may write (a moving one-minute window shared by all gateways). API.md, "Customers and
fairness".
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web

from flashsale.limits import CUSTOMER_ID_PATTERN, is_visible_ascii
from flashsale.problems import problem
from gateway.errors import ProblemError
from gateway.typedefs import CONTROL, METRICS, SCRIPTS, SETTINGS
from workers import keys

CUSTOMER_ID = re.compile(CUSTOMER_ID_PATTERN.strip("^$"), re.ASCII)
MAX_TOKEN_LENGTH = 4096
REALM = 'Bearer realm="customers"'
WINDOW_MS = 60_000
POLICY_NAME = "minute"
RATE_HEADERS = "flashsale.rate_headers"  # request key of the RateLimit headers
REFUSED_TTL_S = 3600

# moving window: KEYS the client's window; ARGV window ms, limit, a unique member.
# -> {1, used, ms until the oldest entry leaves} when admitted (and counted),
#    {0, used, ms until a slot frees} when the client is over its limit.
RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
local admitted = 0
if used < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  used, admitted = used + 1, 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {admitted, used, tonumber(oldest[2]) + window - now}
"""


def _unauthorized(detail: str, error: bool = True) -> ProblemError:
    challenge = REALM + (', error="invalid_token"' if error else "")
    return ProblemError(problem(401, detail=detail), {"WWW-Authenticate": challenge})


def token_customer(request: web.Request) -> str | None:
    """The customer of the request's bearer JWT; None when tokens are not in use.

    With CUSTOMER_JWT_SECRET set, a missing, malformed, badly signed or expired token, or
    one without ``exp`` or a usable ``sub``, is a 401 with ``WWW-Authenticate: Bearer``.
    """
    secret = request.app[SETTINGS].customer_jwt_secret
    if secret is None:
        return None
    given = request.headers.get("Authorization")
    if given is None:
        raise _unauthorized("A customer bearer token is required", error=False)
    scheme, _, token = given.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH \
            or not is_visible_ascii(token):
        raise _unauthorized("Authorization must be 'Bearer <token>'")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"],
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise _unauthorized("The token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise _unauthorized(f"The token is not valid: {exc}") from None
    subject = claims["sub"]
    if not isinstance(subject, str) or CUSTOMER_ID.fullmatch(subject) is None:
        raise _unauthorized("The token's sub must be 1 to 64 visible ASCII characters")
    return subject


def idempotency_scope(endpoint: str, customer: str | None) -> str:
    """Keys are scoped per customer: the same key from two customers is two requests.
    The customer is digested, so that the longest customer id and the longest key still
    fit the record's id column (300 characters)."""
    if customer is None:
        return endpoint
    return f"{endpoint}:c{hashlib.sha256(customer.encode()).hexdigest()[:32]}"


@dataclass(frozen=True)
class RateDecision:
    admitted: bool
    limit: int
    used: int
    reset_ms: int

    def headers(self) -> dict[str, str]:
        """draft-ietf-httpapi-ratelimit-headers: the policy and what is left of it."""
        seconds = max(math.ceil(self.reset_ms / 1000), 0)
        return {"RateLimit-Policy": f'"{POLICY_NAME}";q={self.limit};w={WINDOW_MS // 1000}',
                "RateLimit": f'"{POLICY_NAME}";r={max(self.limit - self.used, 0)};t={seconds}'}


def client_of(request: web.Request, customer: str | None) -> str:
    """Whom the rate limit counts: the customer, else the remote address."""
    return f"c:{customer}" if customer is not None else f"ip:{request.remote or '-'}"


def window_key(client: str) -> str:
    # Hashed: a customer id may hold any visible character, braces included.
    digest = hashlib.sha256(client.encode()).hexdigest()[:24]
    return f"{keys.PREFIX}:{{rl:{digest}}}:window"


def refused_key(minute: int) -> str:
    return f"{keys.PREFIX}:ratelimited:{minute}"


async def rate_limit(request: web.Request, customer: str | None) -> None:
    """Count this write against its client's minute; 429 (nothing queued) when over.

    The RateLimit headers are put on the response whatever it turns out to be.
    """
    limit = request.app[SETTINGS].rate_limit_per_minute
    if limit is None:
        return
    client = client_of(request, customer)
    admitted, used, reset_ms = await request.app[SCRIPTS].pipe.evalsha(
        RATE, [window_key(client)], [WINDOW_MS, limit, secrets.token_hex(8)])
    decision = RateDecision(bool(admitted), limit, int(used), int(reset_ms))
    headers = decision.headers()
    request[RATE_HEADERS] = headers
    if decision.admitted:
        return
    request.app[METRICS].rate_limited.inc()
    await _remember_refusal(request, client)
    retry_after = str(max(math.ceil(decision.reset_ms / 1000), 1))
    raise ProblemError(problem(429, "Too Many Requests",
                               f"At most {limit} holds and orders a minute; retry in "
                               f"{retry_after} s", slug="rate-limited"),
                       {"Retry-After": retry_after, **headers})


async def _remember_refusal(request: web.Request, client: str) -> None:
    """For ``flashsale rate-limited``: refusals per client and minute, kept an hour."""
    key = refused_key(int(time.time() // 60))
    async with request.app[CONTROL].pipeline(transaction=False) as pipe:
        pipe.zincrby(key, 1, client)
        pipe.expire(key, REFUSED_TTL_S)
        await pipe.execute()


async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: RateLimit headers on every answer to a limited write."""
    headers: Any = request.get(RATE_HEADERS)
    if headers:
        for name, value in headers.items():
            response.headers.setdefault(name, value)
