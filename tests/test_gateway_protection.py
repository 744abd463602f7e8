"""The gateway protecting itself, with real processes: sessions capped per key and expiring when idle, 503
rather than an ejected bridge when descriptors run out, unknown keys logged in aggregate, a frozen Redis
costing one timeout, 405 for wrong methods, and heartbeats for calls that wait for a connection.

Calls are held by the fakes' gate (before their last piece), so "in flight" is a fact the tests wait for;
outcomes are counted, and only the Redis test bounds a time, by the timeout the issue asks it to respect.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from loguru import logger
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.auth import ApiKeyAuth, FailureTally
from gateway.upstream import PROTOCOL_VERSION, modern_meta
from tests.conftest import bridge_process, clear_of_minute_boundary, free_port, gateway_command, redis_server, service
from tests.fake_lmstudio import DEFAULT_CHUNKS, FakeLMStudio, FakeModel, serve
from tests.test_gateway_calls_e2e import bridge_states, ejections, held, hold, release, until
from tests.test_gateway_e2e import ALPHA, AUTH, KEY, SHARED, Topology, gateway_client, topology

pytestmark = pytest.mark.anyio

ANSWER = "".join(DEFAULT_CHUNKS)
OTHER_KEY = "gw-other-key-9876543210fedcba"
TWO_KEYS = {"LLM_HUB_API_KEYS": f"tester:{KEY},other:{OTHER_KEY}"}
LIMITS = {"LLM_HUB_RATE_LIMIT": "100000/minute", "LLM_HUB_REQUEST_LIMIT": "100000/minute"}
HANDSHAKE_VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def errors_logged(logs: Path) -> list[str]:
    """The gateway's ERROR lines: a refusal is never one, nor is a bug hidden behind a complete answer."""
    return [line for line in (logs / "gateway.log").read_text().splitlines() if '"level": "ERROR"' in line]


# -- raw MCP over HTTP, light enough for hundreds of streams in one test process ------------------------


def initialize_body() -> dict[str, Any]:
    params = {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}
    return {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}


def session_headers(session: str) -> dict[str, str]:
    return {**AUTH, "Accept": ACCEPT, "Mcp-Session-Id": session, "MCP-Protocol-Version": HANDSHAKE_VERSION}


async def initialize(http: httpx2.AsyncClient, key: str) -> httpx2.Response:
    """A handshake-era `initialize`, never followed by a DELETE: the session stays open."""
    return await http.post("/mcp", json=initialize_body(), headers={**bearer(key), "Accept": ACCEPT})


@dataclass
class Stream:
    """What the caller of one streamed call saw."""

    status: int | None = None
    heartbeats: int = 0  # progress without text
    pieces: int = 0
    text: str = ""
    done: bool = False
    error: str = ""

    @property
    def started(self) -> bool:
        return self.status is not None and (self.status != 200 or self.heartbeats + self.pieces > 0)


async def read_sse(response: httpx2.Response, stream: Stream) -> None:
    """Progress and the result of an MCP call answered as SSE (a JSON answer is read whole)."""
    stream.status = response.status_code
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        await response.aread()
        stream.error = response.text[:300]
        return
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        message = json.loads(line[5:])
        if message.get("method") == "notifications/progress":
            if message["params"].get("message"):
                stream.pieces += 1
            else:
                stream.heartbeats += 1
        elif "result" in message:
            result = message["result"]
            stream.text = "".join(c.get("text", "") for c in result.get("content", []))
            stream.error = "" if not result.get("isError") else stream.text
            return
        elif "error" in message:
            stream.error = message["error"]["message"]
            return


async def modern_call(http: httpx2.AsyncClient, tool: str, prompt: str, stream: Stream) -> None:
    """A 2026-07-28 `tools/call` with a progress token: the gateway's fast path."""
    params = {"name": tool, "arguments": {"prompt": prompt}, "_meta": modern_meta({"progressToken": 1})}
    headers = {
        **AUTH,
        "Accept": ACCEPT,
        "MCP-Protocol-Version": PROTOCOL_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": tool,
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    async with http.stream("POST", "/mcp", json=body, headers=headers) as response:
        await read_sse(response, stream)


async def handshake_call(http: httpx2.AsyncClient, tool: str, prompt: str, stream: Stream) -> None:
    """A handshake-era session (initialize, initialized) and one `tools/call` on it, served by the SDK."""
    opened = await initialize(http, KEY)
    if opened.status_code != 200:
        stream.status, stream.error = opened.status_code, opened.text[:300]
        return
    headers = {
        **AUTH,
        "Accept": ACCEPT,
        "Mcp-Session-Id": opened.headers["mcp-session-id"],
        "MCP-Protocol-Version": HANDSHAKE_VERSION,
    }
    ready = await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    if ready.status_code != 202:
        stream.status, stream.error = ready.status_code, ready.text[:300]
        return
    params = {"name": tool, "arguments": {"prompt": prompt}, "_meta": {"progressToken": 1}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    async with http.stream("POST", "/mcp", json=body, headers=headers) as response:
        await read_sse(response, stream)


async def rest_call(http: httpx2.AsyncClient, tool: str, prompt: str, stream: Stream) -> None:
    """`POST /v1/tools/{name}` answered as SSE: `progress` events, then `result`."""
    headers = {**AUTH, "Accept": "text/event-stream"}
    async with http.stream("POST", f"/v1/tools/{tool}", json={"prompt": prompt}, headers=headers) as response:
        stream.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            stream.error = response.text[:300]
            return
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "progress":
                if json.loads(line[5:])["message"]:
                    stream.pieces += 1
                else:
                    stream.heartbeats += 1
            elif line.startswith("data:") and event == "result":
                result = json.loads(line[5:])
                stream.text = result["structuredContent"]["text"] if not result.get("isError") else ""
                stream.error = "" if not result.get("isError") else json.dumps(result)[:300]
                return


Call = Callable[[httpx2.AsyncClient, str, str, Stream], Any]


def start(tg: anyio.abc.TaskGroup, call: Call, http: httpx2.AsyncClient, tool: str, label: str) -> Stream:
    stream = Stream()

    async def run() -> None:
        try:
            await call(http, tool, label, stream)
        except Exception as exc:  # noqa: BLE001 - recorded; the test judges
            stream.error = f"{type(exc).__name__}: {exc}"
        stream.done = True

    tg.start_soon(run)
    return stream


def raw_client(base: str, connections: int = 16) -> httpx2.AsyncClient:
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx2.AsyncClient(base_url=base, timeout=httpx2.Timeout(120, pool=120), limits=limits)


# -- sessions -------------------------------------------------------------------------------------------


async def test_a_key_opening_sessions_without_end_is_stopped_at_its_cap_while_others_connect(tmp_path: Path) -> None:
    env = {**TWO_KEYS, **LIMITS, "LLM_HUB_MAX_SESSIONS_PER_KEY": "5"}
    async with topology(tmp_path, env) as top, raw_client(top.gateway) as http:
        responses: list[httpx2.Response] = []

        async def one() -> None:
            responses.append(await initialize(http, KEY))

        async with anyio.create_task_group() as tg:  # a burst: the cap holds under concurrency too
            for _ in range(12):
                tg.start_soon(one)
        opened = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(opened) == 5 and all(r.headers.get("mcp-session-id") for r in opened)
        assert {r.status_code for r in refused} == {429}, [r.text for r in refused]
        error = refused[0].json()["error"]
        assert "LLM_HUB_MAX_SESSIONS_PER_KEY" in error["message"] and "'tester'" in error["message"], error
        assert int(refused[0].headers["retry-after"]) >= 1

        # Another key's handshake-era client connects and calls; this key's 2026-era clients hold no session.
        async with httpx2.AsyncClient(headers=bearer(OTHER_KEY), timeout=60) as other_http:
            from mcp import Client
            from mcp.client.streamable_http import streamable_http_client

            async with Client(
                streamable_http_client(f"{top.gateway}/mcp", http_client=other_http), mode="legacy"
            ) as other:
                assert not other.protocol_version.startswith("2026")
                assert not (await other.call_tool(ALPHA, {"prompt": "hi"})).is_error
        async with gateway_client(top, "auto") as modern:
            assert not (await modern.call_tool(ALPHA, {"prompt": "hi"})).is_error

        # A session serves only the key that opened it; a deleted one frees its place.
        session = opened[0].headers["mcp-session-id"]
        foreign = await http.delete("/mcp", headers={**bearer(OTHER_KEY), "Mcp-Session-Id": session})
        assert foreign.status_code == 404
        assert (await initialize(http, KEY)).status_code == 429
        deleted = await http.delete(
            "/mcp", headers={**AUTH, "Mcp-Session-Id": session, "MCP-Protocol-Version": HANDSHAKE_VERSION}
        )
        assert deleted.status_code == 200, deleted.text
        assert (await initialize(http, KEY)).status_code == 200
        assert (await initialize(http, KEY)).status_code == 429
    assert not errors_logged(tmp_path)


async def test_idle_sessions_expire_and_free_their_place(tmp_path: Path) -> None:
    env = {**LIMITS, "LLM_HUB_MAX_SESSIONS_PER_KEY": "3", "LLM_HUB_SESSION_IDLE_TIMEOUT": "2"}
    async with topology(tmp_path, env) as top, raw_client(top.gateway) as http:
        sessions: list[str] = []
        async with AsyncExitStack() as listening:
            for _ in range(3):
                sessions.append((await initialize(http, KEY)).headers["mcp-session-id"])
                headers = {**session_headers(sessions[-1]), "Accept": "text/event-stream"}
                stream = await listening.enter_async_context(http.stream("GET", "/mcp", headers=headers))
                assert stream.status_code == 200
            # A session with its stream open is not idle, however long this takes.
            assert (await initialize(http, KEY)).status_code == 429
        opened = 0

        async def opens_again() -> bool:
            nonlocal opened
            opened += (await initialize(http, KEY)).status_code == 200
            return opened == 3

        # Three new sessions: the three idle ones expired here, and so (a moment earlier) in the SDK.
        await until(opens_again, "new sessions once the idle ones expired", timeout=30)
        for session in sessions:
            stale = await http.post(
                "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=session_headers(session)
            )
            assert stale.status_code == 404, stale.text
    assert not errors_logged(tmp_path)


# -- descriptors ------------------------------------------------------------------------------------------

DESCRIPTOR_LIMIT = 1024
# Sets the limit, then becomes the gateway: the raise to the hard limit at start cannot help.
_LIMITED = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n})); os.execv(sys.argv[1], sys.argv[1:])"


@asynccontextmanager
async def limited_gateway(bridges: list[str], log: Path, **env: str) -> AsyncIterator[str]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
    values = {
        "LLM_HUB_BRIDGES": ",".join(bridges),
        "LLM_HUB_PORT": str(port),
        "LLM_HUB_HEALTH_INTERVAL": "0.5",
        "LLM_HUB_LOG_FORMAT": "json",
        "LLM_HUB_API_KEYS": f"tester:{KEY}",
        **LIMITS,
        **env,
    }
    command = [sys.executable, "-c", _LIMITED.format(n=DESCRIPTOR_LIMIT), gateway_command()]
    url = f"http://127.0.0.1:{port}"
    async with service(command, {**base, **values}, f"{url}/health", log, ready=(200,)):
        yield url


async def test_500_streams_under_1024_descriptors_complete_or_get_503_and_no_bridge_is_ejected(tmp_path: Path) -> None:
    fakes = {name: FakeLMStudio([FakeModel("shared/model")]) for name in ("a", "b")}
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(serve(fake.app)) for name, fake in fakes.items()}
        ports = {name: free_port() for name in fakes}
        for name in fakes:  # every call the gateway lets through reaches LM Studio, so each is held there
            await stack.enter_async_context(
                bridge_process(
                    urls[name],
                    ports[name],
                    tmp_path / f"bridge-{name}.log",
                    LLM_HUB_LMSTUDIO_CONNECTIONS="400",
                    LLM_HUB_REQUEST_TIMEOUT="120",
                )
            )
        gateway = await stack.enter_async_context(
            limited_gateway(
                [f"http://127.0.0.1:{p}" for p in ports.values()],
                tmp_path / "gateway.log",
                LLM_HUB_MAX_SESSIONS_PER_KEY="1000",
            )
        )
        top = Topology(fakes, urls, ports, {}, gateway, tmp_path, stack)
        http = await stack.enter_async_context(raw_client(gateway, connections=600))
        await until(lambda: _lists(http, SHARED), "the tool listed")
        hold(top)
        kinds: tuple[Call, ...] = (modern_call, rest_call, handshake_call)
        async with anyio.create_task_group() as tg:
            streams = [start(tg, kinds[i % 3], http, SHARED, f"stream {i}") for i in range(500)]
            await until(lambda: all(s.started or s.done for s in streams), "500 streams streaming or refused", 90)
            refused = sum(s.status == 503 for s in streams)
            assert all(b["healthy"] for b in (await bridge_states(gateway)).values())
            release(top)
    outcomes = Counter("ok" if s.text == ANSWER and not s.error else f"{s.status} {s.error[:80]}" for s in streams)
    assert set(outcomes) <= {"ok"} | {key for key in outcomes if key.startswith("503")}, outcomes
    assert refused == sum(n for key, n in outcomes.items() if key != "ok")
    assert outcomes["ok"] > 250, outcomes  # most fit: a refusal is the exception, not the rule
    assert not ejections(top)
    log = (tmp_path / "gateway.log").read_text()
    assert "holding up to" in log and "Too many open files" not in log
    assert not errors_logged(tmp_path)


async def _lists(http: httpx2.AsyncClient, tool: str) -> bool:
    tools = (await http.get("/v1/tools", headers=AUTH)).json()["tools"]
    return any(t["name"] == tool and t["available"] for t in tools)


# -- a frozen Redis ---------------------------------------------------------------------------------------

REDIS_TIMEOUT = 1.0


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_a_frozen_redis_costs_one_timeout_then_nothing_and_limits_return_after_it_thaws(
    tmp_path: Path, fail_open: bool
) -> None:
    with redis_server() as (redis_url, redis):
        env = {
            "LLM_HUB_REDIS_URL": redis_url,
            "LLM_HUB_REDIS_TIMEOUT": str(REDIS_TIMEOUT),
            "LLM_HUB_RATE_LIMIT": "3/minute",
            "LLM_HUB_REQUEST_LIMIT": "100000/minute",
            "LLM_HUB_RATE_LIMIT_FAIL_OPEN": str(fail_open).lower(),
        }
        async with topology(tmp_path, env) as top, raw_client(top.gateway) as http:
            log = tmp_path / "gateway.log"

            async def timed() -> tuple[float, int]:
                started = time.monotonic()
                response = await http.get("/v1/tools", headers=AUTH)
                return time.monotonic() - started, response.status_code

            assert (await timed())[1] == 200
            redis.send_signal(signal.SIGSTOP)
            try:
                first, status = await timed()
                assert first < REDIS_TIMEOUT + 1, first  # one timeout, not redis-py's retries or its defaults
                assert status == (200 if fail_open else 503)
                assert "skipped until it answers again" in log.read_text()
                later = [await timed() for _ in range(20)]
                assert all(seconds < REDIS_TIMEOUT for seconds, _ in later), later  # none waited for Redis
                assert {status for _, status in later} == {200 if fail_open else 503}
            finally:
                redis.send_signal(signal.SIGCONT)
            await until(lambda: "store) is back" in log.read_text(), "the probe to find Redis again", 15)
            await clear_of_minute_boundary(10)
            statuses = [
                (await http.post(f"/v1/tools/{ALPHA}", json={"prompt": "hi"}, headers=AUTH)).status_code
                for _ in range(5)
            ]
            assert statuses == [200, 200, 200, 429, 429], statuses
    assert not errors_logged(tmp_path)


# -- failed authentication, in aggregate --------------------------------------------------------------------


async def test_unknown_keys_are_logged_once_per_source_and_interval() -> None:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="TRACE")
    ok = Route("/whoami", lambda _request: JSONResponse({}), methods=["GET"])
    app = ApiKeyAuth(Starlette(routes=[ok]), {"alice": "sk-alice-5f1d2c9e"}, failure_log_seconds=1)
    try:
        async with serve(app) as url, httpx2.AsyncClient(base_url=url) as http:
            for _ in range(300):
                assert (await http.get("/whoami", headers=bearer("sk-guess"))).status_code == 401
            assert not [line for line in lines if "unknown API key" in line]  # nothing per request

            async def reported() -> bool:
                await http.get("/health")  # any request lets the tally report an interval that is over
                return any("unknown API key" in line for line in lines)

            await until(reported, "the interval's report", 10)
    finally:
        logger.remove(sink)
    reports = [line for line in lines if "unknown API key" in line]
    assert len(reports) == 1 and reports[0].startswith("300 requests with an unknown API key from 127.0.0.1")
    assert "sk-guess" not in "\n".join(lines)

    tally = FailureTally(interval=60)  # many sources: the tally stays bounded
    for i in range(5000):
        tally.count(f"10.0.{i // 256}.{i % 256}")
    assert len(tally.counts) <= 1001 and tally.counts["other sources"] == 4000


# -- 405 ------------------------------------------------------------------------------------------------


async def test_wrong_methods_get_405_with_allow_and_mcp_keeps_the_sdks_answers(tmp_path: Path) -> None:
    async with topology(tmp_path, LIMITS) as top, raw_client(top.gateway) as http:
        for method, path, allowed in [
            ("GET", f"/v1/tools/{ALPHA}", {"POST"}),
            ("POST", "/v1/tools", {"GET", "HEAD"}),
            ("DELETE", "/v1/bridges", {"GET", "HEAD"}),
            ("POST", "/health", {"GET", "HEAD"}),
            ("PUT", "/metrics", {"GET", "HEAD"}),
        ]:
            response = await http.request(method, path, headers=AUTH)
            assert response.status_code == 405, (method, path, response.status_code, response.text)
            assert {m.strip() for m in response.headers["allow"].split(",")} == allowed, (method, path)
        assert (await http.get("/nowhere", headers=AUTH)).status_code == 404
        async with raw_client(top.bridge_url("a")) as bridge:
            for method in ("PUT", "PATCH"):
                through = await http.request(method, "/mcp", headers={**AUTH, "Accept": ACCEPT})
                direct = await bridge.request(method, "/mcp", headers={"Accept": ACCEPT})
                assert through.status_code == direct.status_code != 404, (method, through.text, direct.text)


# -- heartbeats while a call waits for a slot ------------------------------------------------------------


async def test_calls_waiting_for_a_connection_get_heartbeats(tmp_path: Path) -> None:
    # Towards the bridge, 3 connections: its change stream and 2 calls; towards LM Studio, 1. Of 6 calls, one
    # is at LM Studio (held before its last piece), one waits at the bridge and four at the gateway.
    gateway_env = {**LIMITS, "LLM_HUB_BRIDGE_CONNECTIONS": "3", "LLM_HUB_HEARTBEAT_INTERVAL": "0.3"}
    bridge_env = {"LLM_HUB_LMSTUDIO_CONNECTIONS": "1", "LLM_HUB_REQUEST_TIMEOUT": "120"}
    async with topology(tmp_path, gateway_env, bridge_env) as top, raw_client(top.gateway) as http:
        hold(top)
        kinds: tuple[Call, ...] = (modern_call, rest_call, handshake_call)
        async with anyio.create_task_group() as tg:
            streams = [start(tg, kinds[i % 3], http, ALPHA, f"call {i}") for i in range(6)]
            try:
                await until(
                    lambda: held(top, "alpha/only") == 1 and all(s.heartbeats >= 3 for s in streams),
                    "every call, queued or not, hearing heartbeats",
                    30,
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {held(top, 'alpha/only')} held; {streams}") from None
            assert sum(s.pieces > 0 for s in streams) == 1  # only the one at LM Studio has text
            assert not any(s.done for s in streams)
            release(top)
    assert all(s.text == ANSWER and not s.error for s in streams), [(s.status, s.error) for s in streams]
    assert top.served_by("a") == 6
    assert not errors_logged(tmp_path)
