"""The bridge's OpenAI relay (`mcp_server/openai_relay.py`) on a real uvicorn: guarded like /mcp,
LM Studio's token added, bytes passed on unchanged, LM Studio's failures as OpenAI error envelopes,
and a caller that leaves closing LM Studio's request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mcp_server.server import Bridge
from tests.conftest import CHAT_MODEL, EMBED_MODEL, bridge_settings, default_models
from tests.fake_lmstudio import FakeLMStudio, serve

pytestmark = pytest.mark.anyio

TOKEN = "bridge-token-for-relay"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def relay_bridge(lmstudio_url: str, **settings: Any) -> AsyncIterator[httpx2.AsyncClient]:
    """A bridge's HTTP app in front of `lmstudio_url`, and a client for it that sends the bridge token."""
    async with (
        Bridge(bridge_settings(lmstudio_url, bridge_token=TOKEN, **settings)) as bridge,
        serve(bridge.http_app()) as base,
        httpx2.AsyncClient(base_url=base, headers=AUTH, timeout=30) as http,
    ):
        yield http


def _envelope(response: httpx2.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


async def test_every_endpoint_is_relayed_with_the_bridge_token_required(lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with relay_bridge(url) as http:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            refused = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert _envelope(refused)["code"] == "invalid_api_key"
        assert fake.requests == []  # nothing reached LM Studio

        listed = await http.get("/v1/models")
        assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {CHAT_MODEL, EMBED_MODEL}
        chat = await http.post("/v1/chat/completions", json=CHAT)
        assert chat.json()["choices"][0]["message"]["content"] == "Hello from the fake model."
        assert chat.headers["x-llm-hub-source"] == "lmstudio"
        completion = await http.post("/v1/completions", json={"model": CHAT_MODEL, "prompt": "Once"})
        assert completion.json()["choices"][0]["text"] == "Hello from the fake model."
        embedding = await http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": ["a", "b"]})
        assert [len(item["embedding"]) for item in embedding.json()["data"]] == [8, 8]
        # LM Studio's own errors are relayed as they are, status included.
        missing = await http.post("/v1/chat/completions", json={**CHAT, "model": "no/such"})
        assert missing.status_code == 404 and _envelope(missing)["code"] == "model_not_found"
        assert missing.headers["x-llm-hub-source"] == "lmstudio"
        assert [r["path"] for r in fake.requests] == [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/chat/completions",
        ]
        # The bridge token is the bridge's: it never reaches LM Studio.
        assert all("authorization" not in r["headers"] for r in fake.requests)


async def test_host_and_origin_are_checked_like_mcp(lmstudio: tuple[FakeLMStudio, str]) -> None:
    _, url = lmstudio
    async with relay_bridge(url) as http:
        assert (await http.get("/v1/models", headers={"Host": "evil.example:3000"})).status_code == 421
        assert (await http.get("/v1/models", headers={"Origin": "http://evil.example"})).status_code == 403


async def test_lmstudio_token_is_added() -> None:
    fake = FakeLMStudio(default_models(), token="lm-studio-secret")
    async with serve(fake.app) as url, relay_bridge(url, lmstudio_api_token="lm-studio-secret") as http:
        answer = await http.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200
        assert fake.requests[-1]["headers"]["authorization"] == "Bearer lm-studio-secret"


# Odd but valid SSE: CRLF line ends, a comment, spacing no JSON encoder here would write.
RAW_STREAM = [
    b": keep-alive\r\n\r\n",
    b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"He"}}]}\r\n\r\n',
    b'data:  {"id" : "x", "choices":[{"index":0,"delta":{"content":"llo \\u00e9"}}]}\r\n\r\n',
    b"data: [DONE]\r\n\r\n",
]


def _canned_lmstudio() -> Starlette:
    async def chat(request: Request) -> Response:
        if (await request.json()).get("stream"):

            async def pieces() -> AsyncIterator[bytes]:
                for piece in RAW_STREAM:
                    yield piece

            return StreamingResponse(pieces(), media_type="text/event-stream")
        return Response(b'{ "odd" :  "spacing",\n "usage": {"prompt_tokens": 1} }', media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def test_bytes_reach_the_caller_unchanged() -> None:
    async with serve(_canned_lmstudio()) as url, relay_bridge(url) as http:
        whole = await http.post("/v1/chat/completions", json=CHAT)
        assert whole.content == b'{ "odd" :  "spacing",\n "usage": {"prompt_tokens": 1} }'
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            received = b"".join([chunk async for chunk in streamed.aiter_raw()])
        assert received == b"".join(RAW_STREAM)


async def test_lmstudio_failures_are_openai_errors(lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with relay_bridge("http://127.0.0.1:9") as http:
        down = await http.post("/v1/chat/completions", json=CHAT)
        assert down.status_code == 503 and down.headers["x-llm-hub-source"] == "bridge"
        error = _envelope(down)
        assert error["code"] == "lmstudio_unreachable" and "LMSTUDIO_URL" in error["message"]
    async with relay_bridge(url, request_timeout=0.5) as http:
        fake.mode = "slow"
        slow = await http.post("/v1/chat/completions", json=CHAT)
        assert slow.status_code == 504 and _envelope(slow)["code"] == "lmstudio_timeout"
        assert "LLM_HUB_REQUEST_TIMEOUT" in _envelope(slow)["message"]
        fake.mode = "die_midstream"  # a whole answer cut off before it was all there: nothing was sent yet
        cut = await http.post("/v1/chat/completions", json=CHAT)
        assert cut.status_code == 502 and _envelope(cut)["code"] == "lmstudio_failed"
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
            events = [line async for line in streamed.aiter_lines() if line.startswith("data:")]
        assert streamed.status_code == 200 and len(events) >= 2  # what had come, then why it ended
        assert json.loads(events[-1][5:])["error"]["code"] == "lmstudio_failed"
        fake.mode = "error500"  # LM Studio's own 500 is its answer, passed on as such
        failed = await http.post("/v1/chat/completions", json=CHAT)
        assert failed.status_code == 500 and failed.headers["x-llm-hub-source"] == "lmstudio"


async def test_a_caller_that_leaves_closes_lmstudios_request(lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    fake.chunk_text = [f"w{i} " for i in range(400)]
    fake.chunk_delay = 0.05
    async with relay_bridge(url) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
            async for line in streamed.aiter_lines():
                if line.startswith("data:") and "w0" in line:
                    break
        with anyio.fail_after(20):
            await fake.disconnected.wait()
        assert fake.disconnects == 1


async def test_relay_logs_hold_no_prompt_and_carry_the_request_id(lmstudio: tuple[FakeLMStudio, str]) -> None:
    _, url = lmstudio
    secret = "a-distinctive-prompt-4711"
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", format="{message} {extra}")
    try:
        async with relay_bridge(url) as http:
            body = {**CHAT, "messages": [{"role": "user", "content": secret}]}
            answer = await http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "relay-id-1"})
            assert answer.is_success
    finally:
        logger.remove(sink)
    logged = "".join(lines)
    assert any("relay POST /v1/chat/completions: 200" in line and "relay-id-1" in line for line in lines), logged
    assert secret not in logged and TOKEN not in logged
