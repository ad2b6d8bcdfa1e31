"""The server's HTML pages and their security headers: the page at ``/`` and the OpenAPI viewer at ``/docs``.

Neither may be framed (``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'``: no
click-jacking of the API-key box). The page at ``/`` runs only its own inline script and style,
allowed by their SHA-256 digests (computed from the file when the app is built), fetches only
from this server and shows only images the user chose (``blob:``). The viewer at ``/docs`` loads
Swagger UI from the jsDelivr CDN at a pinned version (:data:`SWAGGER_UI`; FastAPI's default
floats at ``@5``), so a release published later never runs in the server's origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

__all__ = ["SWAGGER_UI", "add_pages"]

#: The Swagger UI release ``/docs`` loads (``swagger-ui-dist`` on npm, served by jsDelivr).
SWAGGER_UI = "5.35.0"
_CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI}"
_NOT_FRAMED = {"X-Frame-Options": "DENY"}


def add_pages(app: FastAPI) -> None:
    """Serve the page at ``/`` and the viewer at ``/docs`` (create ``app`` with ``docs_url=None``)."""
    page = resources.files("trainfer.server").joinpath("static/index.html").read_text("utf-8")
    page_headers = {**_NOT_FRAMED, "Content-Security-Policy": page_policy(page)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        viewer = get_swagger_ui_html(
            openapi_url="openapi.json",  # relative: also right below a mount point (root_path)
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{_CDN}/swagger-ui-bundle.js",
            swagger_css_url=f"{_CDN}/swagger-ui.css",
        )
        viewer.headers.update({**_NOT_FRAMED, "Content-Security-Policy": "frame-ancestors 'none'"})
        return viewer


def page_policy(page: str) -> str:
    """The Content-Security-Policy of ``page``: its inline ``<script>`` and ``<style>`` elements by
    digest, fetches from this server, images from the user's files, nothing else; never framed."""
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_digests(page, 'script')}",
            f"style-src {_digests(page, 'style')}",
            "connect-src 'self'",
            "img-src blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def _digests(page: str, element: str) -> str:
    """The CSP sources allowing each inline ``element`` of ``page`` by its SHA-256 digest."""
    bodies = re.findall(rf"<{element}>(.*?)</{element}>", page, flags=re.DOTALL)
    encoded = (base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() for body in bodies)
    return " ".join(f"'sha256-{digest}'" for digest in encoded) or "'none'"
