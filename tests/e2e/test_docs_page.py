"""``GET /docs`` in a real headless browser (Debian's chromium), with no network but the
gateway: Swagger UI must render every operation of the service's OpenAPI document."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from tests.e2e.harness import Api
from tests.services import missing_service

pytestmark = pytest.mark.e2e

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell")
# Every host name fails to resolve except the loopback address the gateway listens on:
# the page must not need a CDN.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
OPBLOCK = re.compile(r'class="opblock opblock-(\w+)[^"]*".*?data-path="([^"]+)"', re.S)


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    missing_service("no chromium binary (Debian package chromium; .ci/run installs it)")


async def rendered_dom(url: str) -> str:
    """The DOM after the page's scripts ran (virtual time: until the network is idle)."""
    proc = await asyncio.create_subprocess_exec(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        OFFLINE, "--virtual-time-budget=30000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def test_docs_page_renders_every_operation_offline(api: Api) -> None:
    page = await api.get("/docs")
    assert page.status == 200, page
    assert page.media_type == "text/html", page.headers.get("Content-Type")
    document = (await api.get("/api/openapi.json")).body
    expected = {(method, path) for path, item in document["paths"].items()
                for method in item if method in ("get", "post", "put", "patch", "delete")}
    assert len(expected) >= 10, expected

    dom = await rendered_dom(api.service.web_urls[0] + "/docs")

    rendered = set(OPBLOCK.findall(dom))
    assert rendered == expected, (f"missing {sorted(expected - rendered)}, "
                                  f"unexpected {sorted(rendered - expected)}")
    assert "Failed to load API definition" not in dom
    assert document["info"]["title"] in dom


async def test_docs_assets_come_from_the_gateway(api: Api) -> None:
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        reply = await api.get(f"/docs/assets/{asset}")
        assert reply.status == 200, (asset, reply.status)
        assert len(reply.raw) > 10_000, asset
    bundle = (await api.get("/docs/assets/swagger-ui-bundle.js")).raw
    # OpenAPI 3.1 needs Swagger UI 5: its bundle names the 3.1 support it carries.
    assert b"openapi-3-1" in bundle
    async with api.session.get(api.base_url() + "/", allow_redirects=False) as redirect:
        assert redirect.status == 302, redirect.status
        assert redirect.headers["Location"] == "/docs", redirect.headers
