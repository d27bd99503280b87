"""Serving the gateway: aiohttp's application runner, with two changes.

A request that aiohttp's HTTP parser refuses before it reaches the application (a
control byte in a header or in the request line, a malformed request line) is answered
by the protocol handler itself, as a ``text/plain`` page. API.md (invariant 5) promises
a problem document for every bad input, so the protocol handler here answers those with
the same ``application/problem+json`` document as every other error.

aiohttp keeps a keep-alive connection's last request (its parsed message, payload,
writer and response: about 5 KB) until the next request arrives: at 2,500 idle
connections, 13 MB of Python objects. ``ProblemRequestHandler.start`` is aiohttp's own, copied, with
that request dropped once answered. It is used only with the aiohttp it was copied
from (the source's SHA-256 is checked at import); with another, aiohttp's is used and
the gateway says so when it starts.

A crowd on keep-alive connections sends at once: in one turn of the event loop the
server reads every socket that has data, and aiohttp parses each read into a request,
its task and its coroutines (kept until answered) before the first one is answered.
A ``ReadGate`` parses at most ``READS_PER_TURN`` reads per turn; a read past that
waits as its raw bytes (a few hundred), its socket paused, and is parsed in a later
turn, first come first parsed. The rest of the crowd waits in the kernel's socket
buffers, where it costs the gateway nothing. One gateway holding 2,500 connections
through a sold-out rush peaked at 114 MB without the gate, 102 MB with it, and 92-94 MB
with the gate and the light keep-alive.

Everything else is aiohttp's: ``AppRunner`` (startup, cleanup, graceful shutdown on
SIGTERM), ``TCPSite``.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import contextlib
import hashlib
import inspect
import logging
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp import web_protocol as aiohttp_protocol
from aiohttp.web_request import BaseRequest

from flashsale import memory
from flashsale.problems import problem
from gateway.errors import PROBLEM_JSON, body_bytes
from gateway.typedefs import METRICS

log = logging.getLogger("flashsale.gateway")

# What web.run_app gives (aiohttp's protocol default, without it, is an hour): an idle
# keep-alive connection is closed after this long.
KEEPALIVE_SECONDS = 75.0

# Reads parsed per turn of the event loop (see the module's docstring). One gateway,
# 2,500 connections, a sold-out rush: peak RSS 89 MB with 64, 93 with 128, 100 with 256,
# 114 without the gate; the benchmark's overload runs peaked the same with 64 and 128,
# and so did the 200-client scenarios' rates (docs/BENCHMARKS.md, "1 December, day").
# 200 clients over two gateways are 100 connections each: 128 holds none of them back.
READS_PER_TURN = 128

# SHA-256 of the source of aiohttp 3.14.5's RequestHandler.start, which
# ProblemRequestHandler.start copies.
COPIED_START_SHA256 = "2e565fd40c8e04fb3afb481d5ba52691a61d28396573b4b8a4cf3b168782288e"
LIGHT_KEEPALIVE = hashlib.sha256(
    inspect.getsource(web.RequestHandler.start).encode()).hexdigest() == COPIED_START_SHA256

UNPARSABLE = ("The request is not valid HTTP/1.1: a malformed request line, header or "
              "body framing (header values and paths must be printable ASCII)")


class Held(Protocol):
    def release(self) -> None: ...


class ReadGate:
    """At most ``per_turn`` reads parsed per turn of the event loop; the reads past
    that are parsed in later turns, in the order they arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int,
                 on_hold: Callable[[], Any] | None = None) -> None:
        self._loop = loop
        self._per_turn = per_turn
        self._on_hold = on_hold  # called for each read held back
        self._left = per_turn
        self._refill_due = False
        self._waiting: deque[Held] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, handler: Held) -> bool:
        """May ``handler`` parse its read now? If not it is queued, to be given its
        turn by ``handler.release()``."""
        if not self._refill_due:
            self._refill_due = True
            self._loop.call_soon(self._refill)
        if self._left > 0 and not self._waiting:  # none may overtake those queued
            self._left -= 1
            return True
        self._waiting.append(handler)
        if self._on_hold is not None:
            self._on_hold()
        return False

    def _refill(self) -> None:
        self._refill_due = False
        self._left = self._per_turn
        while self._waiting and self._left > 0:
            self._left -= 1
            self._waiting.popleft().release()
        if self._left < self._per_turn:  # reads were parsed: the next turn refills too
            self._refill_due = True
            self._loop.call_soon(self._refill)


class ProblemRequestHandler(web.RequestHandler):
    """aiohttp's protocol handler; its own error answers are problem documents, and
    its reads pass a ReadGate."""

    def __init__(self, manager: web.Server, gate: ReadGate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._held: list[bytes] | None = None  # a read waiting for its turn

    def data_received(self, data: bytes) -> None:
        if self._held is not None:  # (reading is paused; should more come, it waits too)
            self._held.append(data)
            return
        if self._gate.admit(self):
            super().data_received(data)
            return
        self._held = [data]
        if self.transport is not None:
            self.transport.pause_reading()

    def release(self) -> None:
        """The held read's turn: parse it and read on."""
        held, self._held = self._held, None
        if held is None or self.transport is None:  # closed meanwhile
            return
        self.transport.resume_reading()
        try:
            super().data_received(b"".join(held))
        except Exception:  # what the event loop does when data_received raises
            log.exception("a held read could not be parsed; its connection is closed")
            self.transport.abort()

    if LIGHT_KEEPALIVE:

        async def start(self) -> None:
            """aiohttp 3.14's ``RequestHandler.start``, but for the lines marked
            "flash-sale": the connection's last request is not kept while it waits for
            the next."""
            loop = self._loop
            manager = self._manager
            assert manager is not None
            keepalive_timeout = self._keepalive_timeout
            resp = None
            assert self._request_factory is not None
            assert self._request_handler is not None

            while not self._force_close:
                if not self._messages:
                    try:
                        # wait for next request
                        self._waiter = loop.create_future()
                        await self._waiter
                    finally:
                        self._waiter = None

                message, payload = self._messages.popleft()

                # Free a parser slot; resume reading once drained to low water so
                # pipelining keeps flowing while this request is handled.
                # no branch: _parser is only None after connection_lost, whose path
                # exits this loop, so the None case is not reachably exercisable.
                if self._parser is not None:  # pragma: no branch
                    self._parser.message_consumed()
                if (
                    self._buffer_paused
                    and len(self._messages) <= self._msg_queue_resume_size
                ):
                    self._resume_reading_if_drained()

                # time is only fetched if logging is enabled as otherwise
                # its thrown away and never used.
                start = loop.time() if self._logging_enabled else None

                manager.requests_count += 1
                writer = aiohttp_protocol.StreamWriter(self, loop)
                if isinstance(message, aiohttp_protocol._ErrInfo):
                    # make request_factory work
                    request_handler = self._make_error_handler(message)
                    message = aiohttp_protocol.ERROR
                else:
                    request_handler = self._request_handler

                # Important don't hold a reference to the current task
                # as on traceback it will prevent the task from being
                # collected and will cause a memory leak.
                request = self._request_factory(
                    message,
                    payload,
                    self,
                    writer,
                    self._task_handler or asyncio.current_task(loop),  # type: ignore[arg-type]
                )
                try:
                    # a new task is used for copy context vars (#3406)
                    coro = self._handle_request(request, start, request_handler)
                    if sys.version_info >= (3, 14):
                        if isinstance(loop, asyncio.base_events.BaseEventLoop):
                            task = asyncio.create_task(coro, eager_start=True)
                        else:
                            task = asyncio.Task(coro, loop=loop, eager_start=True)
                    elif sys.version_info >= (3, 12):
                        task = asyncio.Task(coro, loop=loop, eager_start=True)
                    else:
                        task = loop.create_task(coro)
                    try:
                        resp, reset = await task
                    except ConnectionError:
                        self.log_debug("Ignored premature client disconnection")
                        break

                    # Drop the processed task from asyncio.Task.all_tasks() early
                    del task
                    if reset:
                        self.log_debug("Ignored premature client disconnection 2")
                        break

                    # notify server about keep-alive
                    self._keepalive = bool(resp.keep_alive)

                    # check payload
                    if not payload.is_eof():
                        lingering_time = self._lingering_time
                        if not self._force_close and lingering_time:
                            self.log_debug(
                                "Start lingering close timer for %s sec.", lingering_time
                            )

                            now = loop.time()
                            end_t = now + lingering_time

                            try:
                                while not payload.is_eof() and now < end_t:
                                    async with aiohttp_protocol.ceil_timeout(end_t - now):
                                        # read and ignore
                                        await payload.readany()
                                    now = loop.time()
                            except (asyncio.CancelledError, TimeoutError):
                                if (
                                    sys.version_info >= (3, 11)
                                    and (t := asyncio.current_task())
                                    and t.cancelling()
                                ):
                                    raise

                        # if payload still uncompleted
                        if not payload.is_eof() and not self._force_close:
                            self.log_debug("Uncompleted request.")
                            self.close()

                    payload.set_exception(aiohttp_protocol._PAYLOAD_ACCESS_ERROR)

                except asyncio.CancelledError:
                    self.log_debug("Ignored premature client disconnection")
                    self.force_close()
                    raise
                except Exception as exc:
                    self.log_exception("Unhandled exception", exc_info=exc)
                    self.force_close()
                except BaseException:
                    self.force_close()
                    raise
                finally:
                    # Break reference cycle in case of exception
                    request._task = None  # type: ignore[assignment]
                    if self.transport is None and resp is not None:
                        self.log_debug("Ignored premature client disconnection.")

                # flash-sale: drop this request before waiting for the next one (aiohttp
                # keeps it, its response and its payload alive until the next arrives).
                del message, payload, writer, request, coro
                resp = None
                if self._keepalive and not self._close and not self._force_close:
                    # start keep-alive timer
                    close_time = loop.time() + keepalive_timeout
                    self._next_keepalive_close_time = close_time
                    if self._keepalive_handle is None:
                        self._keepalive_handle = loop.call_at(
                            close_time, self._process_keepalive
                        )
                else:
                    break

            # remove handler, close transport if no handlers left
            if not self._force_close:
                self._task_handler = None
                if self.transport is not None:
                    self.transport.close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # aiohttp's: logs it with its traceback (and refuses if a
            super().handle_error(request, status, exc, message)  # response was started)
        else:  # the client's doing: one line, no traceback (a flood must not fill logs)
            if request.writer.output_size > 0:
                raise ConnectionError("a response was sent already")
            reason = " ".join(str(exc or message or "").split())[:200]
            log.warning("unparsable request from %s answered %d: %s", request.remote,
                        status, reason)
        doc = problem(status, detail=UNPARSABLE) if status == 400 else problem(status)
        response = web.Response(status=status, body=body_bytes(doc), content_type=PROBLEM_JSON)
        response.force_close()
        return response


class ProblemServer(web.Server):
    """aiohttp's low-level server, making a ProblemRequestHandler per connection."""

    def __init__(self, *args: Any, on_hold: Callable[[], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = ReadGate(self._loop, READS_PER_TURN, on_hold)

    def __call__(self) -> web.RequestHandler:
        return ProblemRequestHandler(self, self.gate, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """aiohttp's AppRunner (it starts the application up and cleans it up) serving it
    through a ProblemServer. ``on_hold`` is called for each read the gate holds back."""

    def __init__(self, app: web.Application, *, on_hold: Callable[[], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._on_hold = on_hold

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return ProblemServer(server.request_handler, request_factory=server.request_factory,
                             handler_cancellation=server.handler_cancellation,
                             loop=asyncio.get_running_loop(), on_hold=self._on_hold,
                             **server._kwargs)


def make_runner(app: web.Application, handle_signals: bool = True) -> ProblemAppRunner:
    """The runner the gateway is served by; held reads count in its metrics if it has
    them (``flashsale_reads_held_total``)."""
    metrics = app.get(METRICS)
    return ProblemAppRunner(app, access_log=None, handle_signals=handle_signals,
                            on_hold=metrics.reads_held.inc if metrics else None,
                            keepalive_timeout=KEEPALIVE_SECONDS)


async def _serve(app: web.Application, host: str, port: int, backlog: int,
                 announce: Callable[[str], Any]) -> None:
    runner = make_runner(app)
    await runner.setup()
    if not LIGHT_KEEPALIVE:
        log.warning("aiohttp %s is not the version gateway/server.py copied "
                    "RequestHandler.start from: each idle keep-alive connection keeps its "
                    "last request (about 5 KB)", aiohttp.__version__)
    try:
        site = web.TCPSite(runner, host, port, backlog=backlog)
        await site.start()
        memory.settle()  # the application is up: its start-up objects out of gc's way
        announce(f"serving on {site.name}")
        await asyncio.Event().wait()  # until SIGTERM or SIGINT (GracefulExit)
    finally:
        await runner.cleanup()  # stops listening, lets requests in flight finish


def run(app: web.Application, *, host: str, port: int, backlog: int,
        announce: Callable[[str], Any] = log.info) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, as ``web.run_app`` does."""
    with asyncio.Runner() as runner, contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        runner.run(_serve(app, host, port, backlog, announce))
