"""The bridge driven by the SDK's own Client: in-process, over stdio and over HTTP, in both eras."""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types as types
import pytest

from tests.conftest import CHAT_TOOL, EMBED_TOOL, Connect, bridge_settings
from tests.fake_lmstudio import FakeLMStudio, FakeModel

pytestmark = pytest.mark.anyio


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)


async def test_each_model_becomes_a_tool(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        with anyio.fail_after(10):
            while len(tools := (await client.list_tools(cache_mode="refresh")).tools) < 3:
                await anyio.sleep(0.1)
    by_name = {t.name: t for t in tools}
    assert set(by_name) == {"list_models", CHAT_TOOL, EMBED_TOOL}
    chat = by_name[CHAT_TOOL]
    assert chat.title == "Chat with Gemma 3 270M"
    assert "loaded" in chat.description and "context 4096 tokens" in chat.description
    assert "Q4_K_M" in chat.description and "tool_use" in chat.description
    assert set(chat.input_schema["properties"]) >= {"prompt", "messages", "system", "temperature", "json_schema"}
    assert chat.output_schema and "usage" in chat.output_schema["properties"]
    assert chat.annotations and chat.annotations.read_only_hint is True
    assert by_name[EMBED_TOOL].input_schema["required"] == ["input"]


async def test_list_changed_is_advertised(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    _, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        caps = client.server_capabilities
    assert caps.tools is not None and caps.tools.list_changed is True


async def test_clients_hear_when_models_come_and_go(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    heard = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            heard.set()

    async def expect_change(client: Any) -> None:
        nonlocal heard
        with anyio.fail_after(10):
            if client.protocol_version.startswith("2026"):
                async with client.listen(tools_list_changed=True) as sub:
                    yield_change()
                    async for _event in sub:
                        return
            else:
                heard = anyio.Event()
                yield_change()
                await heard.wait()

    change: list[Any] = []

    def yield_change() -> None:
        change.pop(0)()

    async with connect(bridge_settings(url), message_handler=on_message) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        await anyio.sleep(0.3)  # let the first catalog settle before changing it
        change.append(lambda: fake.models.append(FakeModel("qwen/qwen3-8b", publisher="qwen")))
        await expect_change(client)
        names = {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}
        assert "chat_qwen_qwen3-8b" in names

        change.append(lambda: fake.models.pop())
        await expect_change(client)
        names = {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}
        assert "chat_qwen_qwen3-8b" not in names and CHAT_TOOL in names


async def test_streamed_call_sends_progress_before_the_result(
    connect: Connect, lmstudio: tuple[FakeLMStudio, str]
) -> None:
    fake, url = lmstudio
    fake.chunk_delay = 0.05  # far apart enough that coalescing keeps them separate
    updates: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, message))

    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        result = await client.call_tool(CHAT_TOOL, {"prompt": "Say hello", "max_tokens": 50}, progress_callback=on_progress)

    assert not result.is_error, _text(result)
    expected = "".join(fake.chunk_text)
    assert _text(result) == expected
    assert len(updates) >= 3
    progress = [p for p, _ in updates]
    assert progress == sorted(progress) and len(set(progress)) == len(progress)
    assert "".join(m for _, m in updates if m) == expected
    structured = result.structured_content
    assert structured is not None
    assert structured["model"] == "google/gemma-3-270m" and structured["finish_reason"] == "stop"
    assert structured["usage"]["completion_tokens"] == len(fake.chunk_text)
    assert structured["timings"]["time_to_first_token_s"] is not None
    body = fake.requests[-1]["json"]
    assert body["stream"] is True and body["max_tokens"] == 50
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]


async def test_cancelling_a_call_stops_the_generation(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    fake.chunk_text = [f"word{i} " for i in range(400)]
    fake.chunk_delay = 0.05
    first = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        first.set()

    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await client.call_tool(CHAT_TOOL, {"prompt": "Count"}, progress_callback=on_progress)

            tg.start_soon(call)
            with anyio.fail_after(10):
                await first.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(10):
            await fake.disconnected.wait()
        assert fake.disconnects == 1
        # The bridge keeps serving after the cancellation.
        result = await client.call_tool("list_models", {})
        assert not result.is_error


async def test_embedding_returns_vectors(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        result = await client.call_tool(EMBED_TOOL, {"input": ["one", "two"]})
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    vectors = result.structured_content["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == result.structured_content["dimensions"] > 0
    assert vectors[0] != vectors[1]


async def test_bad_arguments_name_the_field(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        await client.list_tools()
        too_hot = await client.call_tool(CHAT_TOOL, {"prompt": "hi", "temperature": 7})
        both = await client.call_tool(CHAT_TOOL, {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]})
        unknown = await client.call_tool(CHAT_TOOL, {"promt": "typo"})
    assert too_hot.is_error and "temperature" in _text(too_hot) and "less than or equal to 2" in _text(too_hot)
    assert both.is_error and "exactly one of `prompt` or `messages`" in _text(both)
    assert unknown.is_error and "promt" in _text(unknown)
    assert fake.requests == []  # nothing bad reached LM Studio


async def test_list_models_tool_and_resource_agree(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        with anyio.fail_after(10):
            while not (listed := (await client.call_tool("list_models", {})).structured_content)["models"]:
                await anyio.sleep(0.1)
        resources = await client.list_resources()
        assert [str(r.uri) for r in resources.resources] == ["llm-hub://models"]
        read = await client.read_resource("llm-hub://models")
    as_resource = json.loads(read.contents[0].text)  # type: ignore[union-attr]
    assert as_resource["models"] == listed["models"]
    chat = next(m for m in listed["models"] if m["id"] == "google/gemma-3-270m")
    assert chat["tools"] == [CHAT_TOOL] and chat["loaded"] is True and chat["context_length"] == 4096
    assert listed["lmstudio"] == {"url": url, "reachable": True, "api": "lmstudio-v1", "last_error": None}
