"""The web dashboard: the page at `/`, its static files, and the two JSON endpoints it reads.

The page itself is plain HTML, CSS and JavaScript in `gateway/static/` (no build step, nothing
fetched from elsewhere), open without a key; everything it shows comes from authenticated API
calls made with the key the user types in. `GET /v1/dashboard/models` asks each healthy bridge's
`list_models` tool and merges the answers (a bridge that is down but in its grace period adds what
it last listed, marked unavailable); `GET /v1/stats` is the metrics' JSON summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.auth import key_name_of
from gateway.metrics import Metrics
from gateway.pool import Bridge, BridgePool, ToolEntry
from gateway.upstream import UpstreamError
from gateway.usage import Accounting

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
    def __init__(self, pool: BridgePool, metrics: Metrics, accounting: Accounting) -> None:
        self.pool = pool
        self.metrics = metrics
        self.accounting = accounting
        self._last_catalog: dict[str, dict[str, Any]] = {}  # by bridge name: its last list_models answer

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.page, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
            Route("/v1/dashboard/models", self.models, methods=["GET"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
        ]

    async def page(self, _request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    async def stats(self, request: Request) -> Response:
        snapshot = self.metrics.snapshot()
        key_name = key_name_of(request.scope)
        snapshot["usage"] = [row for row in snapshot["usage"] if self.accounting.may_use(key_name, row["model"])]
        return JSONResponse(snapshot)

    async def models(self, request: Request) -> Response:
        """Every model of every bridge, merged by id, each bridge's view of LM Studio, and whether
        each model can be called now."""
        answers: dict[str, dict[str, Any]] = {}
        skipped = [
            {"bridge": bridge.name, "error": bridge.last_error or "not healthy"}
            for bridge in self.pool.bridges
            if not bridge.healthy
        ]

        async def ask(bridge: Bridge) -> None:
            try:
                answers[bridge.name] = self._last_catalog[bridge.name] = await _catalog(bridge)
            except (UpstreamError, TimeoutError, ValueError) as exc:
                skipped.append({"bridge": bridge.name, "error": str(exc) or type(exc).__name__})

        async with anyio.create_task_group() as tg:
            for bridge in self.pool.healthy:
                tg.start_soon(ask, bridge)

        merged: dict[str, dict[str, Any]] = {}
        lmstudio = []
        for bridge in self.pool.bridges:  # in configuration order, so the answer is stable
            catalog = answers.get(bridge.name)
            if catalog is not None:
                state = catalog.get("lmstudio") or {}
                lmstudio.append(
                    {"bridge": bridge.name, "reachable": state.get("reachable"), "last_error": state.get("last_error")}
                )
            for model in (catalog or self._remembered(bridge)).get("models") or []:
                _merge(merged, model, bridge.name, live=catalog is not None)
        union = self.pool.union()
        key_name = key_name_of(request.scope)
        models = [entry for entry in merged.values() if self.accounting.may_use(key_name, entry["id"])]
        for entry in models:
            _mark_availability(entry, union)
        return JSONResponse({"models": models, "lmstudio": lmstudio, "skipped": skipped})

    def _remembered(self, bridge: Bridge) -> dict[str, Any]:
        """What a bridge that did not answer now last listed, while its tools are still in the union.

        Without an earlier answer, the models its last health check reported (ids and tools only).
        """
        # A bridge that failed to answer just now may not be known as down yet: its last answer
        # stays until its grace period ends.
        if not bridge.in_grace():
            self._last_catalog.pop(bridge.name, None)
            return {}
        if bridge.name in self._last_catalog:
            return self._last_catalog[bridge.name]
        reported = [{"id": load.model, "tools": load.tools, "loaded": load.loaded} for load in bridge.models.values()]
        return {"models": reported}


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


def _mark_availability(entry: dict[str, Any], union: dict[str, ToolEntry]) -> None:
    """A model is available while one of its tools is: the answer a call to it would get now."""
    live = entry.pop("live")
    tools = [union[name] for name in entry["tools"] if name in union]
    entry["available"] = any(tool.available for tool in tools) if tools else live
    if not entry["available"]:
        entry["unavailable_reason"] = tools[0].unavailable_reason() if tools else "The bridges that list it are down."


def _merge(merged: dict[str, dict[str, Any]], model: dict[str, Any], bridge: str, *, live: bool) -> None:
    """One entry per model id; it counts as loaded when a bridge that answered now has it loaded."""
    ident = model.get("id")
    if not isinstance(ident, str):
        return
    entry = merged.get(ident)
    if entry is None:
        merged[ident] = {**model, "tools": list(model.get("tools") or []), "bridges": [bridge], "live": live}
        return
    entry["bridges"].append(bridge)
    entry["tools"] += [tool for tool in model.get("tools") or [] if tool not in entry["tools"]]
    if live and (not entry["live"] or (model.get("loaded") and not entry.get("loaded"))):
        # A live answer outranks one remembered from a bridge that is down.
        entry.update({key: value for key, value in model.items() if key not in ("tools", "bridges")}, live=True)
