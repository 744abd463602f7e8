"""Rate limits on real uvicorn servers, in memory and in a real Redis shared by two gateway replicas."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import pytest
import redis
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.auth import ApiKeyAuth
from gateway.ratelimit import MAX_INSPECTED_BODY, RateLimiter, RateLimitMiddleware
from gateway.settings import GatewaySettings
from tests.conftest import clear_of_minute_boundary, redis_server
from tests.fake_lmstudio import serve

pytestmark = pytest.mark.anyio

N, M = 5, 20
ALICE, BOB = "sk-alice-77c1", "sk-bob-19fe"
TOOL_CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "chat_x", "arguments": {}}}
TOOLS_LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


# -- a gateway stand-in: auth, rate limits and an app that reports the body it received ----------


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)})


def settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "api_keys": [f"alice:{ALICE}", f"bob:{BOB}"],
        "rate_limit": f"{N}/minute",
        "key_limits": [],
        "request_limit": "1000/minute",
        "redis_url": None,
        "rate_limit_fail_open": True,
        **overrides,
    }
    return GatewaySettings(**values)


@dataclass
class Gateway:
    url: str
    rejected: list[str] = field(default_factory=list)


@asynccontextmanager
async def gateway(config: GatewaySettings) -> AsyncIterator[Gateway]:
    limiter = RateLimiter(config)
    rejected: list[str] = []
    app = Starlette(
        routes=[
            Route("/mcp", echo, methods=["POST", "GET"]),
            Route("/v1/tools/{name}", echo, methods=["POST"]),
            Route("/v1/models", echo, methods=["GET"]),
            Route("/health", echo, methods=["GET"]),
        ]
    )
    keys = None if config.auth_disabled else config.keys()
    stack = ApiKeyAuth(RateLimitMiddleware(app, limiter, on_reject=rejected.append), keys)
    try:
        async with serve(stack) as url:
            await clear_of_minute_boundary(5)  # the tests count within seconds, under anyio.fail_after(10)
            yield Gateway(url, rejected)
    finally:
        await limiter.aclose()


def auth(key: str = ALICE, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


async def burst(
    client: httpx2.AsyncClient, requests: list[tuple[str, str, Any, dict[str, str]]]
) -> list[httpx2.Response]:
    """Sends all requests at once: (url, path, json body or None, headers)."""
    responses: list[httpx2.Response] = []

    async def one(url: str, path: str, body: Any, headers: dict[str, str]) -> None:
        if body is None:
            responses.append(await client.post(url + path, headers=headers))
        else:
            responses.append(await client.post(url + path, content=json.dumps(body), headers=headers))

    async with anyio.create_task_group() as task_group:
        for request in requests:
            task_group.start_soon(one, *request)
    return responses


def refusal(response: httpx2.Response) -> str:
    """The refusal's message: plain JSON for REST, a JSON-RPC error for /mcp (which MCP clients display)."""
    error = response.json()["error"]
    if response.request.url.path == "/mcp":
        assert response.json()["jsonrpc"] == "2.0"
        return str(error["message"])
    return str(error)


def assert_exactly_n_pass(responses: list[httpx2.Response], n: int = N) -> None:
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * n + [429] * (len(responses) - n)
    for response in responses:
        assert response.headers["ratelimit-limit"] == str(n)
        assert int(response.headers["ratelimit-remaining"]) >= 0
        assert int(response.headers["ratelimit-reset"]) >= 0
        assert response.headers["ratelimit-policy"] == f"{n};w=60"
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["ratelimit-remaining"] == "0"
            error = refusal(response)
            assert error.startswith("Rate limit exceeded for key 'alice'")
            assert f"{n} tool calls per minute" in error and "Retry in" in error


# -- Redis: a real server of our own per test module -------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url


@pytest.fixture
def redis_url(shared_redis: str) -> str:
    with redis.Redis.from_url(shared_redis) as client:
        client.flushall()
    return shared_redis


@pytest.fixture
def logs() -> Iterator[list[str]]:
    captured: list[str] = []
    sink = logger.add(captured.append, level="WARNING", format="{level} {message}")
    yield captured
    logger.remove(sink)


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "extra"),
    [
        ("/mcp", TOOL_CALL, {}),
        ("/v1/tools/x", {"prompt": "hi"}, {}),
        ("/mcp", TOOL_CALL, {"Mcp-Method": "tools/call"}),
    ],
    ids=["mcp-body", "rest", "mcp-method-header"],
)
async def test_exactly_n_of_m_concurrent_tool_calls_pass(path: str, body: Any, extra: dict[str, str]) -> None:
    with anyio.fail_after(10):
        async with gateway(settings()) as gw, httpx2.AsyncClient() as client:
            responses = await burst(client, [(gw.url, path, body, auth(**extra))] * M)
    assert_exactly_n_pass(responses)
    assert gw.rejected == ["tool"] * (M - N)
    sent = json.dumps(body).encode()
    for response in responses:
        if response.status_code == 200:  # the app got the body the middleware had to read
            assert response.json() == {"sha256": hashlib.sha256(sent).hexdigest(), "size": len(sent)}


async def test_other_requests_do_not_use_the_tool_budget() -> None:
    with anyio.fail_after(10):
        async with gateway(settings()) as gw, httpx2.AsyncClient(base_url=gw.url, headers=auth()) as client:
            others: list[httpx2.Response] = []

            async def other(method: str, path: str, content: bytes | None = None) -> None:
                others.append(await client.request(method, path, content=content))

            async with anyio.create_task_group() as task_group:
                for _ in range(2 * N):
                    task_group.start_soon(other, "GET", "/v1/models")
                    task_group.start_soon(other, "POST", "/mcp", json.dumps(TOOLS_LIST).encode())
                    task_group.start_soon(other, "POST", "/mcp", json.dumps([INITIALIZED, TOOLS_LIST]).encode())
                    task_group.start_soon(other, "POST", "/mcp", b"{not json")
            assert [r.status_code for r in others] == [200] * len(others)
            assert not any("ratelimit-limit" in r.headers for r in others)
            responses = await burst(client, [("", "/mcp", TOOL_CALL, {})] * M)
    assert_exactly_n_pass(responses)


async def test_other_requests_have_their_own_budget() -> None:
    with anyio.fail_after(10):
        async with (
            gateway(settings(request_limit="3/minute")) as gw,
            httpx2.AsyncClient(base_url=gw.url, headers=auth()) as client,
        ):
            statuses = [(await client.get("/v1/models")).status_code for _ in range(5)]
            assert statuses == [200, 200, 200, 429, 429]
            refused = await client.post("/mcp", content=json.dumps(TOOLS_LIST))
            assert refused.status_code == 429
            assert "3 requests per minute" in refusal(refused)
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-limit"] == "3"
            # Tool calls still have their whole budget.
            tool_statuses = [(await client.post("/v1/tools/x")).status_code for _ in range(N + 1)]
            assert tool_statuses == [200] * N + [429]
    assert gw.rejected == ["other"] * 3 + ["tool"]


async def test_health_is_never_limited() -> None:
    with anyio.fail_after(10):
        async with (
            gateway(settings(request_limit="1/minute", auth_disabled=True)) as gw,
            httpx2.AsyncClient(base_url=gw.url) as client,
        ):
            assert [(await client.get("/health")).status_code for _ in range(5)] == [200] * 5
            assert [(await client.get("/v1/models")).status_code for _ in range(2)] == [200, 429]
            assert "for key 'anonymous'" in refusal(await client.get("/v1/models"))


async def test_a_batch_containing_a_tool_call_counts() -> None:
    with anyio.fail_after(10):
        async with gateway(settings()) as gw, httpx2.AsyncClient() as client:
            batch = [INITIALIZED, TOOLS_LIST, TOOL_CALL]
            responses = await burst(client, [(gw.url, "/mcp", batch, auth())] * M)
    assert_exactly_n_pass(responses)


async def test_a_body_too_large_to_inspect_counts_and_still_reaches_the_app() -> None:
    pad = "x" * (MAX_INSPECTED_BODY + 1024 * 1024)
    sent = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"pad": pad}}).encode()
    with anyio.fail_after(10):
        async with (
            gateway(settings(rate_limit="1/minute")) as gw,
            httpx2.AsyncClient(base_url=gw.url, headers=auth()) as client,
        ):
            first = await client.post("/mcp", content=sent)
            assert first.status_code == 200
            assert first.json() == {"sha256": hashlib.sha256(sent).hexdigest(), "size": len(sent)}
            assert first.headers["ratelimit-remaining"] == "0"
            assert (await client.post("/mcp", content=json.dumps(TOOL_CALL))).status_code == 429


async def test_per_key_limit_overrides_the_default() -> None:
    with anyio.fail_after(10):
        async with gateway(settings(key_limits=["bob=2/minute"])) as gw, httpx2.AsyncClient() as client:
            bobs = await burst(client, [(gw.url, "/v1/tools/x", None, auth(BOB))] * 10)
            alices = await burst(client, [(gw.url, "/v1/tools/x", None, auth(ALICE))] * 10)
    assert sorted(r.status_code for r in bobs) == [200] * 2 + [429] * 8
    assert all(r.headers["ratelimit-limit"] == "2" for r in bobs)
    assert "'bob': 2 tool calls per minute" in refusal(next(r for r in bobs if r.status_code == 429))
    assert_exactly_n_pass(alices)


async def test_two_replicas_share_one_budget_in_redis(redis_url: str) -> None:
    config = settings(redis_url=redis_url)
    with anyio.fail_after(10):
        async with gateway(config) as one, gateway(config) as two, httpx2.AsyncClient() as client:
            requests = [(gw.url, "/mcp", TOOL_CALL, auth()) for gw in (one, two)] * (M // 2)
            responses = await burst(client, requests)
    assert_exactly_n_pass(responses)
    assert len(one.rejected) + len(two.rejected) == M - N
    with redis.Redis.from_url(redis_url) as store:
        keys = [key.decode() for key in store.keys("*")]
    assert keys and all(key.startswith("llm-hub:") and "alice" not in key and ALICE not in key for key in keys)


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_redis_going_down(fail_open: bool, logs: list[str]) -> None:
    with redis_server() as (url, process), anyio.fail_after(10):
        async with (
            gateway(settings(redis_url=url, rate_limit_fail_open=fail_open)) as gw,
            httpx2.AsyncClient(base_url=gw.url, headers=auth()) as client,
        ):
            assert (await client.post("/v1/tools/x")).headers["ratelimit-remaining"] == str(N - 1)
            process.terminate()
            process.wait(5)
            responses = [await client.post("/v1/tools/x") for _ in range(2 * N)]
            responses.append(await client.get("/v1/models"))
    if fail_open:
        assert all(r.status_code == 200 and "ratelimit-limit" not in r.headers for r in responses)
    else:
        assert all(r.status_code == 503 for r in responses)
        assert int(responses[0].headers["retry-after"]) >= 1
        assert "Rate limiting is unavailable" in refusal(responses[0])
    assert gw.rejected == []
    warnings = [line for line in logs if "rate-limit store unreachable" in line]
    assert len(warnings) == 1, logs  # once per 30 s, not once per request
