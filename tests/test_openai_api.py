"""The gateway's OpenAI API driven by the official `openai` client: a real gateway process in front of
two real bridge processes, each on its own fake LM Studio. Outcomes are counted, never timed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest

from tests.conftest import clear_of_minute_boundary
from tests.fake_lmstudio import DEFAULT_CHUNKS, FakeLMStudio, FakeModel, marker
from tests.test_gateway_calls_e2e import BRIDGE_ENV, LIMITS, until
from tests.test_gateway_e2e import KEY, Topology, topology

pytestmark = pytest.mark.anyio

ANSWER = "".join(DEFAULT_CHUNKS)
OTHER_KEY = "gw-test-key-limited-0123456789"
SHARED_TOOL, ALPHA_TOOL, EMBED_TOOL = "chat_shared_model", "chat_alpha_only", "embed_beta_embed"
HELLO = [{"role": "user", "content": "Say hello"}]


def fakes() -> dict[str, FakeLMStudio]:
    """`shared/model` is on both boxes but loaded only on b; `alpha/only` only on a; an embedding model on b."""
    return {
        "a": FakeLMStudio([FakeModel("shared/model", loaded=False), FakeModel("alpha/only")]),
        "b": FakeLMStudio([FakeModel("shared/model"), FakeModel("beta/embed", type="embeddings")]),
    }


@asynccontextmanager
async def openai_topology(tmp_path: Path, **gateway_env: str) -> AsyncIterator[Topology]:
    env = {
        **LIMITS,
        "LLM_HUB_API_KEYS": f"tester:{KEY},limited:{OTHER_KEY}",
        "LLM_HUB_KEY_MODELS": "limited=alpha/*",
        **gateway_env,
    }
    async with topology(tmp_path, env, BRIDGE_ENV, fakes=fakes(), tools={SHARED_TOOL, ALPHA_TOOL, EMBED_TOOL}) as top:
        yield top


@asynccontextmanager
async def client(top: Topology, key: str = KEY, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries of the client's own: each test says what it expects of one request.
    async with openai.AsyncOpenAI(
        base_url=f"{top.gateway}/v1", api_key=key, max_retries=0, timeout=60, **options
    ) as oai:
        yield oai


def inference(fake: FakeLMStudio) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r["path"].startswith("/v1/")]


async def test_models_chat_completions_and_embeddings(tmp_path: Path) -> None:
    async with openai_topology(tmp_path) as top, client(top) as oai:
        a, b = top.bridge_url("a").split("://")[1], top.bridge_url("b").split("://")[1]
        models = {m.id: m for m in (await oai.models.list()).data}
        assert set(models) == {"shared/model", "alpha/only", "beta/embed"}
        assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by for m in models.values())
        facts = {ident: (m.model_extra or {})["llm_hub"] for ident, m in models.items()}
        assert facts["shared/model"]["loaded_on"] == [b] and sorted(facts["shared/model"]["bridges"]) == sorted([a, b])
        assert facts["alpha/only"] == {"type": "llm", "loaded_on": [a], "bridges": [a], "available": True}
        assert facts["beta/embed"]["type"] == "embedding"

        chat = await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        assert chat.choices[0].message.content == ANSWER and chat.choices[0].finish_reason == "stop"
        assert chat.usage is not None and chat.usage.completion_tokens == len(DEFAULT_CHUNKS)

        # Routing: the model loaded on b is served there, never loaded on a.
        for _ in range(3):
            await oai.chat.completions.create(model="shared/model", messages=HELLO)
        assert [r["json"]["model"] for r in inference(top.fakes["b"])] == ["shared/model"] * 3
        assert top.fakes["a"].loads["shared/model"] == 0

        pieces, usage = [], []
        stream = await oai.chat.completions.create(model="alpha/only", messages=HELLO, stream=True)
        async for chunk in stream:
            pieces += [c.delta.content or "" for c in chunk.choices]
            usage.append(chunk.usage)
        assert "".join(pieces) == ANSWER
        assert usage == [None] * len(usage)  # not asked for: the usage chunk is kept back
        # ... though the gateway asked LM Studio for it, to charge the key.
        assert inference(top.fakes["a"])[-1]["json"]["stream_options"] == {"include_usage": True}

        stream = await oai.chat.completions.create(
            model="alpha/only", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(DEFAULT_CHUNKS)

        completion = await oai.completions.create(model="alpha/only", prompt="Once upon a time")
        assert completion.choices[0].text == ANSWER
        streamed = await oai.completions.create(model="alpha/only", prompt="Once", stream=True)
        assert "".join([c.choices[0].text async for c in streamed if c.choices]) == ANSWER

        embedded = await oai.embeddings.create(model="beta/embed", input=["one", "two"])
        assert [len(item.embedding) for item in embedded.data] == [8, 8]
        assert inference(top.fakes["b"])[-1]["path"] == "/v1/embeddings"

        # The calls count in the metrics like tool calls of their models, per bridge.
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
            metrics = (await http.get(f"{top.gateway}/metrics")).text
        assert f'llm_hub_bridge_calls_routed_total{{bridge="{b}",model="beta/embed"}} 1.0' in metrics
        assert 'llm_hub_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in metrics


async def test_request_id_reaches_the_bridge_and_keys_stay_out_of_logs(tmp_path: Path) -> None:
    async with openai_topology(tmp_path) as top, client(top, default_headers={"X-Request-ID": "oa-trace-77"}) as oai:
        response = await oai.chat.completions.with_raw_response.create(model="alpha/only", messages=HELLO)
        assert response.headers["x-request-id"] == "oa-trace-77"
        await until(lambda: "oa-trace-77" in (top.logs / "bridge-a.log").read_text(), "the id in the bridge's log")
    logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert KEY not in logged and "Say hello" not in logged


async def test_errors_are_openai_exceptions(tmp_path: Path) -> None:
    async with openai_topology(tmp_path, LLM_HUB_HEALTH_INTERVAL="60") as top, client(top) as oai:
        async with client(top, key="wrong-key") as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                await wrong.chat.completions.create(model="alpha/only", messages=HELLO)
            assert "Unknown API key" in caught.value.message and caught.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()

        with pytest.raises(openai.NotFoundError) as missing:
            await oai.chat.completions.create(model="no/such-model", messages=HELLO)
        assert missing.value.code == "model_not_found" and "no/such-model" in missing.value.message

        with pytest.raises(openai.BadRequestError) as bad:
            await oai.chat.completions.create(model="alpha/only", messages=[])
        assert bad.value.param == "messages" and "'messages' is required" in bad.value.message
        async with httpx2.AsyncClient(base_url=top.gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for body, says in (
                (b"not json", "JSON object"),
                (b'{"messages": []}', "'model' is required"),
                (b'{"model": "alpha/only", "messages": [{"content": "\\ud800"}]}', "lone surrogate"),
                (b'{"model": "beta/embed", "input": ["x", NaN]}', "input[1] is nan"),
            ):
                path = "/v1/embeddings" if b"input" in body else "/v1/chat/completions"
                refused = await http.post(path, content=body)
                assert refused.status_code == 400 and says in refused.json()["error"]["message"], refused.text

        with pytest.raises(openai.APIStatusError) as too_large:
            await oai.chat.completions.create(
                model="alpha/only", messages=[{"role": "user", "content": "x" * 1_100_000}]
            )
        assert too_large.value.status_code == 413 and "LLM_HUB_MAX_BODY_BYTES" in too_large.value.message

        # A key limited to alpha/* sees only that model and is refused the others, by name.
        async with client(top, key=OTHER_KEY) as limited:
            assert [m.id for m in (await limited.models.list()).data] == ["alpha/only"]
            with pytest.raises(openai.PermissionDeniedError) as forbidden:
                await limited.chat.completions.create(model="shared/model", messages=HELLO)
            assert "shared/model" in forbidden.value.message and "limited" in forbidden.value.message

        await top.kill("a")  # alpha/only is on no other bridge: 503, with when to retry
        with pytest.raises(openai.InternalServerError) as unavailable:
            await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        assert unavailable.value.status_code == 503 and int(unavailable.value.response.headers["retry-after"]) >= 1
        assert top.bridge_url("a").split("://")[1] in unavailable.value.message
        assert inference(top.fakes["a"]) == []


async def test_rate_limit_is_shared_with_tool_calls(tmp_path: Path) -> None:
    async with openai_topology(tmp_path, LLM_HUB_RATE_LIMIT="2/minute") as top, client(top) as oai:
        await clear_of_minute_boundary()
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
            tool_call = await http.post(f"{top.gateway}/v1/tools/{ALPHA_TOOL}", json={"prompt": "hi"})
            assert tool_call.status_code == 200
        await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as limited:
            await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert "Rate limit exceeded for key 'tester'" in limited.value.message
        assert limited.value.code == "rate_limit_exceeded"
        assert (await oai.models.list()).data  # listing is not a call


async def test_retried_on_another_bridge_before_the_first_byte(tmp_path: Path) -> None:
    fleet = {
        "a": FakeLMStudio([FakeModel("shared/model"), FakeModel("alpha/only")]),
        "b": FakeLMStudio([FakeModel("shared/model"), FakeModel("beta/embed", type="embeddings")]),
    }
    env = {**LIMITS, "LLM_HUB_HEALTH_INTERVAL": "60"}  # the gateway learns of the dead bridge from the call
    async with topology(tmp_path, env, BRIDGE_ENV, fakes=fleet, tools={SHARED_TOOL, ALPHA_TOOL}) as top:
        async with client(top) as oai:
            await top.kill("a")
            answers = []
            for _ in range(2):  # both bridges are equal: one of the calls goes to a first
                chat = await oai.chat.completions.create(model="shared/model", messages=HELLO)
                answers.append(chat.choices[0].message.content)
            stream = await oai.chat.completions.create(model="shared/model", messages=HELLO, stream=True)
            answers.append("".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
        assert answers == [ANSWER] * 3
        assert len(inference(top.fakes["b"])) == 3 and inference(top.fakes["a"]) == []
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
            bridges = {b["url"]: b for b in (await http.get(f"{top.gateway}/v1/bridges")).json()["bridges"]}
        assert bridges[top.bridge_url("a")]["healthy"] is False


async def test_a_caller_that_leaves_closes_lmstudios_request(tmp_path: Path) -> None:
    async with openai_topology(tmp_path) as top, client(top) as oai:
        fake = top.fakes["a"]
        fake.chunk_text = [f"w{i} " for i in range(400)]
        fake.chunk_delay = 0.05
        stream = await oai.chat.completions.create(model="alpha/only", messages=HELLO, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
        with anyio.fail_after(30):
            await fake.disconnected.wait()
        assert fake.disconnects == 1


async def test_a_stream_cut_off_mid_answer_ends_with_an_error_the_client_raises(tmp_path: Path) -> None:
    async with openai_topology(tmp_path, LLM_HUB_HEALTH_INTERVAL="60") as top, client(top) as oai:
        fake = top.fakes["a"]
        fake.chunk_text = [f"w{i} " for i in range(400)]
        fake.chunk_delay = 0.05
        stream = await oai.chat.completions.create(model="alpha/only", messages=HELLO, stream=True)
        received = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                received += [c.delta.content for c in chunk.choices if c.delta.content]
                if len(received) == 2:
                    await top.kill("a")
        assert "cut off" in caught.value.message
        assert len(inference(fake)) == 1  # not retried: the caller had part of the answer


async def test_an_open_gateway_lists_models_and_streams_without_keys(tmp_path: Path) -> None:
    env = {**LIMITS, "LLM_HUB_AUTH_DISABLED": "true", "LLM_HUB_API_KEYS": ""}
    async with topology(tmp_path, env, BRIDGE_ENV, fakes=fakes(), tools={ALPHA_TOOL}) as top:
        async with client(top, key="anything") as oai:
            assert "alpha/only" in {m.id for m in (await oai.models.list()).data}
            stream = await oai.chat.completions.create(model="alpha/only", messages=HELLO, stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == ANSWER
        async with httpx2.AsyncClient() as http:
            raw = await http.post(
                f"{top.gateway}/v1/chat/completions", json={"model": "alpha/only", "messages": HELLO, "stream": True}
            )
        events = [line for line in raw.text.splitlines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        assert all('"usage"' not in event for event in events), events
        assert [json.loads(e[5:])["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)


async def test_lmstudio_breaking_off_is_raised_and_ejects_no_bridge(tmp_path: Path) -> None:
    async with openai_topology(tmp_path) as top, client(top) as oai:
        dying = [{"role": "user", "content": f"hi {marker('die_midstream')}"}]
        stream = await oai.chat.completions.create(model="alpha/only", messages=dying, stream=True)
        with pytest.raises(openai.APIError) as caught:
            async for _ in stream:
                pass
        assert "in the middle of the answer" in caught.value.message
        with pytest.raises(openai.InternalServerError) as whole:
            await oai.chat.completions.create(model="alpha/only", messages=dying)
        assert whole.value.status_code == 502 and whole.value.code == "lmstudio_failed"
        # One model's broken answer says nothing about the bridge: it keeps serving.
        chat = await oai.chat.completions.create(model="alpha/only", messages=HELLO)
        assert chat.choices[0].message.content == ANSWER
        assert len(inference(top.fakes["a"])) == 3
