"""End to end against a real OpenAI-compatible model server: llama.cpp serving Gemma 3 270M.

`.ci/run` starts the server and sets LLM_HUB_TEST_MODEL_URL (and LLM_HUB_REQUIRE_REAL_MODEL=1 so a
missing server fails instead of skipping). By hand: see the README's "Tests" section.
"""

from __future__ import annotations

import os

import anyio
import mcp_types as types
import pytest

from tests.conftest import bridge_settings, connect_bridge

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

MODEL_URL = os.environ.get("LLM_HUB_TEST_MODEL_URL")
TOOL = "chat_google_gemma-3-270m"

if not MODEL_URL:
    if os.environ.get("LLM_HUB_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError("LLM_HUB_REQUIRE_REAL_MODEL=1 but LLM_HUB_TEST_MODEL_URL is not set")
    pytest.skip("no real model server (set LLM_HUB_TEST_MODEL_URL)", allow_module_level=True)


@pytest.mark.parametrize(
    ("transport", "mode"), [("stdio", "legacy"), ("stdio", "auto"), ("http", "legacy"), ("http", "auto")]
)
async def test_the_first_listing_holds_the_model(transport: str, mode: str) -> None:
    # What a desktop host does: list once, right after connecting, and never again.
    assert MODEL_URL
    async with connect_bridge(transport, mode, bridge_settings(MODEL_URL)) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert TOOL in names


@pytest.mark.parametrize(("transport", "mode"), [("stdio", "legacy"), ("stdio", "auto"), ("http", "auto")])
async def test_real_model_generates_text_with_progress(transport: str, mode: str) -> None:
    assert MODEL_URL
    updates: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if message:
            updates.append(message)

    settings = bridge_settings(MODEL_URL, request_timeout=120)
    async with connect_bridge(transport, mode, settings) as client:
        with anyio.fail_after(30):
            while TOOL not in {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}:
                await anyio.sleep(0.2)
        result = await client.call_tool(
            TOOL,
            {"prompt": "Write one short sentence about the sea.", "max_tokens": 24, "temperature": 0, "seed": 1},
            progress_callback=on_progress,
        )
    assert not result.is_error, result.content
    text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
    assert len(text.strip()) > 0
    assert len(updates) >= 2, updates
    assert "".join(updates) == text  # every generated piece reached the caller as progress
    structured = result.structured_content
    assert structured is not None
    assert structured["model"] == "google/gemma-3-270m"
    assert structured["finish_reason"] in ("stop", "length")
    assert structured["timings"]["tokens_per_second"] is not None
