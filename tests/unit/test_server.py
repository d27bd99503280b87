"""gateway/server.py: aiohttp's runner with problem documents for what its parser refuses."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from gateway.server import (
    KEEPALIVE_SECONDS,
    ProblemAppRunner,
    ProblemRequestHandler,
    _serve,
)


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = ProblemAppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.server is not None
    assert isinstance(runner.server(), ProblemRequestHandler)
    yield runner.addresses[0][1]
    await runner.cleanup()


async def exchange(port: int, raw: bytes) -> tuple[bytes, bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, _, headers = head.partition(b"\r\n")
    return status_line, headers.lower(), body


@pytest.mark.parametrize("raw", [
    b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
])
async def test_what_the_parser_refuses_is_a_problem_document(port: int, raw: bytes) -> None:
    status_line, headers, body = await exchange(port, raw)

    assert status_line.split()[1] == b"400"
    assert b"content-type: application/problem+json" in headers
    assert b"connection: close" in headers or status_line.startswith(b"HTTP/1.0")
    doc = orjson.loads(body)
    assert doc["status"] == 400 and doc["title"] == "Bad Request" and doc["detail"]


async def test_a_good_request_is_the_application_s(port: int) -> None:
    status_line, _, body = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n"
                                                b"Connection: close\r\n\r\n")
    assert status_line.split()[1] == b"200" and orjson.loads(body) == {"ok": True}


class Served(Exception):
    pass


async def test_start_up_objects_are_frozen_before_the_gateway_serves() -> None:
    # A full collection over start-up's objects paused a gateway 25-55 ms mid-rush
    # (flashsale/memory.py): they are frozen once the application is up.
    app = web.Application()
    app.router.add_get("/", hello)
    seen: list[int] = []

    def announce(line: str) -> None:
        seen.append(gc.get_freeze_count())
        raise Served(line)  # stop here: serving is what comes next

    gc.unfreeze()
    try:
        with pytest.raises(Served, match="serving on"):
            await _serve(app, "127.0.0.1", 0, 16, announce)
    finally:
        gc.unfreeze()

    assert seen and seen[0] > 1000
