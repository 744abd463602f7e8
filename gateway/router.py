"""Where a tool call goes, and what happens when that bridge fails.

The choice: among healthy bridges with the tool, those that have its model loaded, the one with
the fewest calls in flight per parallel slot (ties in turn). A bridge that would have to load the
model (LM Studio's just-in-time loading takes seconds to minutes, and may evict another model) is
chosen only when none has it loaded, or when all that have it carry `spill_ratio` calls per slot.
With `affinity`, a conversation (same leading messages) stays on one bridge while it has a free
slot, so LM Studio can reuse its prompt cache. `routing = "round-robin"` ignores all of this.

The retry rule is judged by what the caller has received: a call that has relayed nothing to its
caller is retried once on another bridge when its bridge proved to be down; once progress reached
the caller, a retry would repeat text it already has, so the call ends with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import mcp_types as types
from loguru import logger

from gateway.metrics import Metrics
from gateway.pool import Bridge, BridgePool
from gateway.settings import GatewaySettings
from gateway.upstream import BridgeDown, Progress, UpstreamError

_AFFINITY_ENTRIES = 10_000
T = TypeVar("T")


class Unavailable(Exception):
    """No bridge can take the call now; the message names them and why."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamBroken(Exception):
    """The bridge died after progress had reached the caller."""


class Router:
    def __init__(self, pool: BridgePool, settings: GatewaySettings, metrics: Metrics) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self._turn: dict[str, int] = {}
        self._affinity: OrderedDict[str, Bridge] = OrderedDict()

    def candidates(self, tool: str, arguments: dict[str, Any] | None) -> list[Bridge]:
        """Healthy bridges with the tool, best first."""
        having = [b for b in self.pool.bridges if b.healthy and tool in b.tools]
        if not having:
            return []
        turn = self._turn.get(tool, 0)
        self._turn[tool] = turn + 1
        if self.settings.routing == "round-robin":
            start = turn % len(having)
            return having[start:] + having[:start]
        loaded = _least_loaded_first([b for b in having if b.is_loaded(tool)], tool, turn)
        cold = _least_loaded_first([b for b in having if not b.is_loaded(tool)], tool, turn)
        saturated = bool(loaded) and loaded[0].saturation(tool) >= self.settings.spill_ratio
        # Calls queued behind a load this gateway started would not be served sooner by a second load.
        if not loaded or (cold and saturated and not any(b.is_loading(tool) for b in loaded)):
            ordered = cold + loaded
        else:
            ordered = loaded + cold
        if self.settings.affinity and (key := _conversation(arguments)):
            sticky = self._affinity.get(key)
            if sticky is not None and sticky in ordered and sticky.is_loaded(tool) and sticky.saturation(tool) < 1:
                ordered.remove(sticky)
                ordered.insert(0, sticky)
            self._remember(key, ordered[0])
        return ordered

    def _remember(self, key: str, bridge: Bridge) -> None:
        self._affinity[key] = bridge
        self._affinity.move_to_end(key)
        while len(self._affinity) > _AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    @contextmanager
    def counted(self, bridge: Bridge, tool: str) -> Iterator[None]:
        """One call on `bridge`, counted in its in-flight load and the routing metrics."""
        cold = not bridge.is_loaded(tool)
        model = bridge.started(tool)
        self.metrics.call_routed(bridge.name, model, jit_load=cold)
        logger.debug(
            "{} -> {}: {} calls in flight on {} slots, {}", tool, bridge.name, bridge.load(tool) - 1,
            bridge.slots(tool), "would load the model" if cold else "model loaded",
        )
        failed = False
        try:
            yield
        except UpstreamError:
            failed = True
            raise
        finally:
            bridge.finished(model, failed=failed)
            self.metrics.call_done(bridge.name, model)

    async def call(
        self, name: str, arguments: dict[str, Any] | None, progress: Progress | None, meta: dict[str, Any]
    ) -> tuple[types.CallToolResult, Bridge]:
        """Run the call on the best bridge; `progress=None` means the caller sees nothing until the result."""
        relayed = False

        async def relay(value: float, total: float | None, message: str | None) -> None:
            nonlocal relayed
            relayed = True
            assert progress is not None
            await progress(value, total, message)

        async def run(bridge: Bridge) -> types.CallToolResult:
            return await bridge.client.call_tool(name, arguments, relay if progress else None, meta)

        return await self.attempt(name, arguments, run, lambda: relayed)

    async def attempt(
        self, tool: str, arguments: dict[str, Any] | None, run: Callable[[Bridge], Awaitable[T]],
        relayed: Callable[[], bool] = lambda: False,
    ) -> tuple[T, Bridge]:
        """`run(bridge)` on the best bridge for the tool, counted; the retry rule for every call path.

        A bridge that proves down (`BridgeDown`) is ejected, and the call goes once to the next best,
        unless `relayed()` says part of the answer already reached the caller (`StreamBroken`).
        Raises `Unavailable` when no bridge could take it.
        """
        candidates = self.candidates(tool, arguments)
        if not candidates:
            raise self.unavailable(tool)
        failures: list[str] = []
        for bridge in candidates[:2]:
            try:
                with self.counted(bridge, tool):
                    return await run(bridge), bridge
            except BridgeDown as exc:
                await bridge.eject(str(exc))
                failures.append(str(exc))
                if relayed():
                    raise StreamBroken(
                        f"{exc}. The answer had already started streaming, so it was not retried; call the tool again."
                    ) from exc
                logger.warning("call to {} on {} failed before reaching its caller; {}", tool, bridge.name,
                               "retrying on another bridge" if len(candidates) > 1 else "no other bridge has it")
        raise Unavailable("; ".join(failures), retry_after=1)

    def tool_for(self, model: str) -> str | None:
        """A tool of the model on some bridge still within its grace period (routing ranks by the tool's
        model, so any of them will do), or None when no bridge has reported the model."""
        for bridge in self.pool.bridges:
            load = bridge.models.get(model)
            if load is not None and load.tools and bridge.in_grace():
                return load.tools[0]
        return None

    def unavailable(self, name: str) -> Unavailable:
        entry = self.pool.union().get(name)
        if entry is None:
            return Unavailable(f"No bridge offers {name} now.", retry_after=1)
        return Unavailable(entry.unavailable_reason(), self.pool.retry_after(entry))


def _least_loaded_first(bridges: list[Bridge], tool: str, turn: int) -> list[Bridge]:
    """By calls in flight per slot; the bridges tied for least take turns at the front."""
    ordered = sorted(bridges, key=lambda b: b.saturation(tool))
    if not ordered:
        return ordered
    least = ordered[0].saturation(tool)
    ties = [b for b in ordered if b.saturation(tool) == least]
    start = turn % len(ties)
    return ties[start:] + ties[:start] + ordered[len(ties):]


def _conversation(arguments: dict[str, Any] | None) -> str | None:
    """A key for the conversation a chat call continues: a hash of its leading messages."""
    # The system prompt and the first message stay the same as a conversation grows.
    args = arguments or {}
    messages = args.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    lead = json.dumps([args.get("system"), messages[0]], sort_keys=True, default=str)
    return hashlib.sha256(lead.encode()).hexdigest()[:32]
