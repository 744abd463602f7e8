"""The bridges behind the gateway: their health, their tools, where each model is loaded.

Each bridge has one owner task that checks its `/health` on the interval (which also reports,
per model, whether it is loaded, its parallel slots and its calls in flight) and keeps a
`subscriptions/listen` stream open so that a change of its tools is seen at once. No call
depends on either: calls are separate HTTP requests (`upstream.py`).

A bridge that is down stays known for a grace period: its tools stay in the union, marked
unavailable, so a caller is told why a call cannot be served instead of "unknown tool".
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import mcp_types as types
from loguru import logger

from gateway.settings import GatewaySettings
from gateway.upstream import BridgeClient, GatewayBusy, UpstreamError

ChangeListener = Callable[[], Awaitable[None]]
_FIRST_RETRY = 0.25
_LISTEN_RETRY = 1.0
AVAILABLE_META = "llm-hub/available"


@dataclass
class ModelLoad:
    """One model on one bridge, as the bridge last reported it."""

    model: str
    tools: list[str]
    loaded: bool
    slots: int
    reported_in_flight: int = 0
    own_at_report: int = 0
    loading: bool = False
    reported_loaded: bool = True
    """This gateway's calls made LM Studio load it, and the calls queued meanwhile have not drained yet."""


@dataclass
class ToolEntry:
    """One tool of the union: its definition and which bridges could serve it."""

    tool: types.Tool
    bridges: list[Bridge] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return any(b.healthy for b in self.bridges)

    @property
    def model(self) -> str | None:
        """The model id behind the tool, as its bridges report it; None for a tool of no model
        (`list_models`) or from a bridge that does not say."""
        return next((model for b in self.bridges if (model := b.model_for(self.tool.name)) is not None), None)

    def unavailable_reason(self) -> str:
        reasons = "; ".join(f"{b.name}: {(b.last_error or 'not checked yet').rstrip('.')}" for b in self.bridges)
        return f"No bridge can take {self.tool.name} now. Bridges that have it: {reasons}."


class Bridge:
    """One bridge: its state as the gateway sees it, and the client calls use."""

    def __init__(self, url: str, settings: GatewaySettings, on_change: ChangeListener) -> None:
        self.url = url
        self.settings = settings
        token = settings.bridge_token.get_secret_value() if settings.bridge_token else None
        self.client = BridgeClient(
            url, token=token, timeout=settings.call_timeout, connections=settings.bridge_connections
        )
        self.name = self.client.name
        self._on_change = on_change
        self.healthy = False
        self.known = False  # answered at least once, so its tools mean something
        self.down_since: float | None = time.monotonic()
        self.tools: dict[str, types.Tool] = {}
        self.models: dict[str, ModelLoad] = {}
        self._tool_model: dict[str, str] = {}
        self.in_flight: Counter[str] = Counter()
        self.routed = 0
        self.latency_ms: float | None = None
        self.last_check: datetime | None = None
        self.last_error: str | None = None
        self.next_check_at = time.monotonic()
        self._catalog_version: object = None
        self._wake = anyio.Event()
        self._tools_stale = True
        self._listening: anyio.CancelScope | None = None

    # -- what routing reads ----------------------------------------------------------------

    def model_of(self, tool: str) -> str:
        return self.model_for(tool) or tool

    def model_for(self, tool: str) -> str | None:
        """The model id the tool calls, when this bridge's last report said."""
        return self._tool_model.get(tool)

    def is_loaded(self, tool: str) -> bool:
        load = self.models.get(self.model_of(tool))
        # A bridge that does not say (older bridge, model just appeared) is taken at its word.
        return load is None or load.loaded

    def slots(self, tool: str) -> int:
        load = self.models.get(self.model_of(tool))
        return max(1, load.slots) if load else 4

    def load(self, tool: str) -> int:
        """Calls in flight for the tool's model here: ours now, plus other gateways' at the last report."""
        model = self.model_of(tool)
        own = self.in_flight[model]
        report = self.models.get(model)
        others = max(0, report.reported_in_flight - report.own_at_report) if report else 0
        return own + others

    def is_loading(self, tool: str) -> bool:
        load = self.models.get(self.model_of(tool))
        return load is not None and load.loading

    def saturation(self, tool: str) -> float:
        return self.load(tool) / self.slots(tool)

    def started(self, tool: str) -> str:
        """Count a call in; returns the model it counts against."""
        model = self.model_of(tool)
        self.in_flight[model] += 1
        self.routed += 1
        load = self.models.get(model)
        if load is not None and not load.loaded:
            # It is loading now: further calls should queue here rather than load it elsewhere too.
            load.loaded = load.loading = True
        return model

    def finished(self, model: str, *, failed: bool = False) -> None:
        self.in_flight[model] -= 1
        load = self.models.get(model)
        if failed and load is not None and load.loading:
            # The call that was to load it failed: believe the bridge's last word again.
            load.loaded, load.loading = load.reported_loaded, False
        # The calls that queued while the model loaded are the load's backlog, not a sign that the
        # box is too slow: a second load elsewhere would take as long as they take to drain.
        if load is not None and load.loading and self.in_flight[model] <= load.slots:
            load.loading = False
        if self.in_flight[model] <= 0:
            del self.in_flight[model]

    def state(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "name": self.name,
            "healthy": self.healthy,
            "latency_ms": self.latency_ms,
            "last_check": self.last_check.isoformat() if self.last_check else None,
            "last_error": self.last_error,
            "calls": self.routed,
            "in_flight": sum(self.in_flight.values()),
            "tools": sorted(self.tools),
            "models": [
                {
                    "model": load.model,
                    "tools": load.tools,
                    "loaded": load.loaded,
                    "slots": load.slots,
                    "in_flight": self.load(load.tools[0]) if load.tools else self.in_flight[load.model],
                }
                for load in self.models.values()
            ],
        }

    def in_grace(self) -> bool:
        """Whether its tools still belong in the union."""
        if not self.known:
            return False
        return self.down_since is None or time.monotonic() - self.down_since < self.settings.grace_period

    # -- changes of state ------------------------------------------------------------------

    async def eject(self, reason: str) -> None:
        """Out of rotation until a health check passes again (evidence: refused, reset, 5xx)."""
        if self.healthy:
            logger.warning("bridge {} ejected: {}", self.name, reason)
        self.last_error = reason
        await self._set_healthy(False)
        self._wake.set()  # look again soon

    def refresh_tools_soon(self) -> None:
        self._tools_stale = True
        self._wake.set()

    async def _set_healthy(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            self.down_since = None
            self.last_error = None
            logger.info("bridge {} admitted with {} tools", self.name, len(self.tools))
        else:
            self.down_since = time.monotonic()
        await self._on_change()

    # -- the owner task --------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen)
            retry = _FIRST_RETRY
            while True:
                if await self._checked():
                    retry = _FIRST_RETRY
                    wait = self.settings.health_interval
                else:
                    # A bridge that is starting or restarting is back within seconds: look again soon,
                    # backing off to the health interval while it stays down.
                    wait = min(retry, self.settings.health_interval)
                    retry *= 2
                    if self.known and not self.in_grace():
                        await self._on_change()  # its grace period may just have ended
                self.next_check_at = time.monotonic() + wait
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _checked(self) -> bool:
        """One health check; a failure of ours while making it counts as a failed check, not a crash."""
        try:
            return await self._check()
        except Exception as exc:  # noqa: BLE001 - one bridge's odd answer must not stop the others' checks
            return await self._failed_check(f"health check failed inside the gateway ({type(exc).__name__})")

    async def _check(self) -> bool:
        started = time.monotonic()
        self.last_check = datetime.now(UTC)
        try:
            response = await self.client.health(self.settings.health_timeout)
        except GatewayBusy as exc:
            # Our shortage says nothing about the bridge: keep its state until a check can be made.
            logger.warning("bridge {}: health check skipped: {}", self.name, exc)
            return self.healthy
        except UpstreamError as exc:
            return await self._failed_check(f"health check failed: {exc}")
        self.latency_ms = round((time.monotonic() - started) * 1000, 2)
        try:
            body = response.json()
        except (ValueError, RecursionError):
            body = {}
        if not isinstance(body, dict):
            body = {}
        self.read_serving(body.get("serving"))
        if response.status_code != 200:
            detail = (body.get("lmstudio") or {}).get("last_error") if isinstance(body.get("lmstudio"), dict) else None
            return await self._failed_check(f"health check answered {response.status_code}" + (f": {detail}" if detail else ""))
        version = body.get("catalog_version")
        if self._tools_stale or version != self._catalog_version or not self.known:
            try:
                await self._load_tools()
            except GatewayBusy:
                return self.healthy
            except UpstreamError as exc:
                return await self._failed_check(f"tool list failed: {exc}")
            self._catalog_version = version
        await self._set_healthy(True)
        return True

    async def _failed_check(self, reason: str) -> bool:
        if self._listening is not None:
            self._listening.cancel()  # a stream to a bridge that went away may hang rather than end
        if self.healthy or self.last_error != reason:
            logger.warning("bridge {}: {}", self.name, reason)
        self.last_error = reason
        await self._set_healthy(False)
        return False

    def read_serving(self, serving: Any) -> None:
        """Take in the `serving` list of the bridge's `/health`: per model, loaded, slots, calls in flight."""
        if not isinstance(serving, list):
            return
        models: dict[str, ModelLoad] = {}
        for entry in serving:
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
                continue
            listed = entry.get("tools")
            tools = [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else []
            slots, reported = _count(entry.get("slots")), _count(entry.get("in_flight"))
            # A report taken while a load we started is under way still says "not loaded".
            previous = self.models.get(entry["model"])
            loading = previous is not None and previous.loading and entry.get("loaded") is False
            models[entry["model"]] = ModelLoad(
                model=entry["model"],
                tools=tools,
                loaded=loading or entry.get("loaded") is not False,
                loading=loading,
                reported_loaded=entry.get("loaded") is not False,
                slots=slots or 4,
                reported_in_flight=reported or 0,
                own_at_report=self.in_flight[entry["model"]],
            )
        self.models = models
        self._tool_model = {tool: load.model for load in models.values() for tool in load.tools}

    async def _load_tools(self) -> None:
        self._tools_stale = False
        tools = {tool.name: tool for tool in await self.client.list_tools()}
        self.known = True
        if tools != self.tools:
            self.tools = tools
            await self._on_change()

    async def _listen(self) -> None:
        """Hold a `subscriptions/listen` stream; each change wakes the owner loop to re-read."""
        while True:
            with anyio.CancelScope() as self._listening:
                try:
                    async with self.client.listen() as notifications:
                        async for message in notifications:
                            if message.method == "notifications/tools/list_changed":
                                self.refresh_tools_soon()
                except UpstreamError as exc:
                    logger.debug("bridge {}: change stream ended: {}", self.name, exc)
            await anyio.sleep(_LISTEN_RETRY)


def _count(value: Any) -> int | None:
    """A positive count from a bridge's report, or None (JSON booleans are not counts)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class BridgePool:
    """All bridges, and the union of their tools as clients see it."""

    def __init__(self, settings: GatewaySettings, on_change: ChangeListener) -> None:
        self.settings = settings
        self._on_change = on_change
        self.bridges = [Bridge(url, settings, self._changed) for url in settings.bridges]
        self._signature: object = None
        self._union: dict[str, ToolEntry] = {}
        self._union_changed = anyio.Event()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tell_clients)
                for bridge in self.bridges:
                    tg.start_soon(bridge.run)
        finally:
            with anyio.CancelScope(shield=True):
                for bridge in self.bridges:
                    await bridge.client.aclose()

    async def _changed(self) -> None:
        self._union = self._build_union()
        # Clients hear about changes of what they see (names, definitions, availability),
        # not every bridge flapping behind a tool another bridge still serves.
        signature = [(entry.tool, entry.available) for entry in self._union.values()]
        if signature != self._signature:
            self._signature = signature
            self._union_changed.set()

    async def _tell_clients(self) -> None:
        """Tells clients of changes from a task of its own: the call whose failure ejected a bridge
        must not wait while every connected client is pinged; changes close together go out once."""
        while True:
            await self._union_changed.wait()
            self._union_changed = anyio.Event()
            await self._on_change()

    @property
    def healthy(self) -> list[Bridge]:
        return [b for b in self.bridges if b.healthy]

    def union(self) -> dict[str, ToolEntry]:
        """Every tool a bridge within its grace period has, by name (rebuilt on each change)."""
        return self._union

    def _build_union(self) -> dict[str, ToolEntry]:
        entries: dict[str, ToolEntry] = {}
        for bridge in self.bridges:
            if not bridge.in_grace():
                continue
            for name, tool in bridge.tools.items():
                entry = entries.get(name)
                if entry is None:
                    entry = entries[name] = ToolEntry(tool)
                elif bridge.healthy and not entry.available:
                    entry.tool = tool  # a serving bridge's definition (loaded state) is the current one
                entry.bridges.append(bridge)
        return entries

    def tools(self) -> list[types.Tool]:
        """The union as MCP tools; those no bridge can serve now say so in `_meta`."""
        listed = []
        for entry in self.union().values():
            if entry.available:
                listed.append(entry.tool)
            else:
                note = "Unavailable right now: the bridges serving it are down. "
                listed.append(entry.tool.model_copy(update={
                    "description": note + (entry.tool.description or ""),
                    "meta": {**(entry.tool.meta or {}), AVAILABLE_META: False},
                }))
        return listed

    def retry_after(self, entry: ToolEntry) -> int:
        """Seconds until one of the tool's bridges is looked at again."""
        now = time.monotonic()
        soonest = min((b.next_check_at - now for b in entry.bridges), default=1.0)
        return max(1, math.ceil(soonest))
