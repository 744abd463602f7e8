"""The LM Studio client against the fake: every listing surface, and each failure mapped once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mcp_server.errors import AuthRequired, BadUpstreamResponse, ModelNotFound, Unreachable, UpstreamError
from mcp_server.lmstudio import LMStudioClient, ModelInfo
from mcp_server.server import Bridge
from tests.conftest import CHAT_MODEL, CHAT_TOOL, EMBED_MODEL, bridge_settings, default_models
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("surface", "unknown_status", "flavour"),
    [
        ("v1", 404, "lmstudio-v1"),
        ("v0", 404, "lmstudio-v0"),
        # LM Studio before 0.4 answers unknown endpoints with 200 and an error body.
        ("v0", 200, "lmstudio-v0"),
        ("openai", 404, "openai"),
    ],
)
async def test_listing_uses_the_richest_surface(surface: str, unknown_status: int, flavour: str) -> None:
    fake = FakeLMStudio(default_models() + [FakeModel("qwen/qwen3-8b", loaded=False, context_length=32768)],
                        surface=surface)  # type: ignore[arg-type]
    fake.unknown_endpoint_status = unknown_status
    async with serve(fake.app) as url, LMStudioClient(url) as client:
        models = {m.id: m for m in await client.list_models()}
        assert client.flavour == flavour
        assert models[EMBED_MODEL].kind == "embedding" and models[CHAT_MODEL].kind == "llm"
        if flavour == "openai":
            assert models["qwen/qwen3-8b"].loaded is None  # the OpenAI listing cannot tell
        else:
            assert models[CHAT_MODEL].loaded is True and models["qwen/qwen3-8b"].loaded is False
            assert models["qwen/qwen3-8b"].context_length == 32768
            assert models[CHAT_MODEL].quantization == "Q4_K_M"
            assert "tool_use" in models[CHAT_MODEL].capabilities
        if flavour == "lmstudio-v1":
            assert models[CHAT_MODEL].display_name == "Gemma 3 270M"
        calls = fake.listing_calls
        await client.list_models()  # the surface that answered is asked first next time
        assert fake.listing_calls == calls + 1


async def test_unreachable(free_tcp_port: int) -> None:
    async with LMStudioClient(f"http://127.0.0.1:{free_tcp_port}") as client:
        with pytest.raises(Unreachable, match=f"not reachable at http://127.0.0.1:{free_tcp_port}"):
            await client.list_models()


async def test_auth_required_by_envelope() -> None:
    fake = FakeLMStudio(default_models(), token="t0ken")
    async with serve(fake.app) as url:
        async with LMStudioClient(url) as client:
            with pytest.raises(AuthRequired, match="LMSTUDIO_API_TOKEN"):
                await client.list_models()
        async with LMStudioClient(url, token="t0ken") as client:
            assert await client.list_models()


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("no_models_loaded", ModelNotFound, "no model loaded"),
        ("malformed", BadUpstreamResponse, "not JSON"),
        ("error500", UpstreamError, "Internal error"),
    ],
)
async def test_inference_failures_are_classified(mode: str, error: type[Exception], message: str) -> None:
    fake = FakeLMStudio(default_models())
    fake.mode = mode  # type: ignore[assignment]
    async with serve(fake.app) as url, LMStudioClient(url) as client:
        with pytest.raises(error, match=message):
            await client.post_json("/v1/chat/completions", {"model": CHAT_MODEL, "messages": []})


async def test_unknown_model_by_code() -> None:
    fake = FakeLMStudio(default_models())
    async with serve(fake.app) as url, LMStudioClient(url) as client:
        with pytest.raises(ModelNotFound, match="does not have this model"):
            await client.post_json("/v1/chat/completions", {"model": "nope/nope", "messages": []})


async def test_stream_yields_content_then_usage() -> None:
    fake = FakeLMStudio(default_models())
    async with serve(fake.app) as url, LMStudioClient(url) as client:
        body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}],
                "stream_options": {"include_usage": True}}
        async with client.stream("/v1/chat/completions", body) as chunks:
            received = [chunk async for chunk in chunks]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in received if c["choices"])
    assert text == "".join(fake.chunk_text)
    assert received[-1]["choices"] == [] and received[-1]["usage"]["completion_tokens"] == len(fake.chunk_text)


def _listing_app(listings: dict[str, Any]) -> Starlette:
    """Answers GET on each path with its JSON as it is now (escaped: it may hold lone surrogates); else 404."""

    async def answer(request: Request) -> Response:
        listing = listings.get(request.url.path)
        if listing is None:
            return JSONResponse({"error": {"message": "File Not Found", "code": 404}}, status_code=404)
        return Response(json.dumps(listing), media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", answer)])


@pytest.mark.parametrize(
    ("listing", "says"),
    [
        ({"models": "nope"}, "`models` is missing or not a list"),
        ({"models": [{"key": "a/b"}, ["c/d"]]}, "`models` holds an entry that is not an object"),
        ({"models": [{"key": 7}]}, "a model's `key` is not a usable name"),
        ({"models": [{"key": ""}]}, "a model's `key` is not a usable name"),
        ([1, 2], "`models` is missing or not a list"),
    ],
)
async def test_an_unreadable_listing_names_the_endpoint_and_what_is_wrong(listing: Any, says: str) -> None:
    async with serve(_listing_app({"/api/v1/models": listing})) as url, LMStudioClient(url) as client:
        with pytest.raises(BadUpstreamResponse) as caught:
            await client.list_models()
    # The garbled surface is named, not the poorer ones that do not exist (404).
    assert str(caught.value).startswith(f"LM Studio's answer from {url}/api/v1/models could not be read: {says}.")


async def test_listing_metadata_of_the_wrong_type_is_left_out() -> None:
    listing = {"models": [
        {"key": "a/b", "type": "llm", "display_name": 5, "max_context_length": "4096", "quantization": ["Q4"],
         "capabilities": ["vision"], "loaded_instances": {"id": "a/b"}, "publisher": "\ud800"},
        {"key": "c/d", "loaded_instances": [{"config": {"parallel": True, "context_length": 2048}}, "x"]},
        {"key": "a/b", "display_name": "listed twice"},
    ]}
    async with serve(_listing_app({"/api/v1/models": listing})) as url, LMStudioClient(url) as client:
        first, second = await client.list_models()
    assert first == ModelInfo("a/b", loaded=False)
    assert second == ModelInfo("c/d", loaded=True, context_length=2048, slots=4)  # `parallel: true` is no count


async def test_the_last_good_tools_stay_while_the_listing_is_unreadable() -> None:
    good = {"object": "list", "data": [{"id": CHAT_MODEL, "object": "model"}]}
    listing: dict[str, Any] = {"/v1/models": good}
    async with serve(_listing_app(listing)) as url, Bridge(bridge_settings(url)) as bridge:
        registry = bridge.registry
        assert await registry.refresh() and CHAT_TOOL in registry.tools
        listing["/v1/models"] = {"object": "list", "data": [{"id": None}]}
        assert not await registry.refresh()
        assert CHAT_TOOL in registry.tools and registry.reachable is False
        assert registry.last_error and "could not be read: a model's `id` is not a usable name" in registry.last_error
