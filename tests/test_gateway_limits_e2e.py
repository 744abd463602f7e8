"""Rate limits on real gateway processes: exactly N of M concurrent calls pass, over REST and MCP,
and two gateways sharing a real Redis enforce one budget."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import httpx2
import pytest

from tests.conftest import bridge_process, clear_of_minute_boundary, free_port, gateway_process, redis_server
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve
from tests.test_gateway_e2e import ALPHA, AUTH, KEY, gateway_client, topology

pytestmark = pytest.mark.anyio


async def _burst(urls: list[str], calls: int) -> list[httpx2.Response]:
    responses: list[httpx2.Response] = []
    async with httpx2.AsyncClient(headers=AUTH, timeout=30) as http:

        async def one(i: int) -> None:
            responses.append(await http.post(f"{urls[i % len(urls)]}/v1/tools/{ALPHA}", json={"prompt": "hi"}))

        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)
    return responses


def _assert_exactly(responses: list[httpx2.Response], passed: int) -> None:
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == passed and statuses.count(429) == len(responses) - passed, statuses
    for refused in (r for r in responses if r.status_code == 429):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["ratelimit-remaining"] == "0" and refused.headers["ratelimit-limit"] == "5"
        assert "Rate limit exceeded" in refused.json()["error"]


async def test_exactly_n_of_m_concurrent_calls_pass(tmp_path: Path) -> None:
    async with topology(tmp_path, {"LLM_HUB_RATE_LIMIT": "5/minute"}) as top:
        await clear_of_minute_boundary()
        responses = await _burst([top.gateway], 12)
        _assert_exactly(responses, 5)
        async with httpx2.AsyncClient(headers=AUTH) as http:  # other requests have their own budget
            assert (await http.get(f"{top.gateway}/v1/tools")).status_code == 200
            metrics = (await http.get(f"{top.gateway}/metrics")).text
        assert 'llm_hub_rate_limited_total{kind="tool"} 7.0' in metrics


async def test_mcp_tool_calls_count_against_the_same_budget(tmp_path: Path) -> None:
    async with topology(tmp_path, {"LLM_HUB_RATE_LIMIT": "3/minute"}) as top:
        await clear_of_minute_boundary()
        async with gateway_client(top, "legacy") as client:
            for _ in range(3):
                assert not (await client.call_tool(ALPHA, {"prompt": "hi"})).is_error
            assert (await client.list_tools()).tools  # listing is not a tool call
            with pytest.raises(Exception) as caught:  # the SDK surfaces HTTP 429 as its own error
                await client.call_tool(ALPHA, {"prompt": "hi"})
        assert "429" in str(caught.value) or "Rate limit" in str(caught.value)
        async with httpx2.AsyncClient(headers=AUTH) as http:
            assert (await http.post(f"{top.gateway}/v1/tools/{ALPHA}", json={"prompt": "x"})).status_code == 429


async def gateways_sharing(stack: AsyncExitStack, tmp_path: Path, fake: FakeLMStudio, env: dict[str, str]) -> list[str]:
    """Two gateway processes with `env` (a shared Redis, say) in front of one bridge on `fake`."""
    url = await stack.enter_async_context(serve(fake.app))
    bridge_port = free_port()
    await stack.enter_async_context(bridge_process(url, bridge_port, tmp_path / "bridge.log"))
    gateways = []
    for i in range(2):
        port = free_port()
        await stack.enter_async_context(
            gateway_process([f"http://127.0.0.1:{bridge_port}"], port, tmp_path / f"gateway-{i}.log", **env)
        )
        gateways.append(f"http://127.0.0.1:{port}")
    return gateways


async def test_two_gateways_share_one_budget_in_redis(tmp_path: Path) -> None:
    fake = FakeLMStudio([FakeModel("alpha/only")])
    with redis_server() as (redis_url, _):
        async with AsyncExitStack() as stack:
            env = {"LLM_HUB_API_KEYS": f"tester:{KEY}", "LLM_HUB_RATE_LIMIT": "5/minute", "LLM_HUB_REDIS_URL": redis_url}
            gateways = await gateways_sharing(stack, tmp_path, fake, env)
            await clear_of_minute_boundary()
            responses = await _burst(gateways, 12)
    _assert_exactly(responses, 5)
    assert len(fake.requests) == 5
    logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert KEY not in logged
