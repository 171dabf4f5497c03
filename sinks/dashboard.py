"""The analytics dashboard (`GET /dashboard`) served by the read API: one dependency-free page.

`sinks/static/` holds the page (HTML, CSS, JS written by hand: no CDN, no build step, charts drawn as
inline SVG). It reads the analytics endpoints of the same API (`docs/analytics.md`) from the browser, so
it shows exactly what the API answers, and refreshes itself. The files are read once, at start-up, from
the installed package (package data). Answers carry a Content-Security-Policy that allows only this
origin, so the page cannot load anything from the internet.

Routes: `GET /dashboard` (the page), `GET /dashboard/{name}` for the page's own static files only.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

STATIC_PACKAGE = "sinks.static"
PAGE = "dashboard.html"
#: the static files served, with their content types (nothing else under /dashboard/ is served)
FILES: dict[str, str] = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def load_files() -> dict[str, bytes]:
    """The static files' bytes, from the installed package."""
    root = resources.files(STATIC_PACKAGE)
    return {name: root.joinpath(name).read_bytes() for name in FILES}


def add_dashboard(app: web.Application) -> None:
    """Register `GET /dashboard` and its static files on the read API's `app`."""
    files = load_files()

    def answer(name: str) -> web.Response:
        return web.Response(body=files[name], headers={**HEADERS, "Content-Type": FILES[name]})

    async def page(_request: web.Request) -> web.Response:
        return answer(PAGE)

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return answer(name)

    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/{name}", static)
