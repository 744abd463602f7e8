"""The gateway as a real process in front of two real bridge processes, each on its own fake LM
Studio with different models, driven by the SDK's Client in both eras and by plain HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from openapi_spec_validator import validate

from tests.conftest import bridge_process, free_port, gateway_process
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

pytestmark = pytest.mark.anyio

KEY = "gw-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHARED, ALPHA, BETA = "chat_shared_model", "chat_alpha_only", "chat_beta_only"


@dataclass
class Topology:
    fakes: dict[str, FakeLMStudio]
    fake_urls: dict[str, str]
    bridge_ports: dict[str, int]
    bridges: dict[str, anyio.abc.Process]
    gateway: str
    logs: Path
    stack: AsyncExitStack
    bridge_env: dict[str, str] = field(default_factory=dict)

    def bridge_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.bridge_ports[name]}"

    async def kill(self, name: str) -> None:
        process = self.bridges[name]
        process.kill()
        await process.wait()

    async def restart(self, name: str) -> None:
        self.bridges[name] = await self.stack.enter_async_context(
            bridge_process(self.fake_urls[name], self.bridge_ports[name], self.logs / f"bridge-{name}.log",
                           **self.bridge_env)
        )

    def served_by(self, name: str) -> int:
        return len(self.fakes[name].requests)


@asynccontextmanager
async def topology(tmp_path: Path, gateway_env: dict[str, str] | None = None,
                   bridge_env: dict[str, str] | None = None, fakes: dict[str, FakeLMStudio] | None = None,
                   tools: set[str] | None = None) -> AsyncIterator[Topology]:
    """A gateway in front of one bridge per fake (by default "a" and "b"), ready once `tools` are listed."""
    fakes = fakes or {
        "a": FakeLMStudio([FakeModel("shared/model"), FakeModel("alpha/only")]),
        "b": FakeLMStudio([FakeModel("shared/model"), FakeModel("beta/only")]),
    }
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(serve(fake.app)) for name, fake in fakes.items()}
        ports = {name: free_port() for name in fakes}
        bridge_env = bridge_env or {}
        bridges = {
            name: await stack.enter_async_context(
                bridge_process(urls[name], ports[name], tmp_path / f"bridge-{name}.log", **bridge_env)
            )
            for name in fakes
        }
        gateway_port = free_port()
        env = {"LLM_HUB_API_KEYS": f"tester:{KEY}", **(gateway_env or {})}
        await stack.enter_async_context(
            gateway_process([f"http://127.0.0.1:{p}" for p in ports.values()], gateway_port,
                            tmp_path / "gateway.log", **env)
        )
        top = Topology(fakes, urls, ports, bridges, f"http://127.0.0.1:{gateway_port}", tmp_path, stack, bridge_env)
        await wait_for_tools(top, {SHARED, ALPHA, BETA} if tools is None else tools)
        yield top


async def rest_tools(top: Topology) -> set[str]:
    """The tools some healthy bridge can serve now."""
    async with httpx2.AsyncClient(headers=AUTH) as http:
        return {t["name"] for t in (await http.get(f"{top.gateway}/v1/tools")).json()["tools"] if t["available"]}


async def wait_for_tools(top: Topology, wanted: set[str], absent: set[str] = frozenset(), timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while True:
            names = await rest_tools(top)
            if wanted <= names and not (absent & names):
                return
            await anyio.sleep(0.1)


@asynccontextmanager
async def gateway_client(top: Topology, mode: str, **kwargs: Any) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers=AUTH, timeout=60) as http:
        async with Client(streamable_http_client(f"{top.gateway}/mcp", http_client=http), mode=mode, **kwargs) as c:
            yield c


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_union_round_robin_and_routing(tmp_path: Path, mode: str) -> None:
    async with topology(tmp_path) as top, gateway_client(top, mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {SHARED, ALPHA, BETA, "list_models"} <= names
        for _ in range(4):
            result = await client.call_tool(SHARED, {"prompt": "hi"})
            assert not result.is_error, _text(result)
        assert top.served_by("a") == 2 and top.served_by("b") == 2  # round-robin over both
        assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
        assert not (await client.call_tool(BETA, {"prompt": "hi"})).is_error
        assert top.fakes["a"].requests[-1]["json"]["model"] == "alpha/only"
        assert top.fakes["b"].requests[-1]["json"]["model"] == "beta/only"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_progress_streams_end_to_end_and_cancellation_reaches_the_bridge(tmp_path: Path, mode: str) -> None:
    async with topology(tmp_path) as top, gateway_client(top, mode) as client:
        for fake in top.fakes.values():
            fake.chunk_delay = 0.05
        updates: list[str | None] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append(message)

        result = await client.call_tool(ALPHA, {"prompt": "hi"}, progress_callback=on_progress)
        assert not result.is_error
        assert len(updates) >= 3 and "".join(m or "" for m in updates) == _text(result)

        fake = top.fakes["a"]
        fake.chunk_text = [f"w{i} " for i in range(400)]
        first = anyio.Event()

        async def first_progress(progress: float, total: float | None, message: str | None) -> None:
            first.set()

        async with anyio.create_task_group() as tg:
            async def call() -> None:
                await client.call_tool(ALPHA, {"prompt": "count"}, progress_callback=first_progress)

            tg.start_soon(call)
            with anyio.fail_after(10):
                await first.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(10):
            await fake.disconnected.wait()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_list_changed_reaches_gateway_clients(tmp_path: Path, mode: str) -> None:
    heard = anyio.Event()
    resources_heard: list[Any] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            heard.set()
        elif isinstance(message, types.ResourceListChangedNotification):
            resources_heard.append(message)  # the gateway has no resources: it must not say they changed

    async with topology(tmp_path) as top, gateway_client(top, mode, message_handler=on_message) as client:
        await client.list_tools()
        if client.protocol_version.startswith("2026"):
            async with client.listen(tools_list_changed=True) as sub:
                top.fakes["b"].models.append(FakeModel("gamma/new"))
                with anyio.fail_after(15):
                    async for _event in sub:
                        break
        else:
            top.fakes["b"].models.append(FakeModel("gamma/new"))
            with anyio.fail_after(15):
                await heard.wait()
        names = {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}
        assert "chat_gamma_new" in names
        assert client.server_capabilities is not None and client.server_capabilities.resources is None
    assert resources_heard == []


async def test_killed_bridge_is_ejected_and_readmitted(tmp_path: Path) -> None:
    async with topology(tmp_path) as top, gateway_client(top, "legacy") as client:
        await top.kill("a")
        async with httpx2.AsyncClient(headers=AUTH) as http:
            with anyio.fail_after(20):  # its tools stay listed, marked unavailable, for the grace period
                while True:
                    tools = {t["name"]: t for t in (await http.get(f"{top.gateway}/v1/tools")).json()["tools"]}
                    if tools[ALPHA]["available"] is False:
                        break
                    await anyio.sleep(0.1)
            assert tools[SHARED]["available"] and tools[BETA]["available"]
            assert "not reachable" in tools[ALPHA]["unavailable_reason"]
            states = {b["url"]: b for b in (await http.get(f"{top.gateway}/v1/bridges")).json()["bridges"]}
            assert states[top.bridge_url("a")]["healthy"] is False and states[top.bridge_url("a")]["last_error"]
            assert states[top.bridge_url("b")]["healthy"] is True
            assert (await http.get(f"{top.gateway}/health")).status_code == 200
            refused = await http.post(f"{top.gateway}/v1/tools/{ALPHA}", json={"prompt": "hi"})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert top.bridge_url("a").split("://")[1] in refused.json()["error"]
        unavailable = await client.call_tool(ALPHA, {"prompt": "hi"})
        assert unavailable.is_error and "No bridge can take" in _text(unavailable)
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert (listed[ALPHA].meta or {}).get("llm-hub/available") is False
        before = top.served_by("b")
        for _ in range(3):
            assert not (await client.call_tool(SHARED, {"prompt": "hi"})).is_error
        assert top.served_by("b") == before + 3

        await top.restart("a")
        await wait_for_tools(top, {SHARED, ALPHA, BETA})
        assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error


async def test_call_retried_once_on_another_bridge_before_streaming(tmp_path: Path) -> None:
    # Health checks far apart: the gateway learns of the dead bridge only from the failed call.
    async with topology(tmp_path, {"LLM_HUB_HEALTH_INTERVAL": "60"}) as top, gateway_client(top, "legacy") as client:
        await top.kill("a")
        for _ in range(2):
            result = await client.call_tool(SHARED, {"prompt": "hi"})
            assert not result.is_error, _text(result)
        assert top.served_by("b") == 2 and top.served_by("a") == 0
        async with httpx2.AsyncClient(headers=AUTH) as http:
            states = {b["url"]: b for b in (await http.get(f"{top.gateway}/v1/bridges")).json()["bridges"]}
        assert states[top.bridge_url("a")]["healthy"] is False


async def test_bridge_dying_mid_stream_ends_with_a_clear_error(tmp_path: Path) -> None:
    async with topology(tmp_path, {"LLM_HUB_HEALTH_INTERVAL": "60"}) as top, gateway_client(top, "legacy") as client:
        for fake in top.fakes.values():
            fake.chunk_text = [f"w{i} " for i in range(200)]
            fake.chunk_delay = 0.05
        streaming = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            streaming.set()

        async with anyio.create_task_group() as tg:
            outcome: list[types.CallToolResult] = []

            async def call() -> None:
                outcome.append(await client.call_tool(SHARED, {"prompt": "long"}, progress_callback=on_progress))

            tg.start_soon(call)
            with anyio.fail_after(10):
                await streaming.wait()
            await top.kill("a" if top.served_by("a") else "b")
        result = outcome[0]
        assert result.is_error
        assert "already started streaming" in _text(result)
        assert top.served_by("a") + top.served_by("b") == 1  # not retried


async def test_rest_json_sse_bridges_and_openapi(tmp_path: Path) -> None:
    async with topology(tmp_path) as top, httpx2.AsyncClient(base_url=top.gateway, headers=AUTH, timeout=30) as http:
        tools = (await http.get("/v1/tools")).json()["tools"]
        shared = next(t for t in tools if t["name"] == SHARED)
        assert "prompt" in shared["inputSchema"]["properties"]

        answer = await http.post(f"/v1/tools/{ALPHA}", json={"prompt": "hi"}, headers={"X-Request-ID": "trace-abc-123"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-abc-123"
        with anyio.fail_after(5):  # the same id is in the bridge's log line for that call
            while "trace-abc-123" not in (top.logs / "bridge-a.log").read_text():
                await anyio.sleep(0.1)
        body = answer.json()
        assert body["structuredContent"]["model"] == "alpha/only" and not body.get("isError")

        events: list[tuple[str, Any]] = []
        async with http.stream("POST", f"/v1/tools/{ALPHA}", json={"prompt": "hi"},
                               headers={"Accept": "text/event-stream"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            async for line in stream.aiter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and name:
                    events.append((name, json.loads(line.split(":", 1)[1])))
        kinds = [k for k, _ in events]
        assert kinds[-1] == "result" and kinds.count("progress") >= 1
        streamed = "".join(data["message"] for kind, data in events if kind == "progress")
        assert streamed == events[-1][1]["structuredContent"]["text"]

        assert (await http.post(f"/v1/tools/{ALPHA}", content=b"not json")).status_code == 400
        assert (await http.post("/v1/tools/chat_nope", json={})).status_code == 404
        bad = await http.post(f"/v1/tools/{ALPHA}", json={"prompt": 5})
        assert bad.status_code == 200 and bad.json()["isError"] is True and "prompt" in bad.json()["content"][0]["text"]

        bridges = (await http.get("/v1/bridges")).json()["bridges"]
        assert {b["url"] for b in bridges} == {top.bridge_url("a"), top.bridge_url("b")}
        assert all(b["healthy"] and b["latency_ms"] is not None and b["tools"] for b in bridges)

        document = (await http.get("/openapi.json")).json()
        validate(document)
        assert {"/v1/tools", "/v1/tools/{name}", "/v1/bridges", "/health"} <= set(document["paths"])

        metrics = (await http.get("/metrics")).text
        assert 'llm_hub_tool_calls_total{' in metrics and "alpha" in metrics


async def test_auth_on_every_route_but_health(tmp_path: Path) -> None:
    async with topology(tmp_path) as top, httpx2.AsyncClient(base_url=top.gateway) as http:
        assert (await http.get("/health")).status_code == 200
        for path in ("/v1/tools", "/v1/bridges", "/metrics", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": "Bearer"}):
                response = await http.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
            assert (await http.get(path, headers=AUTH)).status_code == 200
        denied = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert denied.status_code == 401
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer wrong"}) as wrong_key:
            with pytest.raises(BaseException) as caught:  # an MCP client shows why
                async with Client(streamable_http_client(f"{top.gateway}/mcp", http_client=wrong_key), mode="legacy"):
                    pass
        error = caught.value
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        assert isinstance(error, MCPError) and "Unknown API key" in str(error)
        # Refusals are logged in aggregate, outside any request: a call's line carries its request id.
        assert (await http.post(f"/v1/tools/{ALPHA}", json={"prompt": "hi"}, headers=AUTH)).status_code == 200
    logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert KEY not in logged
    assert '"request_id"' in (tmp_path / "gateway.log").read_text()


async def test_bridge_token_is_sent_and_the_client_key_is_not(tmp_path: Path) -> None:
    token = "bridge-only-token-42"
    async with topology(tmp_path, {"LLM_HUB_BRIDGE_TOKEN": token}, {"LLM_HUB_BRIDGE_TOKEN": token}) as top:
        async with gateway_client(top, "legacy") as client:
            assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
        async with httpx2.AsyncClient() as http:  # the client's key does not open a bridge
            response = await http.post(f"{top.bridge_url('a')}/mcp", headers=AUTH,
                                       json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert response.status_code == 401


async def test_gateway_refuses_to_start_without_keys(tmp_path: Path) -> None:
    from tests.conftest import gateway_command

    result = await anyio.run_process([gateway_command(), "--bridge", "http://127.0.0.1:9"], check=False,
                                     env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert b"LLM_HUB_API_KEYS" in result.stderr and b"LLM_HUB_AUTH_DISABLED" in result.stderr


async def test_llm_hub_up_runs_bridge_and_gateway_together(tmp_path: Path) -> None:
    from tests.conftest import llm_hub_command, service

    fake = FakeLMStudio([FakeModel("alpha/only")])
    gateway_port, bridge_port = free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "LLM_HUB_API_KEYS": f"tester:{KEY}", "LLM_HUB_LOG_FORMAT": "json"}
    async with serve(fake.app) as url:
        command = [llm_hub_command(), "up", "--port", str(gateway_port), "--bridge-port", str(bridge_port),
                   "--lmstudio-url", url]
        async with service(command, env, f"http://127.0.0.1:{gateway_port}/health", tmp_path / "up.log", ready=(200,)):
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}", headers=AUTH) as http:
                answer = await http.post(f"/v1/tools/{ALPHA}", json={"prompt": "hi"})
                assert answer.status_code == 200 and answer.json()["structuredContent"]["text"]
                # The bridge listens on loopback behind a token only the gateway knows.
                direct = await http.post(f"http://127.0.0.1:{bridge_port}/mcp", json={})
                assert direct.status_code == 401
    assert KEY not in (tmp_path / "up.log").read_text()
