"""The bridge's HTTP surface on a real uvicorn: /health, Host/Origin checks, the optional bearer token."""

from __future__ import annotations

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_server.server import Bridge
from tests.conftest import CHAT_TOOL, EMBED_TOOL, bridge_settings
from tests.fake_lmstudio import FakeLMStudio, serve

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
