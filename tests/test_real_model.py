"""End to end against a real OpenAI-compatible model server: llama.cpp serving Gemma 3 270M.

`.ci/run` starts the server and sets LLM_HUB_TEST_MODEL_URL (and LLM_HUB_REQUIRE_REAL_MODEL=1 so a
missing server fails instead of skipping). By hand: see the README's "Tests" section.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import mcp_types as types
import openai
import pytest

from tests.conftest import bridge_process, bridge_settings, connect_bridge, free_port, gateway_process

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

MODEL_URL = os.environ.get("LLM_HUB_TEST_MODEL_URL")
TOOL = "chat_google_gemma-3-270m"
MODEL = "google/gemma-3-270m"

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


async def test_openai_client_through_gateway_and_bridge(tmp_path: Path) -> None:
    # The OpenAI API end to end: the official client -> gateway -> bridge's relay -> llama.cpp's server.
    assert MODEL_URL
    key = "real-model-openai-key-0123456789"
    bridge_port, gateway_port = free_port(), free_port()
    async with (
        bridge_process(MODEL_URL, bridge_port, tmp_path / "bridge.log", LLM_HUB_REQUEST_TIMEOUT="120"),
        gateway_process(
            [f"http://127.0.0.1:{bridge_port}"],
            gateway_port,
            tmp_path / "gateway.log",
            LLM_HUB_API_KEYS=f"tester:{key}",
        ),
        openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0, timeout=120
        ) as client,
    ):
        with anyio.fail_after(30):
            while MODEL not in {m.id for m in (await client.models.list()).data}:
                await anyio.sleep(0.2)
        prompt = [{"role": "user", "content": "Write one short sentence about the sea."}]
        whole = await client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=16, temperature=0, seed=1)
        assert (whole.choices[0].message.content or "").strip()
        assert whole.usage is not None and whole.usage.completion_tokens > 0

        stream = await client.chat.completions.create(
            model=MODEL, messages=prompt, max_tokens=16, temperature=0, seed=1, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert len([p for p in pieces if p]) >= 2 and "".join(pieces).strip()

        completion = await client.completions.create(model=MODEL, prompt="The sea is", max_tokens=8, temperature=0)
        assert completion.choices[0].text.strip()
