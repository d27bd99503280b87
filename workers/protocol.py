"""The per-product queue protocol: envelope format and the Lua scripts around it.

An envelope is ``"<job id> <json>"``: the id first so scripts can find the job key
without decoding JSON. A request's life, all keys in its product's slot:

    push    gateway:  admission check, RPUSH queue, job = "queued", set wake flag
    take    drainer:  (lease held) re-take the in-flight batch, else LPOP n -> inflight
    finish  drainer:  (after commit) store results, publish replies, drop inflight,
                      refresh the product cache and the admission counter, and take
                      the next batch (queue -> inflight) or release the lease
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from workers import keys

QUEUED, PROCESSING = "queued", "processing"

# The end of PUSH: the push that sets the wake flag wakes the product (PUSH_READY's differs).
_PUSH_WAKES = "if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[4]) then return {1} end\n"

# push: KEYS queue, product, wake, job
#       ARGV envelope, qty (0: no admission), job ttl s, wake ttl ms, flags,
#            answer when the product does not exist, answer when sold out (keyed only)
# flags: 'o' once: queued at most once per job id while its job key lives (a push that
#        the gateway sends again after a dropped connection, when the first one may have
#        run, queues and charges nothing more), 'k' keyed (an Idempotency-Key: once, and
#        an answer decided here is stored as the job's result, atomically with the
#        decision, so that a duplicate replays it), 'p' the product must exist,
#        'a' may add units (restock, failed payment, expiry): holds queued behind it are
#        not refused here, since it may make them possible.
# -> {0} queued | {1} queued and woken: make it ready (READY) | {2, available} sold out
#    {3} product not cached | {4} no such product | {5} this job id is queued already
PUSH = """
local flags = ARGV[5]
local keyed = string.find(flags, 'k', 1, true)
if (keyed or string.find(flags, 'o', 1, true)) and redis.call('EXISTS', KEYS[4]) == 1 then
  return {5}
end
local qty = tonumber(ARGV[2])
if qty > 0 or string.find(flags, 'p', 1, true) then
  local h = redis.call('HMGET', KEYS[2], 'available', 'queued', 'missing', 'adders')
  if h[3] then
    if keyed then redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[3]) end
    return {4}
  end
  if not h[1] then return {3} end
  if qty > 0 then
    local left = tonumber(h[1]) - tonumber(h[2] or '0')
    if left < qty and tonumber(h[4] or '0') <= 0 then
      if left < 0 then left = 0 end
      if keyed then
        redis.call('SET', KEYS[4], string.gsub(ARGV[7], '__AVAILABLE__', left), 'EX', ARGV[3])
      end
      return {2, left}
    end
    redis.call('HINCRBY', KEYS[2], 'queued', qty)
  end
end
if string.find(flags, 'a', 1, true) and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'adders', 1)
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], 'queued', 'EX', ARGV[3])
""" + _PUSH_WAKES + """return {0}
"""

# A batch just taken in flight (``items``; ARGV[4] the job key prefix): each job it holds,
# unless its key expired, is marked processing. Shared by TAKE and FINISH.
_MARK_PROCESSING = """
for _, item in ipairs(items) do
  local id = string.sub(item, 1, string.find(item, ' ', 1, true) - 1)
  redis.call('SET', ARGV[4] .. id, 'processing', 'XX', 'KEEPTTL')
end
"""

# take: KEYS queue, inflight, lease, wake, product
#       ARGV token, batch size, lease ms, job key prefix, '1' to take a free lease
# -> nil: the lease is someone else's (or lost) | {}: nothing left (lease and wake
#    released) | envelopes
TAKE = """
local holder = redis.call('GET', KEYS[3])
if holder ~= ARGV[1] then
  if holder or ARGV[5] ~= '1' then return false end
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
else
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
if #items == 0 then
  items = redis.call('LPOP', KEYS[1], ARGV[2])
  if not items then
    redis.call('DEL', KEYS[4], KEYS[3])
    if redis.call('EXISTS', KEYS[5]) == 1 then
      redis.call('HSET', KEYS[5], 'queued', 0, 'adders', 0)
    end
    return {}
  end
  redis.call('RPUSH', KEYS[2], unpack(items))
end
""" + _MARK_PROCESSING + """return items
"""

# finish: KEYS inflight, lease, product, queue, wake
#         ARGV token, lease ms, result ttl s, job key prefix, admitted units to release,
#              n product fields, n results, n replies, n keys to delete,
#              envelopes that may add units (see push), n to take, then the lists
# -> the next batch: up to n envelopes queued meanwhile, taken in flight under the renewed
#    lease as TAKE takes them, so that the drainer's next round needs no TAKE for this
#    product | 1: requests were queued meanwhile (n = 0: none taken), the lease is renewed
#    | 2: none were, and lease and wake are released as TAKE releases them (a push from
#    now on wakes a drainer), so the drainer needs no further TAKE to learn it | 0: the
#    lease was lost (the next drainer replays the committed batch)
FINISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local nfields, nresults = tonumber(ARGV[6]), tonumber(ARGV[7])
local nreplies, ndel = tonumber(ARGV[8]), tonumber(ARGV[9])
local i = 12 + 2 * nfields
for j = 1, nresults do
  redis.call('SET', ARGV[4] .. ARGV[i], ARGV[i + 1], 'EX', ARGV[3])
  i = i + 2
end
for j = 1, nreplies do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  i = i + 2
end
for j = 1, ndel do
  redis.call('DEL', ARGV[i])
  i = i + 1
end
local fields = {}
for j = 12, 11 + 2 * nfields do fields[#fields + 1] = ARGV[j] end
if redis.call('LLEN', KEYS[4]) == 0 then
  -- Released as TAKE releases: the product's fields and its counters at zero in one
  -- HSET, and no lease to renew.
  redis.call('DEL', KEYS[5], KEYS[2])
  if nfields > 0 or redis.call('EXISTS', KEYS[3]) == 1 then
    fields[#fields + 1] = 'queued'
    fields[#fields + 1] = 0
    fields[#fields + 1] = 'adders'
    fields[#fields + 1] = 0
    redis.call('HSET', KEYS[3], unpack(fields))
  end
  return 2
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if nfields > 0 then
  redis.call('HSET', KEYS[3], unpack(fields))
  local release, adders = tonumber(ARGV[5]), tonumber(ARGV[10])
  if release > 0 and redis.call('HINCRBY', KEYS[3], 'queued', 0 - release) < 0 then
    redis.call('HSET', KEYS[3], 'queued', 0)
  end
  if adders > 0 and redis.call('HINCRBY', KEYS[3], 'adders', 0 - adders) < 0 then
    redis.call('HSET', KEYS[3], 'adders', 0)
  end
end
local n = tonumber(ARGV[11])
if n > 0 then
  local items = redis.call('LPOP', KEYS[4], n)
  redis.call('RPUSH', KEYS[1], unpack(items))
""" + _MARK_PROCESSING + """  return items
end
return 1
"""

# fill: KEYS product, queue, inflight; ARGV field/value pairs. Sets the cache only when
# absent, so a gateway's database read never overwrites a newer value written by a
# drainer. Requests already queued may add units that the database does not show yet:
# then holds are not refused early until the drainer has been through them.
FILL = """
if redis.call('HEXISTS', KEYS[1], 'stock') == 1 then return 0 end
redis.call('HDEL', KEYS[1], 'missing')
redis.call('PERSIST', KEYS[1])  -- a "missing" marker's 5 s no longer apply
redis.call('HSET', KEYS[1], unpack(ARGV))
if redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) > 0 then
  redis.call('HSET', KEYS[1], 'adders', 1)
end
return 1
"""

# missing: KEYS product; ARGV ms. "No such product", for a while, unless a drainer or a
# fill has cached the product meanwhile (then nothing changes).
MISSING = """
if redis.call('HEXISTS', KEYS[1], 'stock') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'missing', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# release: KEYS lease; ARGV token. Compare-and-delete.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ready: KEYS ready list, rq's pending drain jobs, active drainers, rq's drain workers,
#             woken products
#        ARGV product id ('' to only check the list), heartbeat expiry ms
# Marks the product as waiting for a drainer, and counts the wake-up in the woken
# products (where the sweep looks for stalled ones). -> 1 when the caller must enqueue a
# drain job: none is waiting to start, and fewer drainers are at work than there are
# workers. Otherwise a drainer at work or a waiting job will take the product.
_READY_FUNCTION = """
local function ready(list, pending, drainers, workers, woken, pid, heartbeat)
  if pid ~= '' then
    redis.call('RPUSH', list, pid)
    redis.call('HINCRBY', woken, pid, 1)
  elseif redis.call('LLEN', list) == 0 then return 0 end
  if redis.call('LLEN', pending) > 0 then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local active = redis.call('ZCOUNT', drainers, now - tonumber(heartbeat), '+inf')
  if active < math.max(redis.call('SCARD', workers), 1) then return 1 end
  return 0
end
"""
READY = _READY_FUNCTION + """
return ready(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2])
"""

# push_ready: PUSH and READY in one script, where both planes are one Redis (no cluster,
# whose slots keep a product's keys and the ready list apart).
#   KEYS those of PUSH, then those of READY; ARGV those of PUSH, then product id, heartbeat
#   expiry ms
# -> as PUSH, except that a push that wakes the product makes it ready here, in the same
#    step: {1} queued, and the caller must enqueue a drain job (READY's 1) | {6} queued and
#    made ready: a drainer at work or a job waiting to start takes it. This saves the
#    gateway a script call for every wake-up (on 100 hot products, four holds in ten),
#    and no crash between the two can leave a woken product off the ready list.
PUSH_READY = _READY_FUNCTION + PUSH.replace(_PUSH_WAKES, """\
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[4]) then
  if ready(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[8], ARGV[9]) == 1 then
    return {1}
  end
  return {6}
end
""")
# forget: KEYS woken products; ARGV product id, count, product id, count, ...
# The sweep found these products idle after reading their counts: each is forgotten
# unless READY counted a wake-up since (its next push will count it again).
FORGET = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
"""

# retire: KEYS ready list, active drainers; ARGV drainer id.
# A drain job leaves only when nothing is ready, atomically with the check, so a product
# made ready at that moment either is seen here or sees one drainer fewer (READY).
RETIRE = """
if redis.call('LLEN', KEYS[1]) > 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Envelope:
    """One queued request. ``reply`` is the gateway channel waiting for the answer."""

    id: str
    op: str
    args: dict[str, Any]
    idem: tuple[str, str] | None = None
    reply: str | None = None

    def encode(self) -> bytes:
        body = {"op": self.op, "args": self.args}
        if self.idem:
            body["idem"] = list(self.idem)
        if self.reply:
            body["reply"] = self.reply
        return self.id.encode() + b" " + orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes | str) -> Envelope:
        data = raw.encode() if isinstance(raw, str) else raw
        job_id, _, payload = data.partition(b" ")
        body = orjson.loads(payload)
        idem = body.get("idem")
        return cls(id=job_id.decode(), op=body["op"], args=body["args"],
                   idem=(idem[0], idem[1]) if idem else None, reply=body.get("reply"))


# Flags of PUSH.
ONCE, KEYED, MUST_EXIST, ADDS_UNITS = "o", "k", "p", "a"


def adds_units(op: str, args: dict[str, Any]) -> bool:
    """Whether a request may make units available: holds queued behind it are not
    refused before it is applied (API.md: holds are granted in queue order)."""
    return op in ("restock", "expire", "retry_webhooks") or (
        op == "webhook" and args.get("status") == "failed")


def push_args(envelope: Envelope, qty: int, job_ttl: int, wake_ttl_ms: int, flags: str = "",
              missing: bytes = b"", sold_out: bytes = b"") -> list[Any]:
    """ARGV of PUSH. ``missing`` and ``sold_out`` are the stored answers of a keyed
    request decided at once; ``sold_out`` holds ``__AVAILABLE__`` for the count."""
    if adds_units(envelope.op, envelope.args):
        flags += ADDS_UNITS
    return [envelope.encode(), qty, job_ttl, wake_ttl_ms, flags, missing, sold_out]


def fill_keys(product_id: int) -> list[str]:
    return [keys.product(product_id), keys.queue(product_id), keys.inflight(product_id)]


def push_keys(product_id: int, job_id: str) -> list[str]:
    return [keys.queue(product_id), keys.product(product_id), keys.wake(product_id),
            keys.job(job_id)]


# A drainer names every product of every round twice (TAKE, FINISH): built once each.
@lru_cache(maxsize=16_384)
def take_keys(product_id: int) -> tuple[str, ...]:
    return (keys.queue(product_id), keys.inflight(product_id), keys.lease(product_id),
            keys.wake(product_id), keys.product(product_id))


@lru_cache(maxsize=16_384)
def finish_keys(product_id: int) -> tuple[str, ...]:
    return (keys.inflight(product_id), keys.lease(product_id), keys.product(product_id),
            keys.queue(product_id), keys.wake(product_id))


def finish_args(token: str, lease_ms: int, result_ttl: int, product_id: int, release: int,
                fields: dict[str, Any], results: dict[str, bytes],
                replies: dict[str, bytes], delete: list[str], adders: int = 0,
                take: int = 0) -> list[Any]:
    args: list[Any] = [token, lease_ms, result_ttl, keys.job_prefix(product_id), release,
                       len(fields), len(results), len(replies), len(delete), adders, take]
    for name, value in fields.items():
        args += [name, value]
    for job_id, result in results.items():
        args += [job_id, result]
    for channel, payload in replies.items():
        args += [channel, payload]
    args += delete
    return args


def product_fields(view: dict[str, Any]) -> dict[str, Any]:
    """The cache hash of a product view (``queued`` is the admission counter's own)."""
    return {"id": view["id"], "name": view["name"], "price_cents": view["price_cents"],
            "currency": view["currency"], "stock": view["stock"],
            "available": view["available"]}


def for_many(script: str) -> str:
    """``script`` run for several products in one call, on a single Redis (a cluster keeps
    one call per product: their keys are in different slots).

    KEYS: each product's keys in turn; ARGV[1]: the products' calls as one JSON array
    (``many_call``), each argument a string, bytes of UTF-8 text or an integer within
    2**53 - 1; the script sees each as the string redis-py would have sent, and anything
    else fails the call. Returns the replies of the products in order, each as the
    one-product script would have returned it."""
    body = script.replace("KEYS[", "K[").replace("ARGV[", "A[")
    if "KEYS" in body or "ARGV" in body:  # (#KEYS, unpack(ARGV): not rewritten here)
        raise ValueError("for_many rewrites only KEYS[n] and ARGV[n]")
    return ("local function one(K, A)\n" + body + "end\n"
            "local calls, out, k = cjson.decode(ARGV[1]), {}, 0\n"
            "for p = 1, #calls do\n"
            "  local nk, A, K = calls[p][1], calls[p][2], {}\n"
            "  for j = 1, nk do K[j] = KEYS[k + j] end\n"
            "  for j = 1, #A do\n"
            "    local v = A[j]\n"
            "    if type(v) ~= 'string' then\n"
            "      if type(v) ~= 'number' or v ~= math.floor(v) then\n"
            "        error('for_many: an argument is neither a string nor an integer')\n"
            "      end\n"
            "      A[j] = string.format('%d', v)\n"
            "    end\n"
            "  end\n"
            "  out[p] = one(K, A)\n"
            "  k = k + nk\n"
            "end\n"
            "return out\n")


def many_call(calls: list[tuple[Sequence[str], list[Any]]]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of a ``for_many`` script for these (keys, args) calls: the keys in
    turn, and the arguments as one JSON document. Serialized in one step (orjson), a
    round's thousand arguments cost the drainer a fraction of what redis-py's packing of
    each one costs; an integer beyond 2**53 - 1, which Lua could not hold exactly, raises."""
    call_keys: list[str] = []
    for one_keys, _ in calls:
        call_keys += one_keys
    return call_keys, [orjson.dumps([(len(one_keys), one_args) for one_keys, one_args in calls],
                                    default=_utf8_text, option=orjson.OPT_STRICT_INTEGER)]


def _utf8_text(value: Any) -> str:
    """orjson's hook for what it does not serialize itself: bytes (of UTF-8 text)."""
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"{type(value).__name__} is not an argument of a script")
