"""Self-tests for the fake LM Studio: response shapes, streaming, modes and serving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from tests.fake_lmstudio import FakeLMStudio, FakeModel, embedding_for, marker, serve

MODELS = [
    FakeModel("google/gemma-3-270m", capabilities=["tool_use"]),
    FakeModel("qwen/qwen2.5-vl-7b", type="vlm", loaded=False, publisher="qwen", arch="qwen2vl"),
    FakeModel("nomic-ai/nomic-embed-text-v1.5", type="embeddings", publisher="nomic-ai", arch="nomic-bert"),
]
LLM = "google/gemma-3-270m"


@pytest.fixture
def fake() -> FakeLMStudio:
    return FakeLMStudio([FakeModel(**vars(m)) for m in MODELS])


@pytest.fixture
async def client(fake: FakeLMStudio) -> AsyncIterator[httpx2.AsyncClient]:
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url, timeout=10) as http:
        yield http


def sse_events(text: str) -> list[Any]:
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.anyio
async def test_v1_surface_shapes(fake: FakeLMStudio, client: httpx2.AsyncClient) -> None:
    v1 = (await client.get("/api/v1/models")).json()["models"]
    gemma, vlm, embed = v1
    assert gemma["type"] == "llm" and gemma["key"] == LLM and gemma["format"] == "gguf"
    assert gemma["quantization"] == {"name": "Q4_K_M", "bits_per_weight": 4.0}
    assert gemma["params_string"] == "270M" and gemma["display_name"] == "Gemma 3 270M"
    assert gemma["loaded_instances"] == [{"id": LLM, "config": {"context_length": 4096}}]
    assert gemma["capabilities"] == {"vision": False, "trained_for_tool_use": True}
    assert vlm["type"] == "llm" and vlm["capabilities"]["vision"] is True and vlm["loaded_instances"] == []
    assert embed["type"] == "embedding"

    v0 = (await client.get("/api/v0/models")).json()
    assert v0["object"] == "list"
    assert [(m["id"], m["type"], m["state"]) for m in v0["data"]] == [
        (LLM, "llm", "loaded"),
        ("qwen/qwen2.5-vl-7b", "vlm", "not-loaded"),
        ("nomic-ai/nomic-embed-text-v1.5", "embeddings", "loaded"),
    ]
    assert v0["data"][0]["capabilities"] == ["tool_use"] and v0["data"][0]["compatibility_type"] == "gguf"

    openai = (await client.get("/v1/models")).json()
    assert openai["data"][1] == {"id": "qwen/qwen2.5-vl-7b", "object": "model", "owned_by": "qwen"}
    assert fake.listing_calls == 3

    fake.models.pop()  # models are live: the next listing reflects the change
    assert len((await client.get("/v1/models")).json()["data"]) == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("surface", "answering"), [("v0", {"/api/v0/models", "/v1/models"}), ("openai", {"/v1/models"})]
)
async def test_older_surfaces(surface: str, answering: set[str]) -> None:
    fake = FakeLMStudio(surface=surface)  # type: ignore[arg-type]
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url) as http:
        for path in ("/api/v1/models", "/api/v0/models", "/v1/models"):
            response = await http.get(path)
            assert response.status_code == (200 if path in answering else 404), path
        assert "error" in response.json() if response.status_code == 404 else True
        fake.unknown_endpoint_status = 200  # LM Studio's "Returning 200 anyway" quirk
        if surface == "v0":
            quirk = await http.get("/api/v1/models")
            assert quirk.status_code == 200
            assert quirk.json() == {"error": "Unexpected endpoint or method. (GET /api/v1/models)"}
    assert fake.listing_calls == len(answering)


@pytest.mark.anyio
async def test_chat_non_stream(fake: FakeLMStudio, client: httpx2.AsyncClient) -> None:
    messages = [{"role": "user", "content": "say hello please"}]
    answer = (await client.post("/v1/chat/completions", json={"model": LLM, "messages": messages})).json()
    assert answer["object"] == "chat.completion" and answer["model"] == LLM
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the fake model."}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}

    cut = (await client.post("/v1/chat/completions", json={"model": LLM, "messages": messages, "max_tokens": 2})).json()
    assert cut["choices"][0]["message"]["content"] == "Hello from"
    assert cut["choices"][0]["finish_reason"] == "length"

    schema = {"type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": {"type": "object"}}}
    structured = await client.post(
        "/v1/chat/completions", json={"model": LLM, "messages": messages, "response_format": schema}
    )
    assert json.loads(structured.json()["choices"][0]["message"]["content"]) == {"answer": "Hello from the fake model."}

    missing = await client.post("/v1/chat/completions", json={"model": "nope/x", "messages": messages})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"
    assert missing.json()["error"]["message"].startswith('Model "nope/x" not found.')

    assert len(fake.requests) == 4
    assert fake.requests[0]["path"] == "/v1/chat/completions"
    assert fake.requests[0]["json"]["messages"] == messages
    assert fake.requests[0]["headers"]["content-type"] == "application/json"


@pytest.mark.anyio
async def test_chat_stream_order(fake: FakeLMStudio, client: httpx2.AsyncClient) -> None:
    body = {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    first, *pieces, finish, usage, _ = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["delta"]["content"] for p in pieces] == fake.chunk_text
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert len({e["id"] for e in events[:-1]}) == 1

    plain = sse_events((await client.post("/v1/chat/completions", json={**body, "stream_options": None})).text)
    assert len(plain) == len(events) - 1 and all(e == "[DONE]" or e["choices"] for e in plain)


@pytest.mark.anyio
async def test_completions(client: httpx2.AsyncClient) -> None:
    answer = (await client.post("/v1/completions", json={"model": LLM, "prompt": "Once upon"})).json()
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == "Hello from the fake model."
    events = sse_events((await client.post("/v1/completions", json={"model": LLM, "prompt": "x", "stream": True})).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello from the fake model."
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


@pytest.mark.anyio
async def test_embeddings(client: httpx2.AsyncClient) -> None:
    model = "nomic-ai/nomic-embed-text-v1.5"
    answer = (await client.post("/v1/embeddings", json={"model": model, "input": ["a b", "c"]})).json()
    assert answer["object"] == "list" and answer["model"] == model
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert answer["data"][0]["embedding"] == embedding_for("a b") and len(embedding_for("a b")) == 8
    assert answer["data"][0]["embedding"] != answer["data"][1]["embedding"]
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    single = (await client.post("/v1/embeddings", json={"model": model, "input": "c"})).json()
    assert single["data"][0]["embedding"] == answer["data"][1]["embedding"]

    wrong = await client.post("/v1/embeddings", json={"model": LLM, "input": "c"})
    assert wrong.status_code == 400 and wrong.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_disconnect_detected_after_first_chunk(fake: FakeLMStudio, client: httpx2.AsyncClient) -> None:
    fake.chunk_delay = 0.2
    body = {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # leave after the role chunk, as a cancelled MCP call would
    with anyio.fail_after(5):
        await fake.disconnected.wait()
    assert fake.disconnects == 1

    fake.reset()
    assert fake.disconnects == 0 and not fake.disconnected.is_set() and fake.requests == []
    await client.post("/v1/chat/completions", json=body)  # read to the end: not a disconnect
    await anyio.sleep(0.1)
    assert fake.disconnects == 0


@pytest.mark.anyio
async def test_token_required() -> None:
    fake = FakeLMStudio(token="s3cret")
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url) as http:
        for path in ("/v1/models", "/api/v1/models"):
            denied = await http.get(path)
            assert denied.status_code == 401
            assert denied.json()["error"]["code"] == "invalid_api_key"
            assert denied.json()["error"]["type"] == "invalid_request"
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        allowed = await http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
    assert fake.listing_calls == 1


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
async def test_die_midstream_is_a_transport_error(fake: FakeLMStudio, client: httpx2.AsyncClient, stream: bool) -> None:
    fake.mode = "die_midstream"
    body = {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    received: list[str] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                received.append(line)
    if stream:
        contents = [json.loads(x[6:])["choices"][0]["delta"].get("content") for x in received if x.startswith("data: ")]
        assert contents == ["", "Hello", " from"]
    assert fake.disconnects == 0
    fake.mode = "ok"  # the server survives and serves the next request on a fresh connection
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200


@pytest.mark.anyio
async def test_error_modes(fake: FakeLMStudio, client: httpx2.AsyncClient) -> None:
    body = {"model": LLM, "messages": [{"role": "user", "content": "hi"}]}

    fake.mode = "no_models_loaded"
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("No models loaded.")
    assert response.json()["error"]["code"] == "model_not_found"
    assert all(m["loaded_instances"] == [] for m in (await client.get("/api/v1/models")).json()["models"])

    fake.mode = "malformed"
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.text == "not json{"
    assert (await client.post("/v1/chat/completions", json={**body, "stream": True})).text == "data: {broken\n\n"

    fake.mode = "error500"
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 500 and response.json()["error"]["message"] == "Internal error"

    fake.mode, fake.slow_seconds = "slow", 0.3
    started = time.monotonic()
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert len(fake.requests) == 5


@pytest.mark.anyio
async def test_serve_exits_with_a_stream_still_open(fake: FakeLMStudio) -> None:
    fake.mode, fake.slow_seconds = "slow", 60
    body = {"model": LLM, "messages": [], "stream": True}
    started = time.monotonic()
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url) as http:
        async with anyio.create_task_group() as tg:

            async def hang() -> None:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    await response.aread()

            tg.start_soon(hang)
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    assert time.monotonic() - started < 5


def test_command_line() -> None:
    script = Path(__file__).with_name("fake_lmstudio.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--models", "a/b,c/embed-d", "--chunks", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" on ")[1].split()[0]
        models = httpx2.get(f"{url}/api/v0/models").json()["data"]
        summary = [(m["id"], m["type"], m["publisher"]) for m in models]
        assert summary == [("a/b", "llm", "a"), ("c/embed-d", "embeddings", "c")]
        answer = httpx2.post(f"{url}/v1/chat/completions", json={"model": "a/b", "messages": []}).json()
        assert answer["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- a box in a fleet: loading, eviction, parallel slots ------------------------------------------


def chat_body(model: str, prompt: str = "hi", *, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


def loaded_ids(listing: dict[str, Any]) -> set[str]:
    return {m["key"] for m in listing["models"] if m["loaded_instances"]}


@pytest.mark.anyio
async def test_parallel_slots_are_reported_and_extra_requests_wait() -> None:
    fake = FakeLMStudio([FakeModel("a/model", parallel=2), FakeModel("b/model")])
    fake.chunk_delay = 0.05
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url, timeout=10) as http:
        entries = (await http.get("/api/v1/models")).json()["models"]
        assert entries[0]["loaded_instances"] == [{"id": "a/model", "config": {"context_length": 4096, "parallel": 2}}]
        assert entries[1]["loaded_instances"][0]["config"] == {"context_length": 4096}  # older LM Studio: absent
        texts: list[str] = []

        async def call() -> None:
            response = await http.post("/v1/chat/completions", json=chat_body("a/model"))
            texts.append("".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(response.text)[:-1]
                                 if e["choices"]))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(call)
            slots = fake.slots("a/model")
            with anyio.fail_after(5):
                while slots.active + slots.waiting < 5:
                    await anyio.sleep(0.01)
            assert (slots.active, slots.waiting) == (2, 3)
        assert texts == ["Hello from the fake model."] * 5
        assert slots.peak == 2 and slots.active == slots.waiting == 0
        assert fake.stats()["slots"]["a/model"] == {"active": 0, "waiting": 0, "peak": 2}


@pytest.mark.anyio
async def test_jit_load_takes_the_load_delay_and_evicts_the_previous_jit_model() -> None:
    fake = FakeLMStudio([FakeModel("by/hand"), FakeModel("jit/b", loaded=False), FakeModel("jit/c", loaded=False)])
    fake.load_delay = 0.3
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url, timeout=10) as http:
        started = time.monotonic()
        assert (await http.post("/v1/chat/completions", json=chat_body("jit/b"))).status_code == 200
        assert time.monotonic() - started >= 0.3
        assert loaded_ids((await http.get("/api/v1/models")).json()) == {"by/hand", "jit/b"}
        assert fake.loads == {"jit/b": 1} and not fake.evictions

        # Two requests for an unloaded model share one load; the listing says "not loaded" until it ends.
        async def call_c() -> None:
            await http.post("/v1/chat/completions", json=chat_body("jit/c"))

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(call_c)
            await anyio.sleep(0.1)
            assert loaded_ids((await http.get("/api/v1/models")).json()) == {"by/hand"}  # b evicted, c loading
        assert loaded_ids((await http.get("/api/v1/models")).json()) == {"by/hand", "jit/c"}
        assert fake.loads == {"jit/b": 1, "jit/c": 1} and fake.evictions == {"jit/b": 1}

        await http.post("/v1/chat/completions", json=chat_body("jit/b"))  # and back: c goes
        await http.post("/v1/chat/completions", json=chat_body("by/hand"))  # loaded: no load
        assert fake.loads == {"jit/b": 2, "jit/c": 1} and fake.evictions == {"jit/b": 1, "jit/c": 1}
        stats = (await http.get("/fake/stats")).json()
        assert stats["loads"] == {"jit/b": 2, "jit/c": 1} and stats["evictions"] == {"jit/b": 1, "jit/c": 1}
        assert stats["loaded"] == ["by/hand", "jit/b"] and stats["requests"] == 5

        fake.auto_evict = False
        await http.post("/v1/chat/completions", json=chat_body("jit/c"))
        assert fake.find("jit/b").loaded and fake.find("jit/c").loaded  # type: ignore[union-attr]
        fake.reset()
        assert not fake.loads and not fake.evictions


@pytest.mark.anyio
async def test_models_loaded_through_the_api_are_not_evicted() -> None:
    fake = FakeLMStudio([FakeModel("a/one", loaded=False), FakeModel("b/two", loaded=False)])
    async with serve(fake.app) as url, httpx2.AsyncClient(base_url=url, timeout=10) as http:
        loaded = (await http.post("/api/v1/models/load", json={"model": "a/one"})).json()
        assert loaded["status"] == "loaded" and loaded["instance_id"] == "a/one" and loaded["type"] == "llm"
        await http.post("/v1/chat/completions", json=chat_body("b/two"))
        assert loaded_ids((await http.get("/api/v1/models")).json()) == {"a/one", "b/two"}
        assert fake.loads == {"a/one": 1, "b/two": 1} and not fake.evictions
        unloaded = await http.post("/api/v1/models/unload", json={"instance_id": "b/two"})
        assert unloaded.json() == {"instance_id": "b/two"}
        assert (await http.post("/api/v1/models/unload", json={"instance_id": "b/two"})).status_code == 404
        assert (await http.post("/api/v1/models/load", json={"model": "x/none"})).status_code == 404
        assert loaded_ids((await http.get("/api/v1/models")).json()) == {"a/one"}


@pytest.mark.anyio
async def test_a_marker_fails_one_request_mid_stream_and_no_other(
    fake: FakeLMStudio, client: httpx2.AsyncClient
) -> None:
    poisoned = chat_body(LLM, f"please {marker('malformed_midstream')} now")
    responses = [await client.post("/v1/chat/completions", json=body) for body in (poisoned, chat_body(LLM))]
    bad_lines = [block.removeprefix("data: ") for block in responses[0].text.split("\n\n") if block]
    assert bad_lines[3] == "{broken"  # after the role chunk and two pieces; the stream goes on
    assert bad_lines[-1] == "[DONE]" and len(bad_lines) == len(sse_events(responses[1].text)) + 1
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(responses[1].text)[:-1]) == (
        "Hello from the fake model.")
    died = chat_body(LLM, marker("error500"), stream=False)
    assert (await client.post("/v1/chat/completions", json=died)).status_code == 500
    assert fake.mode == "ok"
    with pytest.raises(ValueError, match="unknown mode"):
        marker("nonsense")  # type: ignore[arg-type]


def test_command_line_fleet_options() -> None:
    script = Path(__file__).with_name("fake_lmstudio.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--models", "a/b,c/d,e/f", "--loaded", "a/b", "--parallel", "3",
         "--load-delay", "0.2", "--token-delay", "0.01", "--chunks", "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" on ")[1].split()[0]
        listing = httpx2.get(f"{url}/api/v1/models").json()
        assert loaded_ids(listing) == {"a/b"}
        assert listing["models"][0]["loaded_instances"][0]["config"]["parallel"] == 3
        started = time.monotonic()
        for model in ("c/d", "e/f"):
            answer = httpx2.post(f"{url}/v1/chat/completions", json=chat_body(model, stream=False), timeout=10).json()
            assert answer["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
        assert time.monotonic() - started >= 0.4
        stats = httpx2.get(f"{url}/fake/stats").json()
        assert stats["loads"] == {"c/d": 1, "e/f": 1} and stats["evictions"] == {"c/d": 1}
        assert stats["loaded"] == ["a/b", "e/f"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, str(script), "--port", "0", "--models", "a/b", "--loaded", "x/y"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "x/y" in bad.stderr


@pytest.mark.anyio
async def test_gate_holds_streams_before_their_last_piece(fake: FakeLMStudio, client: httpx2.AsyncClient) -> None:
    fake.gate = anyio.Event()
    received: list[list[str]] = [[], []]

    async def read(into: list[str]) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(LLM)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    into.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")

    async with anyio.create_task_group() as tg:
        for into in received:
            tg.start_soon(read, into)
        with anyio.fail_after(5):
            while sum(len(r) for r in received) < 12:  # role chunk and five pieces each
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        assert [len(r) for r in received] == [6, 6] and fake.slots(LLM).active == 2
        fake.gate.set()
    assert ["".join(r) for r in received] == ["Hello from the fake model."] * 2
