"""LM Studio down, slow, dying mid-stream, empty or locked: the caller gets an error it can act on,
and the bridge keeps serving. Every case over every transport, in both eras."""

from __future__ import annotations

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import CHAT_MODEL, CHAT_TOOL, Connect, bridge_settings, default_models, fake_process
from tests.fake_lmstudio import FakeLMStudio, serve
from tests.test_bridge_e2e import _text, _wait_for

pytestmark = pytest.mark.anyio


async def _catalog(client) -> dict:  # type: ignore[no-untyped-def]
    result = await client.call_tool("list_models", {})
    assert not result.is_error
    return result.structured_content


async def _tool_names(client) -> set[str]:  # type: ignore[no-untyped-def]
    return {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}


async def test_lmstudio_down_at_start(connect: Connect, free_tcp_port: int) -> None:
    settings = bridge_settings(f"http://127.0.0.1:{free_tcp_port}")
    with anyio.fail_after(15):  # the handshake does not wait for discovery
        async with connect(settings) as client:
            assert await _tool_names(client) == {"list_models"}
            with anyio.fail_after(5):
                while (catalog := await _catalog(client))["lmstudio"]["last_error"] is None:
                    await anyio.sleep(0.1)
            assert catalog["lmstudio"]["reachable"] is False
            assert "not reachable at" in catalog["lmstudio"]["last_error"]
            with pytest.raises(MCPError, match="Unknown tool"):
                await client.call_tool(CHAT_TOOL, {"prompt": "hi"})


async def test_lmstudio_going_away_keeps_tools_and_calls_say_why(connect: Connect) -> None:
    async with fake_process("--models", CHAT_MODEL) as (process, url):
        async with connect(bridge_settings(url)) as client:
            with anyio.fail_after(10):
                while CHAT_TOOL not in await _tool_names(client):
                    await anyio.sleep(0.1)
            process.kill()  # LM Studio quits
            await process.wait()
            await anyio.sleep(0.5)  # a few polls fail meanwhile
            assert CHAT_TOOL in await _tool_names(client)
            result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
            assert result.is_error
            assert f"LM Studio is not reachable at {url}" in _text(result)
            assert "lms server start" in _text(result)


async def test_dying_mid_stream_returns_partial_text_and_keeps_serving(
    connect: Connect, lmstudio: tuple[FakeLMStudio, str]
) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        fake.mode = "die_midstream"
        result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
        assert result.is_error
        assert "closed the connection in the middle of the answer" in _text(result)
        assert "Partial answer before the failure" in _text(result)
        fake.mode = "ok"
        again = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
        assert not again.is_error and _text(again) == "".join(fake.chunk_text)


async def test_slow_lmstudio_gets_heartbeats_then_a_timeout(
    connect: Connect, lmstudio: tuple[FakeLMStudio, str]
) -> None:
    fake, url = lmstudio
    fake.mode = "slow"
    fake.slow_seconds = 30
    messages: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message)

    async with connect(bridge_settings(url, request_timeout=1.5, heartbeat_interval=0.3)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"}, progress_callback=on_progress)
        assert result.is_error
        assert "did not finish within 1.5 s" in _text(result) and "LLM_HUB_REQUEST_TIMEOUT" in _text(result)
        assert len(messages) >= 2 and all(m is None for m in messages)  # heartbeats: alive, no text
        with anyio.fail_after(5):
            await fake.disconnected.wait()  # the abandoned request was closed upstream
        fake.mode = "ok"
        assert not (await client.call_tool(CHAT_TOOL, {"prompt": "hi"})).is_error


async def test_no_models_loaded_says_what_to_do_and_repolls(
    connect: Connect, lmstudio: tuple[FakeLMStudio, str]
) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url, poll_interval=60)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        polls = fake.listing_calls
        fake.mode = "no_models_loaded"
        result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
        assert result.is_error
        assert "no model loaded" in _text(result) and "lms load" in _text(result)
        await _wait_for(lambda: fake.listing_calls > polls, timeout=5)  # re-polled at once, not in 60 s


async def test_removed_model_is_dropped_after_a_failed_call(
    connect: Connect, lmstudio: tuple[FakeLMStudio, str]
) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url, poll_interval=60)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        assert CHAT_TOOL in await _tool_names(client)
        fake.models = [m for m in fake.models if m.type != "llm"]
        result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
        assert result.is_error and "does not have this model" in _text(result)
        with anyio.fail_after(5):
            while CHAT_TOOL in await _tool_names(client):
                await anyio.sleep(0.1)


async def test_token_required(connect: Connect) -> None:
    fake = FakeLMStudio(default_models(), token="lm-secret")
    async with serve(fake.app) as url:
        async with connect(bridge_settings(url)) as client:
            with anyio.fail_after(5):
                while (catalog := await _catalog(client))["lmstudio"]["last_error"] is None:
                    await anyio.sleep(0.1)
            assert "requires an API token" in catalog["lmstudio"]["last_error"]
            assert "LMSTUDIO_API_TOKEN" in catalog["lmstudio"]["last_error"]
        async with connect(bridge_settings(url, lmstudio_api_token="lm-secret")) as client:
            await _wait_for(lambda: fake.listing_calls > 0)
            with anyio.fail_after(5):
                while CHAT_TOOL not in await _tool_names(client):
                    await anyio.sleep(0.1)
            assert not (await client.call_tool(CHAT_TOOL, {"prompt": "hi"})).is_error
        assert fake.requests[-1]["headers"]["authorization"] == "Bearer lm-secret"


async def test_malformed_answer(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        fake.mode = "malformed"
        result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
        assert result.is_error and "not valid JSON" in _text(result)


async def test_unknown_tool_is_a_protocol_error(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    _, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("chat_nope", {"prompt": "hi"})
    assert caught.value.error.code == types.INVALID_PARAMS
