"""gateway/server.py: aiohttp's runner with problem documents for what its parser refuses."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import server
from gateway.metrics import Metrics
from gateway.server import (
    KEEPALIVE_SECONDS,
    ProblemAppRunner,
    ProblemRequestHandler,
    ReadGate,
    _serve,
)
from gateway.typedefs import METRICS


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def serving(path: str, handler: Handler, on_hold: Callable[[], Any] | None = None
                  ) -> AsyncIterator[ProblemAppRunner]:
    """An application answering GET ``path`` with ``handler``, served as the gateway is."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = ProblemAppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS,
                              on_hold=on_hold)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner
    finally:
        await runner.cleanup()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with serving("/", hello) as runner:
        assert runner.server is not None
        assert isinstance(runner.server(), ProblemRequestHandler)
        yield runner.addresses[0][1]


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


# --- the read gate -------------------------------------------------------------------


class Queued:
    def __init__(self, name: int, released: list[int]) -> None:
        self.name, self.released = name, released

    def release(self) -> None:
        self.released.append(self.name)


async def test_the_gate_admits_a_turn_s_reads_then_queues_the_rest_in_order() -> None:
    released: list[int] = []
    held: list[None] = []
    gate = ReadGate(asyncio.get_running_loop(), 2, lambda: held.append(None))
    handlers = [Queued(i, released) for i in range(5)]

    assert [gate.admit(h) for h in handlers] == [True, True, False, False, False]
    assert gate.waiting == 3 and len(held) == 3  # (counted: flashsale_reads_held_total)

    await asyncio.sleep(0)  # the next turn: two of those queued, first come first
    assert released == [2, 3]
    assert gate.admit(Queued(5, released)) is False  # no overtaking

    await asyncio.sleep(0)
    assert released == [2, 3, 4, 5] and gate.waiting == 0

    await asyncio.sleep(0)  # a turn with nobody queued: a full turn's reads again
    assert [gate.admit(Queued(i, released)) for i in (6, 7, 8)] == [True, True, False]


async def echo(request: web.Request) -> web.Response:
    await asyncio.sleep(0.01)
    return web.json_response({"n": int(request.match_info["n"])})


HELD: list[None] = []


@pytest.fixture
async def gated_port(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[int, ReadGate]]:
    monkeypatch.setattr(server, "READS_PER_TURN", 1)
    HELD.clear()
    async with serving("/echo/{n}", echo, lambda: HELD.append(None)) as runner:
        assert isinstance(runner.server, server.ProblemServer)
        yield runner.addresses[0][1], runner.server.gate


async def test_a_crowd_past_the_gate_is_answered_whole(gated_port: tuple[int, ReadGate]) -> None:
    # One read per turn: most of these 40 connections' reads wait their turn, some of
    # them on connections that are gone by then; every one still open gets its answers.
    port, gate = gated_port
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]

    async def ask(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                  ) -> list[int] | None:
        pipelined = b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (i * 10 + k)
                             for k in range(3))
        writer.write(pipelined)
        if i % 4 == 0:  # gone before its answers (and maybe before its turn)
            writer.close()
            return None
        answers = []
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append(orjson.loads(await reader.readexactly(length))["n"])
        writer.close()
        return answers

    got = await asyncio.gather(*(ask(i, r, w) for i, (r, w) in enumerate(conns)))

    for i, answers in enumerate(got):
        assert answers == (None if i % 4 == 0 else [i * 10, i * 10 + 1, i * 10 + 2])
    await asyncio.sleep(0.05)
    assert HELD and gate.waiting == 0  # reads were held back, and all had their turn


async def test_a_read_that_breaks_the_parser_closes_only_its_connection(
    gated_port: tuple[int, ReadGate], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether it was parsed at once or held for a later turn (one read per turn here),
    # a read whose parsing raises closes its own connection and nobody else's.
    port, gate = gated_port
    parse = web.RequestHandler.data_received

    def breaking(self: web.RequestHandler, data: bytes) -> None:
        if b"BOOM" in data:
            raise RuntimeError("the parser broke")
        parse(self, data)

    monkeypatch.setattr(web.RequestHandler, "data_received", breaking)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(21)]
    for n, (_, writer) in enumerate(conns):
        path = b"/BOOM" if n == 10 else b"/echo/%d" % n
        writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
    answers = [await asyncio.wait_for(reader.read(), 10) for reader, _ in conns]
    for _, writer in conns:
        writer.close()

    assert answers[10] == b""  # closed unanswered
    assert all(a.startswith(b"HTTP/1.1 200") for n, a in enumerate(answers) if n != 10)
    assert gate.waiting == 0


async def test_an_idle_keep_alive_connection_keeps_no_request() -> None:
    # aiohttp keeps a connection's last request and response until the next request;
    # at 2,500 idle connections that was 12 MB of a gateway. Ours drops them.
    seen: list[weakref.ref[web.Request]] = []

    async def remember(request: web.Request) -> web.Response:
        seen.append(weakref.ref(request))
        return web.json_response({"ok": True})

    async with serving("/", remember) as runner:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        await reader.readexactly(len(b'{"ok":true}'))
        await asyncio.sleep(0.05)  # the handler's loop is back waiting for the next
        gc.collect()

        assert len(seen) == 1 and seen[0]() is None
        assert not reader.at_eof()  # the connection is still open
        writer.close()


async def test_the_gateway_counts_the_reads_it_holds_back(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(server, "READS_PER_TURN", 1)
    app = web.Application()
    app.router.add_get("/echo/{n}", echo)
    app[METRICS] = Metrics()
    runner = server.make_runner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        conns = [await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
                 for _ in range(20)]
        for n, (_, writer) in enumerate(conns):
            writer.write(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % n)
        answers = [await asyncio.wait_for(reader.read(), 10) for reader, _ in conns]
        for _, writer in conns:
            writer.close()
    finally:
        await runner.cleanup()

    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    held = app[METRICS].registry.get_sample_value("flashsale_reads_held_total")
    assert held is not None and held > 0
