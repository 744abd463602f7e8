"""The web dashboard: the page at `/`, its static files, and the two JSON endpoints it reads.

The page itself is plain HTML, CSS and JavaScript in `gateway/static/` (no build step, nothing
fetched from elsewhere), open without a key; everything it shows comes from authenticated API
calls made with the key the user types in. `GET /v1/models` asks each healthy bridge's
`list_models` tool and merges the answers; `GET /v1/stats` is the metrics' JSON summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.metrics import Metrics
from gateway.pool import Bridge, BridgePool
from gateway.upstream import UpstreamError

STATIC = Path(__file__).with_name("static")
LIST_MODELS = "list_models"
MODELS_TIMEOUT = 2.0

# The page runs only its own script and talks only to this gateway: an injected script could read
# the key from session storage, so nothing inline and nothing from other origins.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Dashboard:
    def __init__(self, pool: BridgePool, metrics: Metrics) -> None:
        self.pool = pool
        self.metrics = metrics

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.page, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
        ]

    async def page(self, _request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    async def stats(self, _request: Request) -> Response:
        return JSONResponse(self.metrics.snapshot())

    async def models(self, _request: Request) -> Response:
        """Every model of every healthy bridge, merged by id, and each bridge's view of LM Studio."""
        answers: dict[str, dict[str, Any]] = {}
        skipped = [
            {"bridge": bridge.name, "error": bridge.last_error or "not healthy"}
            for bridge in self.pool.bridges
            if not bridge.healthy
        ]

        async def ask(bridge: Bridge) -> None:
            try:
                answers[bridge.name] = await _catalog(bridge)
            except (UpstreamError, TimeoutError, ValueError) as exc:
                skipped.append({"bridge": bridge.name, "error": str(exc) or type(exc).__name__})

        async with anyio.create_task_group() as tg:
            for bridge in self.pool.healthy:
                tg.start_soon(ask, bridge)

        merged: dict[str, dict[str, Any]] = {}
        lmstudio = []
        for bridge in self.pool.bridges:  # in configuration order, so the answer is stable
            catalog = answers.get(bridge.name)
            if catalog is None:
                continue
            state = catalog.get("lmstudio") or {}
            lmstudio.append(
                {"bridge": bridge.name, "reachable": state.get("reachable"), "last_error": state.get("last_error")}
            )
            for model in catalog.get("models") or []:
                _merge(merged, model, bridge.name)
        return JSONResponse({"models": list(merged.values()), "lmstudio": lmstudio, "skipped": skipped})


async def _catalog(bridge: Bridge) -> dict[str, Any]:
    try:
        with anyio.fail_after(MODELS_TIMEOUT):
            result = await bridge.client.call_tool(LIST_MODELS, {}, None, {})
    except TimeoutError:
        raise TimeoutError(f"{LIST_MODELS} took longer than {MODELS_TIMEOUT:g} s") from None
    catalog = result.structured_content
    if result.is_error or not isinstance(catalog, dict):
        raise ValueError(f"{LIST_MODELS} gave no model list")
    return catalog


def _merge(merged: dict[str, dict[str, Any]], model: dict[str, Any], bridge: str) -> None:
    """One entry per model id; it counts as loaded when any bridge has it loaded."""
    ident = model.get("id")
    if not isinstance(ident, str):
        return
    entry = merged.get(ident)
    if entry is None:
        merged[ident] = {**model, "tools": list(model.get("tools") or []), "bridges": [bridge]}
        return
    entry["bridges"].append(bridge)
    entry["tools"] += [tool for tool in model.get("tools") or [] if tool not in entry["tools"]]
    if model.get("loaded") and not entry.get("loaded"):
        entry["loaded"] = True
        entry["context_length"] = model.get("context_length", entry.get("context_length"))
