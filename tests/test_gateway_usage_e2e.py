"""Token budgets, model access and usage per key, on real gateway and bridge processes.

The fake LM Studio reports usage for every answer: one prompt token for "hi" and one completion
token per piece of its reply, so a call's size is known before the test starts.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import redis_server
from tests.fake_lmstudio import DEFAULT_CHUNKS, FakeLMStudio, FakeModel
from tests.test_gateway_e2e import ALPHA, AUTH, BETA, KEY, SHARED, topology
from tests.test_gateway_limits_e2e import gateways_sharing

pytestmark = pytest.mark.anyio

CALL_TOKENS = 1 + len(DEFAULT_CHUNKS)  # per call with the prompt "hi"
CI_KEY = "gw-ci-key-fedcba9876543210"
CI_AUTH = {"Authorization": f"Bearer {CI_KEY}"}
TWO_KEYS = f"tester:{KEY},ci:{CI_KEY}"
MODERN = "2026-07-28"
HELLO = [{"role": "user", "content": "Say hello"}]


@asynccontextmanager
async def client_for(gateway: str, mode: str, auth: dict[str, str]) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers=auth, timeout=60) as http,
        Client(streamable_http_client(f"{gateway}/mcp", http_client=http), mode=mode) as client,
    ):
        yield client


def raw_call(tool: str, era: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A `tools/call` body and headers as a client of `era` ("handshake" or the 2026 one) sends them."""
    params: dict[str, Any] = {"name": tool, "arguments": {"prompt": "hi"}}
    headers = {"Accept": "application/json, text/event-stream"}
    if era == MODERN:
        params["_meta"] = {
            types.PROTOCOL_VERSION_META_KEY: MODERN,
            types.CLIENT_CAPABILITIES_META_KEY: {},
        }
        headers |= {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool}
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}, headers


async def assert_refused_everywhere(
    gateway: str, tool: str, auth: dict[str, str], status: int, says: str, then: str | None = None
) -> None:
    """REST and MCP (both eras, raw and through the SDK's client) refuse the call with `status`;
    the SDK's client then calls `then` on the same connection."""
    async with httpx2.AsyncClient(headers=auth, timeout=60) as http:
        rest = await http.post(f"{gateway}/v1/tools/{tool}", json={"prompt": "hi"})
        assert rest.status_code == status and says in rest.json()["error"], rest.text
        refusals = [rest]
        for era in ("handshake", MODERN):
            body, headers = raw_call(tool, era)
            answer = await http.post(f"{gateway}/mcp", json=body, headers=headers)
            assert answer.status_code == status and says in answer.json()["error"]["message"], (era, answer.text)
            refusals.append(answer)
    if status == 429:
        assert all(int(r.headers["retry-after"]) >= 1 for r in refusals)
    for mode in ("legacy", "auto"):
        async with client_for(gateway, mode, auth) as client:
            with pytest.raises(MCPError, match=re.escape(says)):
                await client.call_tool(tool, {"prompt": "hi"})
            if then is not None:  # a refusal ends no session
                assert not (await client.call_tool(then, {"prompt": "hi"})).is_error


async def test_a_token_budget_is_shared_by_two_gateways_and_charged_for_mcp_and_rest(tmp_path: Path) -> None:
    budget = 2 * CALL_TOKENS + 1  # admitted while some is left: the third call overshoots it
    fake = FakeLMStudio([FakeModel("alpha/only")])
    with redis_server() as (redis_url, _):
        async with AsyncExitStack() as stack:
            env = {
                "LLM_HUB_API_KEYS": TWO_KEYS,
                "LLM_HUB_KEY_TOKEN_LIMITS": f"tester={budget}/minute",
                "LLM_HUB_REDIS_URL": redis_url,
            }
            gateways = await gateways_sharing(stack, tmp_path, fake, env)
            await _wait_for_tool(gateways, ALPHA)
            async with httpx2.AsyncClient(headers=AUTH, timeout=60) as http:
                first = await http.post(f"{gateways[0]}/v1/tools/{ALPHA}", json={"prompt": "hi"})
                assert first.status_code == 200, first.text
                assert first.json()["structuredContent"]["usage"]["total_tokens"] == CALL_TOKENS
            async with client_for(gateways[1], "legacy", AUTH) as client:  # handshake era, through the SDK server
                assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
            async with client_for(gateways[0], "auto", AUTH) as client:  # 2026 era, the fast path
                assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
            for gateway in gateways:
                await assert_refused_everywhere(gateway, ALPHA, AUTH, 429, "Token budget spent for key 'tester'")
            # Another key has its own (here: no) budget.
            async with httpx2.AsyncClient(headers=CI_AUTH, timeout=60) as http:
                assert (await http.post(f"{gateways[1]}/v1/tools/{ALPHA}", json={"prompt": "hi"})).status_code == 200
                metrics = [(await http.get(f"{g}/metrics")).text for g in gateways]
    assert len(fake.requests) == 4
    charged = sum(
        _sample(text, "llm_hub_usage_prompt_tokens_total", key="tester", model="alpha/only")
        + _sample(text, "llm_hub_usage_completion_tokens_total", key="tester", model="alpha/only")
        for text in metrics
    )
    assert charged == 3 * CALL_TOKENS
    assert sum(_sample(text, "llm_hub_usage_refused_total", key="tester", reason="budget") for text in metrics) == 10
    logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert KEY not in logged and CI_KEY not in logged


async def test_a_key_limited_to_one_model_sees_and_calls_only_it(tmp_path: Path) -> None:
    env = {"LLM_HUB_API_KEYS": TWO_KEYS, "LLM_HUB_KEY_MODELS": "ci=alpha/*"}
    async with topology(tmp_path, env) as top:
        for mode in ("legacy", "auto"):
            async with client_for(top.gateway, mode, CI_AUTH) as client:
                listed = await client.list_tools()
                assert {tool.name for tool in listed.tools} == {ALPHA}, mode
                if mode == "auto":  # the 2026 era says whose list it is; the handshake era has no such field
                    assert listed.cache_scope == "private"
                assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
            async with client_for(top.gateway, mode, AUTH) as client:  # the other key still sees everything
                assert {SHARED, ALPHA, BETA, "list_models"} <= {tool.name for tool in (await client.list_tools()).tools}
        async with httpx2.AsyncClient(headers=CI_AUTH, timeout=60) as http:
            assert {t["name"] for t in (await http.get(f"{top.gateway}/v1/tools")).json()["tools"]} == {ALPHA}
            bridges = (await http.get(f"{top.gateway}/v1/bridges")).json()["bridges"]
            assert {tool for bridge in bridges for tool in bridge["tools"]} == {ALPHA}
            assert {m["model"] for bridge in bridges for m in bridge["models"]} == {"alpha/only"}
        await assert_refused_everywhere(
            top.gateway,
            BETA,
            CI_AUTH,
            403,
            "Key 'ci' may not use model 'beta/only': LLM_HUB_KEY_MODELS gives it only alpha/*",
            then=ALPHA,
        )
        await assert_refused_everywhere(top.gateway, "list_models", CI_AUTH, 403, "Key 'ci' may not use list_models")
        async with openai_client(top.gateway, CI_KEY) as oai:
            assert [model.id for model in (await oai.models.list()).data] == ["alpha/only"]
            with pytest.raises(openai.PermissionDeniedError, match="Key 'ci' may not use model 'beta/only'"):
                await oai.chat.completions.create(model="beta/only", messages=HELLO)
        assert top.served_by("b") == 0


async def test_openai_calls_share_the_token_budget_with_tool_calls(tmp_path: Path) -> None:
    chat_tokens = len(HELLO[0]["content"].split()) + len(DEFAULT_CHUNKS)
    budget = CALL_TOKENS + chat_tokens + 1
    env = {"LLM_HUB_API_KEYS": TWO_KEYS, "LLM_HUB_TOKEN_LIMIT": f"{budget}/minute"}
    async with topology(tmp_path, env) as top, openai_client(top.gateway, KEY) as oai:
        async with httpx2.AsyncClient(headers=AUTH, timeout=60) as http:
            assert (await http.post(f"{top.gateway}/v1/tools/{ALPHA}", json={"prompt": "hi"})).status_code == 200
        await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        # Streamed without asking for usage: the gateway still learns it, and the caller gets no usage chunk.
        stream = await oai.chat.completions.create(model="alpha/only", messages=HELLO, stream=True)
        assert [chunk.usage async for chunk in stream if chunk.usage is not None] == []
        with pytest.raises(openai.RateLimitError, match="Token budget spent for key 'tester'") as refused:
            await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        assert int(refused.value.response.headers["retry-after"]) >= 1
        await assert_refused_everywhere(top.gateway, ALPHA, AUTH, 429, "Token budget spent for key 'tester'")
        async with openai_client(top.gateway, CI_KEY) as other:  # the default budget is each key's own
            await other.chat.completions.create(model="alpha/only", messages=HELLO)
        async with httpx2.AsyncClient(headers=AUTH, timeout=60) as http:
            metrics = (await http.get(f"{top.gateway}/metrics")).text
    assert _sample(metrics, "llm_hub_usage_calls_total", key="tester", model="alpha/only") == 3
    spent = sum(
        _sample(metrics, f"llm_hub_usage_{kind}_tokens_total", key="tester", model="alpha/only")
        for kind in ("prompt", "completion")
    )
    assert spent == CALL_TOKENS + 2 * chat_tokens


async def test_usage_per_key_and_model_in_metrics_and_stats(tmp_path: Path) -> None:
    async with topology(tmp_path, {"LLM_HUB_API_KEYS": TWO_KEYS}) as top:
        async with client_for(top.gateway, "auto", AUTH) as client:
            assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
        async with client_for(top.gateway, "legacy", CI_AUTH) as client:
            assert not (await client.call_tool(BETA, {"prompt": "one two three"})).is_error
        async with httpx2.AsyncClient(headers=AUTH, timeout=60) as http:
            assert (await http.post(f"{top.gateway}/v1/tools/{ALPHA}", json={"prompt": "hi"})).status_code == 200
            metrics = (await http.get(f"{top.gateway}/metrics")).text
            stats = (await http.get(f"{top.gateway}/v1/stats")).json()
    completion = len(DEFAULT_CHUNKS)
    assert _sample(metrics, "llm_hub_usage_calls_total", key="tester", model="alpha/only") == 2
    assert _sample(metrics, "llm_hub_usage_prompt_tokens_total", key="tester", model="alpha/only") == 2
    assert _sample(metrics, "llm_hub_usage_completion_tokens_total", key="tester", model="alpha/only") == 2 * completion
    assert _sample(metrics, "llm_hub_usage_prompt_tokens_total", key="ci", model="beta/only") == 3
    assert KEY not in metrics and CI_KEY not in metrics
    assert stats["usage"] == [
        {"key": "ci", "model": "beta/only", "calls": 1, "prompt_tokens": 3, "completion_tokens": completion},
        {"key": "tester", "model": "alpha/only", "calls": 2, "prompt_tokens": 2, "completion_tokens": 2 * completion},
    ]
    per_minute = stats["tokens_per_minute"]
    assert len(per_minute["prompt"]) == len(per_minute["completion"]) == 60
    assert sum(per_minute["prompt"]) == 5 and sum(per_minute["completion"]) == 3 * completion


@asynccontextmanager
async def openai_client(gateway: str, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=60) as oai:
        yield oai


async def _wait_for_tool(gateways: list[str], tool: str) -> None:
    async with httpx2.AsyncClient(headers=AUTH) as http:
        with anyio.fail_after(30):
            for gateway in gateways:
                while tool not in {
                    t["name"] for t in (await http.get(f"{gateway}/v1/tools")).json()["tools"] if t["available"]
                }:
                    await anyio.sleep(0.1)


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1 :] == wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
