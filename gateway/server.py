"""Serving the gateway: aiohttp's application runner, with one change.

A request that aiohttp's HTTP parser refuses before it reaches the application (a
control byte in a header or in the request line, a malformed request line) is answered
by the protocol handler itself, as a ``text/plain`` page. API.md (invariant 5) promises
a problem document for every bad input, so the protocol handler here answers those with
the same ``application/problem+json`` document as every other error. Everything else is
aiohttp's: ``AppRunner`` (startup, cleanup, graceful shutdown on SIGTERM), ``TCPSite``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from flashsale import memory
from flashsale.problems import problem
from gateway.errors import PROBLEM_JSON, body_bytes

log = logging.getLogger("flashsale.gateway")

# What web.run_app gives (aiohttp's protocol default, without it, is an hour): an idle
# keep-alive connection is closed after this long.
KEEPALIVE_SECONDS = 75.0

UNPARSABLE = ("The request is not valid HTTP/1.1: a malformed request line, header or "
              "body framing (header values and paths must be printable ASCII)")


class ProblemRequestHandler(web.RequestHandler):
    """aiohttp's protocol handler; its own error answers are problem documents."""

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

    def __call__(self) -> web.RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """aiohttp's AppRunner (it starts the application up and cleans it up) serving it
    through a ProblemServer."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return ProblemServer(server.request_handler, request_factory=server.request_factory,
                             handler_cancellation=server.handler_cancellation,
                             loop=asyncio.get_running_loop(), **server._kwargs)


async def _serve(app: web.Application, host: str, port: int, backlog: int,
                 announce: Callable[[str], Any]) -> None:
    runner = ProblemAppRunner(app, access_log=None, handle_signals=True,
                              keepalive_timeout=KEEPALIVE_SECONDS)
    await runner.setup()
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
