"""The bridge's HTTP surface on a real uvicorn: /health (with what a gateway routes by), Host/Origin checks,
the optional bearer token, the gateway's request id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
from loguru import logger
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mcp_server.server import REQUEST_ID_META, Bridge
from tests.conftest import CHAT_MODEL, CHAT_TOOL, EMBED_TOOL, bridge_settings
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

pytestmark = pytest.mark.anyio

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def test_health_reports_lmstudio_and_the_catalog(lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with Bridge(bridge_settings(url)) as bridge, serve(bridge.http_app()) as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            with anyio.fail_after(10):
                while (response := await http.get("/health")).status_code != 200:
                    await anyio.sleep(0.1)
            body = response.json()
            assert body["status"] == "ok" and body["lmstudio"]["reachable"] is True
            assert body["lmstudio"]["api"] == "lmstudio-v1" and body["lmstudio"]["url"] == url
            assert body["lmstudio"]["last_poll"] and body["lmstudio"]["last_error"] is None
            assert body["models"] == 2 and set(body["tools"]) == {"list_models", CHAT_TOOL, EMBED_TOOL}
            version = body["catalog_version"]
            assert version >= 1
            fake.models.pop()
            with anyio.fail_after(10):
                while (body := (await http.get("/health")).json())["catalog_version"] == version:
                    await anyio.sleep(0.1)
            assert body["catalog_version"] > version and EMBED_TOOL not in body["tools"]


async def test_health_is_503_while_lmstudio_is_down(free_tcp_port: int) -> None:
    async with Bridge(bridge_settings(f"http://127.0.0.1:{free_tcp_port}")) as bridge, serve(bridge.http_app()) as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            with anyio.fail_after(10):
                while (response := await http.get("/health")).json()["lmstudio"]["last_error"] is None:
                    await anyio.sleep(0.1)
    assert response.status_code == 503
    assert response.json()["status"] == "degraded" and "not reachable" in response.json()["lmstudio"]["last_error"]


async def test_host_and_origin_checks(lmstudio: tuple[FakeLMStudio, str]) -> None:
    _, url = lmstudio
    settings = bridge_settings(url, allowed_hosts=["bridge:3000"], allowed_origins=["http://dashboard.example"])
    async with Bridge(settings) as bridge, serve(bridge.http_app()) as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            async def post(**headers: str) -> int:
                return (await http.post("/mcp", json=INIT, headers={**MCP_HEADERS, **headers})).status_code

            assert await post() == 200
            assert await post(Host="evil.example:3000") == 421  # DNS rebinding
            assert await post(Origin="http://evil.example") == 403
            assert await post(Host="bridge:3000") == 200  # a Compose service name, configured
            assert await post(Origin="http://dashboard.example") == 200


async def test_bridge_token_guards_mcp_but_not_health(lmstudio: tuple[FakeLMStudio, str]) -> None:
    _, url = lmstudio
    async with Bridge(bridge_settings(url, bridge_token="bridge-secret")) as bridge, serve(bridge.http_app()) as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            denied = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
            wrong = await http.post("/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": "Bearer nope"})
            assert denied.status_code == wrong.status_code == 401
            assert denied.headers["www-authenticate"] == "Bearer"
            assert (await http.get("/health")).status_code in (200, 503)
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer bridge-secret"}) as guarded:
            transport = streamable_http_client(f"{base}/mcp", http_client=guarded)
            async with Client(transport, mode="legacy") as client:
                assert any(t.name == "list_models" for t in (await client.list_tools()).tools)


async def test_closed_sessions_are_forgotten_and_connections_reused(lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    async with Bridge(bridge_settings(url)) as bridge, serve(bridge.http_app()) as base:
        for _ in range(5):
            async with Client(f"{base}/mcp", mode="legacy") as client:
                await client.list_tools()
                assert bridge.notifier.connected >= 1
        with anyio.fail_after(5):
            while bridge.notifier.connected:
                await anyio.sleep(0.05)
        async with Client(f"{base}/mcp", mode="legacy") as client:
            with anyio.fail_after(10):
                while CHAT_TOOL not in {t.name for t in (await client.list_tools()).tools}:
                    await anyio.sleep(0.1)
            for _ in range(3):
                assert not (await client.call_tool(CHAT_TOOL, {"prompt": "hi"})).is_error
    # One pooled connection carried all three streamed calls.
    assert len({r["client"] for r in fake.requests}) == 1 and len(fake.requests) == 3


SERVING_LISTING = {"models": [
    {"type": "llm", "key": "a/two-instances", "loaded_instances": [
        {"id": "a/two-instances", "config": {"parallel": 2}}, {"id": "a/two-instances:2", "config": {}}]},
    {"type": "llm", "key": "b/downloaded", "loaded_instances": []},
    {"type": "embedding", "key": "c/embed", "loaded_instances": [{"id": "c/embed", "config": {"context_length": 2048}}]},
]}


def _held_lmstudio(release: anyio.Event, started: list[str]) -> Starlette:
    """LM Studio's v1 listing (SERVING_LISTING), and generations that answer once `release` is set."""

    async def listing(_request: Request) -> JSONResponse:
        return JSONResponse(SERVING_LISTING)

    async def chat(request: Request) -> StreamingResponse:
        started.append((await request.json())["model"])

        async def body() -> AsyncIterator[str]:
            await release.wait()
            yield 'data: {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/api/v1/models", listing),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", chat, methods=["POST"]),
    ])


async def test_health_says_per_model_what_is_loaded_its_slots_and_calls_running() -> None:
    release, started = anyio.Event(), []
    settings = bridge_settings("http://unused", tools=["chat", "complete", "embed"], parallel_slots=3)
    async with serve(_held_lmstudio(release, started)) as url:
        settings = settings.model_copy(update={"lmstudio_url": url})
        async with Bridge(settings) as bridge, serve(bridge.http_app()) as base, httpx2.AsyncClient(base_url=base) as http:
            with anyio.fail_after(10):
                while (body := (await http.get("/health")).json())["models"] != 3:
                    await anyio.sleep(0.05)
            assert {"status", "version", "lmstudio", "models", "tools", "catalog_version"} <= body.keys()
            assert body["serving"] == [
                {"model": "a/two-instances", "tools": ["chat_a_two-instances", "complete_a_two-instances"],
                 "loaded": True, "slots": 6, "in_flight": 0},  # 2 + LM Studio's default 4
                {"model": "b/downloaded", "tools": ["chat_b_downloaded", "complete_b_downloaded"],
                 "loaded": False, "slots": 3, "in_flight": 0},  # LLM_HUB_PARALLEL_SLOTS
                {"model": "c/embed", "tools": ["embed_c_embed"], "loaded": True, "slots": 4, "in_flight": 0},
            ]
            async with Client(f"{base}/mcp", mode="auto") as client, anyio.create_task_group() as tg:
                for tool in ("chat_a_two-instances", "complete_a_two-instances", "chat_b_downloaded"):
                    tg.start_soon(client.call_tool, tool, {"prompt": "hi"})
                with anyio.fail_after(10):
                    while len(started) < 3:
                        await anyio.sleep(0.02)
                running = {s["model"]: s["in_flight"] for s in (await http.get("/health")).json()["serving"]}
                assert running == {"a/two-instances": 2, "b/downloaded": 1, "c/embed": 0}
                release.set()
            running = {s["model"]: s["in_flight"] for s in (await http.get("/health")).json()["serving"]}
            assert running == {"a/two-instances": 0, "b/downloaded": 0, "c/embed": 0}


@pytest.mark.parametrize(("surface", "loaded"), [("v0", {CHAT_MODEL: True, "x/downloaded": False}),
                                                  ("openai", {CHAT_MODEL: True, "x/downloaded": True})])
async def test_serving_where_lmstudio_reports_no_slots(surface: str, loaded: dict[str, bool]) -> None:
    # v0 tells loaded state but not slots; the OpenAI listing tells neither, and serves what it lists.
    fake = FakeLMStudio([FakeModel(CHAT_MODEL), FakeModel("x/downloaded", loaded=False)], surface=surface)  # type: ignore[arg-type]
    async with serve(fake.app) as url, Bridge(bridge_settings(url, parallel_slots=7)) as bridge:
        async with serve(bridge.http_app()) as base, httpx2.AsyncClient(base_url=base) as http:
            with anyio.fail_after(10):
                while len(serving := (await http.get("/health")).json()["serving"]) < 2:
                    await anyio.sleep(0.05)
    assert {s["model"]: (s["loaded"], s["slots"]) for s in serving} == {m: (up, 7) for m, up in loaded.items()}


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("Bearer bridge-secret", 200),
        ("bearer bridge-secret", 200),  # RFC 7235: the scheme is case-insensitive
        ("BEARER   bridge-secret", 200),
        ("Bearer\tbridge-secret", 200),
        ("Bearer", 401),
        ("Bearerbridge-secret", 401),
        ("Basic bridge-secret", 401),
        ("Bearer bridge-secret extra", 401),
        ("Bearer bridge-secretx", 401),
        ("Bearer bridge-secre", 401),
    ],
)
async def test_bridge_token_is_read_as_rfc_7235_says(
    authorization: str, status: int, lmstudio: tuple[FakeLMStudio, str]
) -> None:
    _, url = lmstudio
    async with Bridge(bridge_settings(url, bridge_token="bridge-secret")) as bridge, serve(bridge.http_app()) as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            response = await http.post("/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": authorization})
            assert response.status_code == status
            twice = [("authorization", "Bearer bridge-secret"), ("authorization", "Bearer bridge-secret")]
            doubled = await http.post("/mcp", json=INIT, headers=[*MCP_HEADERS.items(), *twice])
            assert doubled.status_code == 401  # two credentials are one too many


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_request_id_from_meta_or_a_sane_header_reaches_the_log(mode: str, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda message: records.append(message.record), level="INFO")
    try:
        async with Bridge(bridge_settings(url)) as bridge, serve(bridge.http_app()) as base:
            for header, meta, expected in [
                ("gw-1:a.b_c", None, "gw-1:a.b_c"),
                ("gw-1", "meta-2", "meta-2"),  # `_meta` first: the gateway's own field
                ("has spaces", None, None),
                ("x" * 129, None, None),
            ]:
                async with httpx2.AsyncClient(headers={"X-Request-ID": header}) as http:
                    transport = streamable_http_client(f"{base}/mcp", http_client=http)
                    async with Client(transport, mode=mode) as client:
                        await _wait_until_listed(client)
                        del records[:]
                        meta_arg = {REQUEST_ID_META: meta} if meta else None
                        assert not (await client.call_tool(CHAT_TOOL, {"prompt": "hi"}, meta=meta_arg)).is_error
                done = [r for r in records if " done in " in r["message"]]
                assert len(done) == 1 and done[0]["extra"].get("request_id") == expected, (header, done)
    finally:
        logger.remove(sink)
    assert fake.requests


async def _wait_until_listed(client: Client) -> None:
    with anyio.fail_after(10):
        while CHAT_TOOL not in {t.name for t in (await client.list_tools()).tools}:
            await anyio.sleep(0.05)
