"""The live catalog: which models LM Studio serves and which tools they are, kept fresh by polling."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
from loguru import logger

from mcp_server.errors import LMStudioError
from mcp_server.lmstudio import LMStudioClient, ModelInfo
from mcp_server.settings import BridgeSettings
from mcp_server.tools import ModelTool, build_tools

ChangeListener = Callable[[], Awaitable[None]]


class ModelRegistry:
    """Polls LM Studio, diffs the tool set and tells listeners when it changed.

    When LM Studio is unreachable the last known tools stay (calls then fail with a clear
    error); a tool goes only when LM Studio answers without its model.
    """

    def __init__(self, client: LMStudioClient, settings: BridgeSettings) -> None:
        self.client = client
        self.settings = settings
        self.models: dict[str, ModelInfo] = {}
        self.tools: dict[str, ModelTool] = {}
        self.version = 0
        self.reachable = False
        self.last_poll: datetime | None = None
        self.last_error: str | None = None
        self.discovered = anyio.Event()
        """Set once the first poll has ended, whatever its outcome."""
        self._listeners: list[ChangeListener] = []
        self._poke = anyio.Event()
        self._refresh_lock = anyio.Lock()

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def poke(self) -> None:
        """Ask for a poll now (e.g. a call met 'model not found')."""
        self._poke.set()

    async def refresh(self) -> bool:
        """Poll once; returns whether the tool set changed."""
        async with self._refresh_lock:
            started = time.monotonic()
            try:
                models = await self.client.list_models()
                tools = build_tools(
                    models, self.settings.tools, self.settings.include_models, self.settings.exclude_models
                )
            except LMStudioError as exc:
                self._poll_failed(str(exc))
                return False
            except Exception as exc:  # noqa: BLE001 - a failed poll, whatever the cause
                # Whatever LM Studio sends must not end the polling (and with it the server): a failed
                # poll. Only the type is logged, as the exception's text may quote the listing.
                self._poll_failed(
                    f"LM Studio's model listing at {self.client.base_url} could not be read "
                    f"(the bridge met {type(exc).__name__} reading it)."
                )
                return False
            if not self.reachable:
                logger.info("LM Studio reachable at {} ({} API)", self.client.base_url, self.client.flavour)
            self.reachable = True
            self.last_error = None
            self.last_poll = datetime.now(UTC)
            self.models = {m.id: m for m in models}
            # Definitions compare by value, so a model that got loaded (new description) counts as a change.
            changed = {n: t.definition for n, t in tools.items()} != {n: t.definition for n, t in self.tools.items()}
            if changed:
                added = tools.keys() - self.tools.keys()
                removed = self.tools.keys() - tools.keys()
                self.tools = tools
                self.version += 1
                logger.info(
                    "tool catalog v{}: {} tools (+{} -{}) in {:.0f} ms",
                    self.version, len(tools), len(added), len(removed), (time.monotonic() - started) * 1000,
                )
            self.discovered.set()
        if changed:
            for listener in self._listeners:
                await listener()
        return changed

    def _poll_failed(self, error: str) -> None:
        """A poll that read no listing: the last known tools stay."""
        if self.reachable or self.last_error != error:
            logger.warning("model poll failed, keeping {} known tools: {}", len(self.tools), error)
        self.reachable = False
        self.last_error = error
        self.last_poll = datetime.now(UTC)
        self.discovered.set()

    async def run(self) -> None:
        """Poll forever: on the interval, or at once when poked."""
        while True:
            await self.refresh()
            with anyio.move_on_after(self.settings.poll_interval):
                await self._poke.wait()
            self._poke = anyio.Event()
