"""Hostile traffic against the Procfile processes: no request can hurt another.

API.md invariants 5 and 6: bad input gets a 4xx problem and changes nothing, even sent
byte for byte and at the same time as good traffic; a request the writer cannot apply is
answered alone while its product's queue moves on; one Idempotency-Key gets one answer;
unauthenticated traffic leaves no Redis key without a lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pymysql
import pytest
import redis

from tests import services
from tests.e2e.harness import Api, ServiceFactory, ServiceInstance, assert_problem

pytestmark = pytest.mark.e2e

SETTLE_SECONDS = 10.0  # a poisoned product's later requests are answered within this


@pytest.fixture(scope="module")
def hostile_service(service_factory: ServiceFactory) -> Iterator[ServiceInstance]:
    """An instance of its own: tests here add database triggers and pause its workers."""
    instance = service_factory.get("hostile", HOLD_TTL_SECONDS="2",
                                   ORDER_PAYMENT_TTL_SECONDS="3")
    yield instance
    service_factory.discard(instance)


@pytest.fixture
def hapi(http: aiohttp.ClientSession, hostile_service: ServiceInstance) -> Api:
    return Api(http, hostile_service)


def mysql(instance: ServiceInstance) -> pymysql.connections.Connection:
    return pymysql.connect(**services.mysql_connect_kwargs(instance.env["DATABASE_URL"]))


def sql(instance: ServiceInstance, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    connection = mysql(instance)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, args or None)
            return list(cursor.fetchall())
    finally:
        connection.close()


def redis_of(instance: ServiceInstance) -> redis.Redis:
    return instance.data_redis()


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, bytes as given) over a plain socket."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        length = f"Content-Length: {len(body)}\r\n".encode() if body else b""
        writer.write(head + length + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest


# --- bytes that are not ASCII, sent alongside good traffic ------------------------------

BAD_HEADERS = [
    b"Idempotency-Key: \xff\xfe\xfd",
    b"Idempotency-Key: caf\xc3\xa9",
    b'Idempotency-Key: "\x01"',
    b"Idempotency-Key: a\x7fb",  # control bytes: refused by aiohttp's parser itself
    b"Idempotency-Key: a\x00b",
    b"X-Anything: \x1b[31m",
    b"Authorization: Bearer \xc3\xa9\xff",
    b"Prefer: wait=\xd9\xa3",  # an Arabic-Indic three
    b"Prefer: wait=nan",
    b"Prefer: wait=1e999, respond-async",
    b"X-Webhook-Signature: t=" + b"9" * 5000 + b",v1=" + b"ab" * 32,
    b"X-Webhook-Signature: t=1,v1=\xff\xfe",
    b"X-Webhook-Signature: t=-1,v1=" + b"zz" * 32,
]


async def test_bad_header_bytes_fail_alone_beside_good_traffic(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    pid = (await hapi.create_product(stock=1000))["id"]
    body = json.dumps({"product_id": pid, "qty": 1}).encode()
    paths = [b"/api/holds", b"/api/admin/products", b"/api/payments/webhook"]

    async def bad(n: int) -> tuple[bytes, int]:
        header = BAD_HEADERS[n % len(BAD_HEADERS)]
        path = paths[n % len(paths)]
        head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n" + header + b"\r\n")
        url = hostile_service.web_urls[n % 2]
        status, rest = await raw_request(url, head, body)
        if status >= 400:  # API.md invariant 5: a problem document, whoever refused it
            assert b"\r\ncontent-type: application/problem+json" in b"\r\n" + rest.lower(), (
                header, rest[:300])
        return header, status

    async def good(n: int) -> int:
        return (await hapi.get(f"/api/products/{pid}", gateway=n)).status

    results = await asyncio.gather(*[bad(n) for n in range(120)], *[good(n) for n in range(200)])
    answers, goods = results[:120], results[120:]

    assert all(status == 200 for status in goods), goods
    server_errors = [(h[:60], s) for h, s in answers if isinstance(s, int) and s >= 500]
    assert not server_errors, server_errors
    assert all(isinstance(s, int) and 200 <= s < 500 for _, s in answers), answers
    # Only the requests with a usable header (odd Prefer values are ignored) took stock.
    product = await hapi.wait_product(pid, timeout=SETTLE_SECONDS, stock=1000)
    assert product["available"] >= 1000 - 120


async def test_a_request_the_http_parser_refuses_gets_a_problem_document(
    hostile_service: ServiceInstance
) -> None:
    # Refused by aiohttp's parser before the application sees it (gateway/server.py).
    for head in (b"GET /api/prod\x01ucts/1 HTTP/1.1\r\nHost: x\r\n",
                 b"GET /api/products/1 HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n",
                 b"GET /api/products/1 HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n",
                 b"G\x00T /api/products/1 HTTP/1.1\r\nHost: x\r\n"):
        status, rest = await raw_request(hostile_service.web_urls[0], head)
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status == 400, (head, rest[:300])
        assert b"content-type: application/problem+json" in headers.lower(), (head, headers)
        doc = json.loads(body)
        assert doc["status"] == 400 and doc["type"] and doc["title"] and doc["detail"], doc


async def test_a_crowd_sending_byte_by_byte_holds_up_nobody(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    # 400 connections send their requests a byte at a time, so each gateway has far more
    # reads per turn of its event loop than it parses (gateway/server.py, ReadGate); many
    # reads wait their turn as partial requests. Good traffic beside them is answered,
    # and so is every dribbled request, once whole.
    pid = (await hapi.create_product(stock=1000))["id"]
    request = f"GET /api/products/{pid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def dribble(n: int) -> int:
        host, port = hostile_service.web_urls[n % 2].removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for byte in request.encode():
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.002)
            response = await asyncio.wait_for(reader.read(), 60)
        finally:
            writer.close()
        return int(response.split(b" ", 2)[1])

    async def hold(n: int) -> int:
        return (await hapi.post("/api/holds", {"product_id": pid, "qty": 1},
                                gateway=n)).status

    async def read(n: int) -> int:
        return (await hapi.get(f"/api/products/{pid}", gateway=n)).status

    results = await asyncio.gather(*[dribble(n) for n in range(400)],
                                   *[hold(n) for n in range(100)],
                                   *[read(n) for n in range(100)])
    dribbled, holds, reads = results[:400], results[400:500], results[500:]

    assert holds == [201] * 100 and reads == [200] * 100
    assert dribbled == [200] * 400
    product = await hapi.wait_product(pid, timeout=SETTLE_SECONDS, stock=1000)
    assert product["available"] == 900


async def test_bad_key_in_an_idempotent_request_is_400(hapi: Api) -> None:
    pid = (await hapi.create_product(stock=5))["id"]
    for key in (" ", "\"\"", "k" * 256):
        reply = await hapi.hold(pid, 1, key=key)
        assert_problem(reply, 400, "Invalid Idempotency-Key")
    assert (await hapi.product(pid))["available"] == 5


# --- ids the service cannot have issued -------------------------------------------------

FOREIGN_PRODUCT_PATHS = [
    "%EF%BC%91",  # fullwidth one
    "%D9%A1",  # Arabic-Indic one
    "1" * 5000,
    str(2**31),
    str(2**63),
    "01",
    "-1",
    "1.0",
    "%00",
    "%FF",
]
FOREIGN_IDS = [
    "hold_%EF%BC%91_0123456789abcdef",
    "hold_" + "9" * 5000 + "_0123456789abcdef",
    f"hold_{2**31}_0123456789abcdef",
    f"hold_{2**63}_0123456789abcdef",
    "hold_01_0123456789abcdef",
    "hold_1_0123456789ABCDEF",
    "hold_0_0123456789abcdef",
    "%FF%FE",
]


async def test_ids_nobody_can_have_are_404_and_leave_no_key_behind(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    conn = redis_of(hostile_service)
    mine = hostile_service.key("fs:*")

    def lasting() -> set[bytes]:
        return {k for k in conn.scan_iter(match=mine, count=1000) if conn.ttl(k) == -1}

    before = lasting()
    pid = (await hapi.create_product(stock=5))["id"]
    requests = []
    for raw in FOREIGN_PRODUCT_PATHS:
        requests.append(hapi.get(f"/api/products/{raw}"))
        requests.append(hapi.post(f"/api/admin/products/{raw}/restock", {"qty": 1},
                                  headers=hapi.admin_headers()))
    for ident in FOREIGN_IDS:
        requests.append(hapi.get(f"/api/holds/{ident}"))
        requests.append(hapi.get(f"/api/orders/{ident.replace('hold', 'ord')}"))
        requests.append(hapi.get(f"/api/jobs/{ident.replace('hold', 'job')}"))
    bodies = [f"hold_{2**31}_0123456789abcdef", f"hold_{2**40}_0123456789abcdef",
              "hold_\u0661_0123456789abcdef", "hold_" + "9" * 200 + "_0123456789abcdef",
              "hold_987654321_0123456789abcdef"]
    for _ in range(20):  # many unauthenticated orders for ids out of range
        requests.extend(hapi.order(b, prefer="respond-async") for b in bodies)
    replies = await asyncio.gather(*requests)

    assert not [r for r in replies if r.status >= 500], [r for r in replies if r.status >= 500]
    for reply in replies:
        assert_problem(reply, 404)
    assert (await hapi.product(pid))["available"] == 5
    grown = sorted(k.decode(errors="replace") for k in lasting() - before)
    # What may live without a TTL is the service's own: a real product's cache (the new
    # one's, or an earlier test's that the sweep or a read wrote again meanwhile) and the
    # set of woken products, whose members are real products too.
    woken = hostile_service.key("fs:woken")
    caches = {k: re.fullmatch(re.escape(hostile_service.key("fs:{p:")) + r"(\d+)\}:product", k)
              for k in grown if k != woken}
    assert all(caches.values()), grown
    named = {int(m.group(1)) for m in caches.values() if m}
    named |= {int(f) for f in conn.hkeys(woken)} if woken in grown else set()
    for product_id in named:
        assert (await hapi.get(f"/api/products/{product_id}")).status == 200, (product_id, grown)


async def test_numbers_beyond_the_bounds_are_422(hapi: Api) -> None:
    pid = (await hapi.create_product(stock=5))["id"]
    huge = "9" * 5000
    for raw in (f'{{"product_id": {huge}, "qty": 1}}', f'{{"product_id": {pid}, "qty": {huge}}}',
                f'{{"product_id": {pid}, "qty": 1e400}}', f'{{"product_id": {pid}, "qty": NaN}}',
                f'{{"product_id": {pid}, "qty": 1.5}}', f'{{"product_id": {2**31}, "qty": 1}}'):
        reply = await hapi.request("POST", "/api/holds", data=raw,
                                   headers={"Content-Type": "application/json"})
        assert reply.status in (400, 422), (raw[:50], reply)
    for product in ({"price_cents": 10**9 + 1}, {"stock": 10**9 + 1}, {"currency": "USD\n"},
                    {"price_cents": 2**63 - 1}):
        body = {"name": "x", "price_cents": 1, "currency": "USD", "stock": 1, **product}
        reply = await hapi.post("/api/admin/products", body, headers=hapi.admin_headers())
        assert_problem(reply, 422)
    assert (await hapi.product(pid))["available"] == 5


# --- a request the writer cannot apply --------------------------------------------------

POISON_QTY = 7


@contextlib.asynccontextmanager
async def poison_trigger(instance: ServiceInstance, name: str) -> AsyncIterator[None]:
    """Every hold of POISON_QTY units makes the database raise, as a bug or a corrupt
    row would."""
    sql(instance, f"CREATE TRIGGER {name} BEFORE INSERT ON holds FOR EACH ROW "
                  f"IF NEW.qty = {POISON_QTY} THEN "
                  f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poison for the test'; END IF")
    try:
        yield
    finally:
        sql(instance, f"DROP TRIGGER IF EXISTS {name}")


async def test_a_poison_request_fails_alone_and_the_queue_moves_on(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    pid = (await hapi.create_product(stock=200))["id"]
    async with poison_trigger(hostile_service, f"poison_{uuid.uuid4().hex[:8]}"):
        started = time.monotonic()
        qtys = [1, 2, POISON_QTY, 1, 3, POISON_QTY, 2, 1] * 5
        replies = await asyncio.gather(*[hapi.hold(pid, q, prefer="wait=20") for q in qtys])
        elapsed = time.monotonic() - started

    assert elapsed < SETTLE_SECONDS + 10, elapsed
    for qty, reply in zip(qtys, replies, strict=True):
        if qty == POISON_QTY:
            assert_problem(reply, 500)
        else:
            assert reply.status == 201, reply
    granted = sum(q for q in qtys if q != POISON_QTY)
    await hapi.wait_product(pid, timeout=SETTLE_SECONDS, available=200 - granted)
    # After the poison, the product takes new requests at once.
    assert (await hapi.hold(pid, 1, prefer="wait=10")).status == 201

    listing = hostile_service.run_command("flashsale dead-letters --limit 200")
    assert listing.returncode == 0, listing.stderr
    dead = [line for line in listing.stdout.splitlines() if f" {pid} " in line]
    assert len(dead) == qtys.count(POISON_QTY), listing.stdout


async def test_a_replayed_dead_letter_is_applied_once_its_cause_is_gone(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    pid = (await hapi.create_product(stock=20))["id"]
    async with poison_trigger(hostile_service, f"poison_{uuid.uuid4().hex[:8]}"):
        first = await hapi.hold(pid, POISON_QTY, prefer="respond-async")
        job = await hapi.wait_job(first.body["job_id"])
        assert job["result"]["status"] == 500, job
    rows = sql(hostile_service, "SELECT id FROM dead_letters WHERE request_id = %s",
               first.body["job_id"])
    assert len(rows) == 1, rows

    replay = hostile_service.run_command(f"flashsale dead-letters --replay {rows[0][0]}")
    assert replay.returncode == 0, replay.stderr
    deadline = time.monotonic() + 3 * SETTLE_SECONDS  # a busy two-core machine
    while (job := (await hapi.get(f"/api/jobs/{first.body['job_id']}")).body)["status"] \
            != "done" or job["result"]["status"] == 500:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)
    assert job["result"]["status"] == 201, job
    await hapi.wait_product(pid, available=20 - POISON_QTY)
    again = hostile_service.run_command(f"flashsale dead-letters --replay {rows[0][0]}")
    assert again.returncode != 0  # replayed once only


# --- one key, one answer ---------------------------------------------------------------

@pytest.mark.parametrize("stock", [2, 0])
async def test_concurrent_duplicates_of_one_key_get_one_answer(hapi: Api, stock: int) -> None:
    pid = (await hapi.create_product(stock=max(stock, 1)))["id"]
    if stock == 0:  # sold out: every duplicate must get the same 409
        await hapi.new_hold(pid, 1)
    key = f"dup-{uuid.uuid4().hex}"
    body = {"product_id": pid, "qty": 2 if stock else 1}
    replies = await asyncio.gather(*[hapi.post("/api/holds", body, key=key, gateway=n)
                                     for n in range(20)])

    settled = [await hapi.settle(r) for r in replies]
    answers = {(r.status, json.dumps(r.body, sort_keys=True)) for r in settled}
    assert len(answers) == 1, answers
    status = settled[0].status
    assert status == (201 if stock else 409), settled[0]
    await hapi.wait_product(pid, available=0)


# --- order is order --------------------------------------------------------------------

async def test_a_queued_restock_is_seen_by_the_holds_behind_it(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    pid = (await hapi.create_product(stock=2))["id"]
    assert (await hapi.hold(pid, 2)).status == 201
    assert_problem(await hapi.hold(pid, 2), 409, "Insufficient stock")
    with hostile_service.paused("worker"):
        restock = await hapi.post(f"/api/admin/products/{pid}/restock", {"qty": 5},
                                  prefer="respond-async", headers=hapi.admin_headers())
        assert restock.status == 202, restock
        behind = await hapi.hold(pid, 2, prefer="respond-async")
        assert behind.status == 202, behind  # not refused from the cache
    assert (await hapi.settle(behind)).status == 201


async def test_prefer_wait_nan_does_not_hold_the_connection(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    pid = (await hapi.create_product(stock=5))["id"]
    default_wait = hostile_service.setting("DEFAULT_WAIT_SECONDS")
    with hostile_service.paused("worker"):
        started = time.monotonic()
        reply = await hapi.hold(pid, 1, prefer="wait=nan")
        elapsed = time.monotonic() - started
    assert reply.status == 202, reply
    assert "Preference-Applied" not in reply.headers
    assert elapsed < default_wait + 3, elapsed
    assert (await hapi.settle(reply)).status == 201


# --- payments never fall through -------------------------------------------------------

async def test_a_payment_for_an_order_never_created_is_listed_for_refund(
    hapi: Api, hostile_service: ServiceInstance
) -> None:
    pid = (await hapi.create_product(stock=5))["id"]
    hold = await hapi.new_hold(pid, 1)
    order_id = "ord" + hold["hold_id"][len("hold"):]
    key = f"evt-{uuid.uuid4().hex}"
    early = await hapi.webhook(order_id, "paid", key=key)
    assert early.status == 202 and early.body["outcome"] == "pending", early

    ttl = hostile_service.setting("HOLD_TTL_SECONDS")
    await asyncio.sleep(ttl + 0.5)
    late = await hapi.settle(await hapi.order(hold["hold_id"]))
    assert_problem(late, 409, "Hold has expired")

    deadline = time.monotonic() + SETTLE_SECONDS
    while (again := await hapi.webhook(order_id, "paid", key=key)).status == 202:
        assert time.monotonic() < deadline, again
        await asyncio.sleep(0.3)
    assert again.status == 200 and again.body["outcome"] == "ignored", again
    refunds = hostile_service.run_command("flashsale refunds")
    assert refunds.returncode == 0, refunds.stderr
    assert key in refunds.stdout and "never created" in refunds.stdout, refunds.stdout
