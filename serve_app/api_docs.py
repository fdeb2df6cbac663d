"""/docs: Swagger UI over /openapi.json, its assets served from the swagger-ui-bundle package (no CDN).

URLs in the page are relative, so it works under any route prefix (root_path).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import swagger_ui_bundle
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

try:
    SERVICE_VERSION = version("image-search")
except PackageNotFoundError:  # running from a checkout that was not installed
    SERVICE_VERSION = "0"

API_DESCRIPTION = (
    "Search an indexed image collection by photos, texts, weighted combinations or vectors; embed photos "
    "and texts. Errors are JSON `{error: {code, message, filename}}`; a per-query problem is that "
    "query's `error` entry and the others are answered."
)
DOCS_ASSETS = "docs/assets"
DOCS_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Image search API</title>
  <link rel="stylesheet" href="{DOCS_ASSETS}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{DOCS_ASSETS}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
  </script>
</body>
</html>
"""


def swagger_assets() -> Mount:
    return Mount(f"/{DOCS_ASSETS}", app=StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
