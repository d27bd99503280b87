"""A bare aiohttp server: the ceiling the ``read`` scenario is compared with.

It answers ``GET /api/products/{id}`` with a fixed JSON document the size of a product,
on uvloop like the service's gateway, and does nothing else (no middleware, no Redis).

    python -m bench.hello --port 8200
"""

from __future__ import annotations

import argparse
import os

import orjson
from aiohttp import web

BODY = orjson.dumps({"id": 1, "name": "Hello world sneaker drop", "price_cents": 1999,
                     "currency": "USD", "stock": 5000, "available": 0})


async def product(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/api/products/{product_id}", product)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8200")))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.install()
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
