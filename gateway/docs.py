"""``GET /docs``: Swagger UI for the service's own OpenAPI document, served offline.

The Swagger UI 5.x assets (5.x renders OpenAPI 3.1; 4.x cannot) come from the
``swagger-ui-bundle-v2`` package and are served from ``/docs/assets/``, so the page needs
nothing but this gateway. Only the small page that starts Swagger UI is written here.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
ASSETS = "/docs/assets"
OPENAPI_URL = "/api/openapi.json"

# Absolute asset URLs, so /docs and /docs/ both work. validatorUrl null: Swagger UI would
# otherwise send the document to an online validator.
PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Flash-sale checkout API</title>
  <link rel="stylesheet" href="{ASSETS}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{ASSETS}/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "{OPENAPI_URL}",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout"
    }});
  </script>
</body>
</html>
"""


def assets_dir() -> Path:
    """Where the installed bundle keeps swagger-ui.css and swagger-ui-bundle.js."""
    return Path(str(swagger_ui_path))


def add_routes(app: web.Application) -> None:
    """The page at /docs (and /docs/), its assets, and / pointing at it."""
    app.router.add_get(DOCS, docs_page)
    app.router.add_get(DOCS + "/", docs_page)
    app.router.add_static(ASSETS, assets_dir())
    app.router.add_get("/", to_docs)


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def to_docs(request: web.Request) -> web.Response:
    raise web.HTTPFound(DOCS)
