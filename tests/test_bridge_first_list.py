"""The handshake is answered at once, and the first tools/list waits (a bounded time) for discovery.

Desktop hosts list the tools once, right after connecting: that listing must hold the models even
when LM Studio is slow to list them. The fake's listing is held back by a gate, so what the bridge
knew when it answered is certain rather than a matter of timing.
"""

from __future__ import annotations

import anyio
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.conftest import CHAT_TOOL, Connect, bridge_settings, default_models
from tests.fake_lmstudio import FakeLMStudio, serve

pytestmark = pytest.mark.anyio


class GatedListing:
    """Holds every model-listing request until `open` is set (LM Studio slow to list its models)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.open = anyio.Event()
        self.asked = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/models"):
            self.asked.set()
            await self.open.wait()
        await self.app(scope, receive, send)


async def _names(client) -> set[str]:  # type: ignore[no-untyped-def]
    return {t.name for t in (await client.list_tools()).tools}


async def test_first_listing_waits_for_discovery(connect: Connect) -> None:
    fake = FakeLMStudio(default_models())
    gated = GatedListing(fake.app)
    async with serve(gated) as url:
        with anyio.fail_after(30):
            # The gate is shut: a handshake that waited for discovery would never finish.
            async with connect(bridge_settings(url, first_list_wait=20)) as client:
                await gated.asked.wait()
                async with anyio.create_task_group() as tg:

                    async def open_soon() -> None:
                        await anyio.sleep(0.5)
                        gated.open.set()

                    tg.start_soon(open_soon)
                    names = await _names(client)  # sent while the gate is still shut
    assert names == {"list_models", CHAT_TOOL, "embed_text-embedding-nomic-embed-text-v1.5"}


async def test_first_listing_wait_is_bounded(connect: Connect) -> None:
    fake = FakeLMStudio(default_models())
    gated = GatedListing(fake.app)
    async with serve(gated) as url:
        try:
            with anyio.fail_after(30):
                async with connect(bridge_settings(url, first_list_wait=0.3)) as client:
                    await gated.asked.wait()
                    assert await _names(client) == {"list_models"}  # what is known, once the wait is over
                    gated.open.set()
                    while CHAT_TOOL not in await _names(client):
                        await anyio.sleep(0.1)
        finally:
            gated.open.set()
