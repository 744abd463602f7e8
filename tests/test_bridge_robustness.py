"""Nothing LM Studio sends can crash a call, and input the bridge cannot send on is refused by name.

An LM Studio stand-in answers in shapes nobody documented; every one must come back as an `is_error`
result saying LM Studio's answer could not be read, from which endpoint, with the text that had
arrived, and no internal exception text. The parsers are also fuzzed with hypothesis. Input no JSON
encoder can write (lone surrogates, NaN, nesting too deep) must be an argument error naming the
field, over every transport: the SDK clients cannot even send it over stdio and HTTP, so there the
JSON-RPC is written by hand, as a client in another language could send it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server.calls import Generation, read_chunk, read_embeddings
from mcp_server.jsonsafe import MAX_DEPTH, unsendable
from mcp_server.lmstudio import ModelInfo, Unreadable, parse_listing
from mcp_server.server import Bridge
from mcp_server.tools import build_tools
from tests.conftest import (
    CHAT_TOOL,
    EMBED_TOOL,
    Connect,
    _env_for,
    bridge_settings,
    default_models,
    llm_hub_command,
)
from tests.fake_lmstudio import FakeLMStudio, serve
from tests.test_bridge_e2e import _text, _wait_for

pytestmark = pytest.mark.anyio

PARTIAL = "PARTIAL-TEXT-"
_GOOD_CHUNK = {"choices": [{"index": 0, "delta": {"content": PARTIAL}, "finish_reason": None}]}

# Prompt -> the chunk LM Studio sends after one good chunk (the seven shapes, and more).
STREAM_GARBAGE: dict[str, Any] = {
    "chunk-list": [1, 2],
    "chunk-string": "hello",
    "chunk-null": None,
    "choices-object": {"choices": {"delta": {"content": "x"}}},
    "choices-strings": {"choices": ["x", "y"]},
    "content-number": {"choices": [{"delta": {"content": 5}}]},
    "delta-list": {"choices": [{"delta": ["x"]}]},
    "finish-number": {"choices": [{"delta": {}, "finish_reason": 1}]},
    "usage-string": {"choices": [], "usage": "lots"},
    "usage-count-text": {"choices": [], "usage": {"completion_tokens": "3"}},
}
# Input text -> the body of LM Studio's embeddings answer (raw JSON text, as NaN has no Python literal).
EMBED_GARBAGE: dict[str, str] = {
    "data-string": '{"data": "nope"}',
    "data-strings": '{"data": ["a"]}',
    "data-object": '{"data": {"embedding": [0.1]}}',
    "embedding-strings": '{"data": [{"index": 0, "embedding": ["1", "2"]}]}',
    "embedding-nan": '{"data": [{"index": 0, "embedding": [NaN, 1.0]}]}',
    "no-vectors": '{"data": []}',
    "usage-string": '{"data": [{"index": 0, "embedding": [0.1, 0.2]}], "usage": "x"}',
}
INTERNAL_TEXT = ("has no attribute", "object is not", "Traceback", "TypeError", "KeyError", "AttributeError",
                 "ValueError", "not subscriptable", "Internal server error", "recursion", "RecursionError")


def _sse(*chunks: Any) -> AsyncIterator[str]:
    async def body() -> AsyncIterator[str]:
        for chunk in chunks:
            yield f"data: {chunk if isinstance(chunk, str) and chunk.startswith(('{', '[')) else json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return body()


def garbage_lmstudio(fake: FakeLMStudio) -> Starlette:
    """The fake's listing, but chat and embeddings answered in the shape the prompt or input names."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if prompt == "surrogate":  # JSON may escape a lone surrogate; no UTF-8 encoder can write it
            chunks = ['{"choices": [{"delta": {"content": "A\\ud800B"}}]}',
                      {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
            return StreamingResponse(_sse(*chunks), media_type="text/event-stream")
        return StreamingResponse(_sse(_GOOD_CHUNK, STREAM_GARBAGE[prompt]), media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        return Response(EMBED_GARBAGE[body["input"]], media_type="application/json")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Mount("/", app=fake.app),
    ])


def _assert_readable_failure(result: types.CallToolResult, endpoint: str) -> str:
    text = _text(result)
    assert result.is_error, text
    assert f"LM Studio's answer from {endpoint} could not be read" in text
    for internal in INTERNAL_TEXT:
        assert internal not in text, text
    return text


async def test_garbled_answers_are_clear_errors_with_the_partial_text(connect: Connect) -> None:
    fake = FakeLMStudio(default_models())
    async with serve(garbage_lmstudio(fake)) as url, connect(bridge_settings(url)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        for prompt in STREAM_GARBAGE:
            result = await client.call_tool(CHAT_TOOL, {"prompt": prompt})
            text = _assert_readable_failure(result, "/v1/chat/completions")
            assert f"Partial answer before the failure:\n{PARTIAL}" in text, (prompt, text)
        for text_in in EMBED_GARBAGE:
            _assert_readable_failure(await client.call_tool(EMBED_TOOL, {"input": text_in}), "/v1/embeddings")
        # A lone surrogate in the answer costs one character, not the answer (or the connection).
        surrogate = await client.call_tool(CHAT_TOOL, {"prompt": "surrogate"})
        assert not surrogate.is_error and _text(surrogate) == "A\ufffdB"
        assert surrogate.structured_content and surrogate.structured_content["text"] == "A\ufffdB"
        assert not (await client.call_tool("list_models", {})).is_error  # still serving


async def test_timed_out_call_carries_its_partial_answer(connect: Connect, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    fake.chunk_text = [f"piece{i} " for i in range(200)]
    fake.chunk_delay = 0.05
    async with connect(bridge_settings(url, request_timeout=1.5)) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        result = await client.call_tool(CHAT_TOOL, {"prompt": "Count"})
    text = _text(result)
    assert result.is_error and "did not finish within 1.5 s" in text
    partial = text.split("Partial answer before the failure:\n", 1)[1]
    assert partial.startswith("piece0 piece1 ") and "".join(fake.chunk_text).startswith(partial)
    assert f"{len(partial.split())} tokens had arrived" in text


# -- answers nested too deeply for Python's JSON parser ------------------------------------------

def _deep(depth: int = 5000) -> str:
    """JSON nested `depth` levels: `json.loads` raises RecursionError on it, not a ValueError."""
    return "[" * depth + "]" * depth


class DeepListing:
    """An LM Studio whose model listings (every surface) are nested 5000 deep while `on` is set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.on = False
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on and scope["type"] == "http" and scope["path"].endswith("/models"):
            self.served += 1
            await Response('{"models": ' + _deep() + ', "data": []}', media_type="application/json")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def deep_lmstudio(fake: FakeLMStudio) -> DeepListing:
    """The fake, with chat and embeddings answered nested 5000 deep where the prompt or input says so."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if prompt == "deep-error":
            return Response(_deep(), status_code=500, media_type="application/json")
        if prompt == "deep-json":  # a model repeating `[`, unfinished: what structured output may produce
            chunks = [{"choices": [{"delta": {"content": "[" * 3000}}]}, {"choices": [{"delta": {}, "finish_reason": "length"}]}]
            return StreamingResponse(_sse(*chunks), media_type="text/event-stream")
        last = {"deep-chunk": _deep(), "deep-error-chunk": '{"error": ' + _deep() + "}"}.get(
            prompt, {"choices": [{"delta": {}, "finish_reason": "stop"}]})  # any other prompt is answered
        return StreamingResponse(_sse(_GOOD_CHUNK, last), media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        if body["input"] == "deep-error":
            return Response('{"error": ' + _deep() + "}", status_code=500, media_type="application/json")
        return Response('{"data": [{"index": 0, "embedding": ' + _deep() + "}]}", media_type="application/json")

    return DeepListing(Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Mount("/", app=fake.app),
    ]))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_answers_nested_too_deeply_are_clear_errors_and_the_bridge_keeps_polling(mode: str) -> None:
    from mcp import Client

    fake = FakeLMStudio(default_models())
    app = deep_lmstudio(fake)
    async with serve(app) as url, Bridge(bridge_settings(url)) as bridge, Client(bridge.server, mode=mode) as client:
        registry = bridge.registry
        await _wait_for(lambda: CHAT_TOOL in registry.tools)
        tools = dict(registry.tools)
        # A listing nested 5000 deep is a failed poll: the last tools stay, and polling goes on.
        app.on = True
        await _wait_for(lambda: app.served >= 3)
        assert registry.tools == tools and not registry.reachable
        assert registry.last_error and "could not be read" in registry.last_error and "nested too deeply" in registry.last_error
        assert "recursion" not in registry.last_error.lower()

        for prompt in ("deep-chunk", "deep-error-chunk"):
            text = _assert_readable_failure(await client.call_tool(CHAT_TOOL, {"prompt": prompt}), "/v1/chat/completions")
            assert "a streamed chunk is nested too deeply to be read" in text
            assert f"Partial answer before the failure:\n{PARTIAL}" in text, (prompt, text)
        text = _assert_readable_failure(await client.call_tool(EMBED_TOOL, {"input": "deep"}), "/v1/embeddings")
        assert "nested too deeply to be read" in text
        for tool, arguments in ((CHAT_TOOL, {"prompt": "deep-error"}), (EMBED_TOOL, {"input": "deep-error"})):
            result = await client.call_tool(tool, arguments)  # an error body: classified by its status
            text = _text(result)
            assert result.is_error and text.endswith("answered with an error: HTTP 500"), text
            assert "recursion" not in text.lower()
        # Structured output the model never closed: the answer is kept, noted as not valid JSON.
        schema = {"type": "array"}
        answer = await client.call_tool(CHAT_TOOL, {"prompt": "deep-json", "json_schema": schema})
        assert not answer.is_error, _text(answer)
        assert answer.content[0].text == "[" * 3000  # type: ignore[union-attr]
        assert "(note: the model's answer is not valid JSON)" in _text(answer)

        catalog = await client.call_tool("list_models", {})  # still serving
        assert not catalog.is_error and "recursion" not in _text(catalog).lower()
        app.on = False  # and still polling: LM Studio readable again is seen
        await _wait_for(lambda: registry.reachable)
        assert registry.tools == tools and registry.last_error is None
        assert not (await client.call_tool(CHAT_TOOL, {"prompt": "hi"})).is_error


async def test_an_unexpected_failure_reading_a_listing_is_a_failed_poll(
    lmstudio: tuple[FakeLMStudio, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mcp import Client

    from mcp_server import lmstudio as lmstudio_module

    def broken_parser(payload: Any) -> list[ModelInfo]:
        raise TypeError("SECRET-LISTING-TEXT")

    fake, url = lmstudio
    logged: list[str] = []
    sink = logger.add(logged.append, level="WARNING", format="{level} {message}")
    try:
        async with Bridge(bridge_settings(url)) as bridge, Client(bridge.server) as client:
            registry = bridge.registry
            await _wait_for(lambda: CHAT_TOOL in registry.tools)
            tools = dict(registry.tools)
            monkeypatch.setitem(lmstudio_module._PARSERS, "lmstudio-v1", broken_parser)
            calls = fake.listing_calls
            await _wait_for(lambda: fake.listing_calls >= calls + 3)  # polling goes on
            assert registry.tools == tools and not registry.reachable
            assert registry.last_error and "TypeError" in registry.last_error
            assert not (await client.call_tool("list_models", {})).is_error
            monkeypatch.undo()
            await _wait_for(lambda: registry.reachable)
            assert registry.tools == tools
    finally:
        logger.remove(sink)
    failed = [line for line in logged if "model poll failed" in line]
    assert len(failed) == 1 and "TypeError" in failed[0], logged  # once, not once per poll
    assert not any("SECRET" in line for line in logged), logged


async def test_an_unexpected_failure_in_a_call_is_a_generic_error(
    lmstudio: tuple[FakeLMStudio, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mcp import Client

    from mcp_server import server as server_module

    def broken(*args: Any) -> types.CallToolResult:
        raise RuntimeError("SECRET-COMPLETION-TEXT")

    _, url = lmstudio
    logged: list[str] = []
    sink = logger.add(logged.append, level="DEBUG", format="{level} {message} {exception}")
    try:
        async with Bridge(bridge_settings(url)) as bridge, Client(bridge.server) as client:
            await _wait_for(lambda: CHAT_TOOL in bridge.registry.tools)
            monkeypatch.setattr(server_module, "generation_result", broken)
            result = await client.call_tool(CHAT_TOOL, {"prompt": "hi"})
            monkeypatch.undo()
            assert bridge.in_flight == {}
            assert not (await client.call_tool(CHAT_TOOL, {"prompt": "hi"})).is_error  # still serving
    finally:
        logger.remove(sink)
    assert result.is_error
    assert _text(result) == f"The bridge failed on this call ({CHAT_TOOL}); its log has the error type."
    errors = [line for line in logged if line.startswith("ERROR")]
    assert len(errors) == 1 and CHAT_TOOL in errors[0] and "RuntimeError" in errors[0], logged
    assert not any("SECRET" in line for line in logged), logged


# -- unsendable input ----------------------------------------------------------------------------

_DEEP = "[" * (MAX_DEPTH + 10) + "]" * (MAX_DEPTH + 10)
# (JSON text of the arguments, the field the error must name, what it must say)
UNSENDABLE: list[tuple[str, str, str]] = [
    ('{"prompt": "\\ud800"}', "arguments.prompt", "lone surrogate"),
    ('{"messages": [{"role": "user", "content": "ok \\udfff"}]}', "arguments.messages[0].content", "lone surrogate"),
    ('{"prompt": "x", "stop": ' + _DEEP + "}", "arguments.stop[0]", f"nested deeper than {MAX_DEPTH} levels"),
    ('{"prompt": "x", "json_schema": {"type": "object", "maximum": NaN}}', "arguments.json_schema.maximum", "is nan"),
    ('{"prompt": "x", "json_schema": {"maximum": Infinity}}', "arguments.json_schema.maximum", "is inf"),
]


def _assert_argument_error(result: dict[str, Any], field: str, says: str) -> None:
    assert result.get("isError") is True, result
    text = result["content"][0]["text"]
    assert text.startswith(f"Invalid arguments for {CHAT_TOOL}: {field} ") and says in text, text


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_unsendable_input_is_an_argument_error_in_process(mode: str, lmstudio: tuple[FakeLMStudio, str]) -> None:
    from mcp import Client

    fake, url = lmstudio
    async with Bridge(bridge_settings(url)) as bridge, Client(bridge.server, mode=mode) as client:
        await _wait_for(lambda: fake.listing_calls > 0)
        # The in-memory transport turns NaN and Infinity into null before the bridge sees them.
        for arguments, field, says in [case for case in UNSENDABLE if "is nan" not in case[2] and "is inf" not in case[2]]:
            result = await client.call_tool(CHAT_TOOL, json.loads(arguments))
            _assert_argument_error(result.model_dump(by_alias=True), field, says)
    assert fake.requests == []  # nothing reached LM Studio


def _call(request_id: int, arguments: str) -> str:
    return (f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", '
            f'"params": {{"name": "{CHAT_TOOL}", "arguments": {arguments}, "_meta": {{}}}}}}')


async def test_unsendable_input_is_an_argument_error_over_stdio(lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    process = await anyio.open_process([llm_hub_command()], env=_env_for(bridge_settings(url)), stderr=None)
    assert process.stdin and process.stdout
    lines = [
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}),
        '{"jsonrpc": "2.0", "method": "notifications/initialized"}',
        '{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}',  # waits for the first discovery
        *(_call(10 + i, arguments) for i, (arguments, _, _) in enumerate(UNSENDABLE)),
        # Deeper than pydantic's parser goes (about 200 levels): parsed again, refused by name.
        _call(20, '{"prompt": "x", "stop": ' + "[" * 300 + "]" * 300 + "}"),
        # An id the answer would have to echo cannot be answered; it must not break the connection.
        _call(99, '{"prompt": "\\ud800"}').replace('"id": 99', '"id": "x\\ud800"'),
        '{"jsonrpc": "2.0", "id": 3, "method": "tools/list"}',
    ]
    try:
        await process.stdin.send(("\n".join(lines) + "\n").encode())
        answers: dict[int, dict[str, Any]] = {}
        buffered = b""
        with anyio.fail_after(30):
            while 3 not in answers:
                buffered += await process.stdout.receive()
                *complete, buffered = buffered.split(b"\n")
                for line in complete:
                    message = json.loads(line)
                    if "id" in message:
                        answers[message["id"]] = message
    finally:
        await process.stdin.aclose()
        with anyio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()
    assert CHAT_TOOL in {tool["name"] for tool in answers[2]["result"]["tools"]}
    assert len(answers) == 4 + len(UNSENDABLE)
    for i, (_, field, says) in enumerate(UNSENDABLE):
        _assert_argument_error(answers[10 + i]["result"], field, says)
    _assert_argument_error(answers[20]["result"], "arguments.stop[0]", f"nested deeper than {MAX_DEPTH} levels")
    assert fake.requests == []


def _sse_result(response: httpx2.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("application/json"):
        return response.json()["result"]
    data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1])["result"]


@pytest.mark.parametrize("era", ["handshake", "2026-07-28"])
async def test_unsendable_input_is_an_argument_error_over_http(era: str, lmstudio: tuple[FakeLMStudio, str]) -> None:
    fake, url = lmstudio
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with Bridge(bridge_settings(url)) as bridge, serve(bridge.http_app()) as base:
        async with httpx2.AsyncClient(base_url=base, headers=headers) as http:
            await _wait_for(lambda: CHAT_TOOL in bridge.registry.tools)
            if era == "handshake":
                init = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
                session = {"Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-06-18"}
                await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            else:
                session = {"MCP-Protocol-Version": era, "Mcp-Method": "tools/call", "Mcp-Name": CHAT_TOOL}
            meta = ('{"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientInfo": '
                    '{"name": "raw", "version": "1"}, "io.modelcontextprotocol/clientCapabilities": {}}')
            for i, (arguments, field, says) in enumerate(UNSENDABLE):
                body = _call(10 + i, arguments)
                if era != "handshake":
                    body = body.replace('"_meta": {}', f'"_meta": {meta}')
                response = await http.post("/mcp", content=body, headers=session)
                _assert_argument_error(_sse_result(response), field, says)
    assert fake.requests == []


# -- fuzzing the parsers -------------------------------------------------------------------------

_KEYS = st.sampled_from([
    "choices", "delta", "content", "text", "finish_reason", "usage", "prompt_tokens", "completion_tokens",
    "total_tokens", "index", "data", "embedding", "error", "models", "key", "id", "type", "display_name",
    "loaded_instances", "config", "parallel", "context_length", "max_context_length", "capabilities",
    "quantization", "name", "state", "arch", "architecture", "publisher", "owned_by", "vision", "trained_for_tool_use",
])
_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=8) | st.sampled_from(
    ["", "stop", "llm", "embedding", "embeddings", "vlm", "loaded", "a/b", "\ud800", "x\udfffy"]
)
_SCALARS = st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**310) | st.floats() | _TEXT
JSON = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS | _TEXT, inner, max_size=6),
    max_leaves=24,
)
def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The documented shape most of the time, anything at all now and then, at every level."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda documented: valid if documented else JSON)


_COUNT = st.integers(0, 10_000) | st.integers(min_value=2**53 - 1, max_value=2**64)
_NUMBER = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-3, 3)
_USAGE = st.fixed_dictionaries({}, optional={k: _mostly(_COUNT) for k in ("prompt_tokens", "completion_tokens",
                                                                         "total_tokens")})
_DELTA = st.fixed_dictionaries({}, optional={"role": _mostly(st.just("assistant")), "content": _mostly(_TEXT | st.none())})
_CHOICE = st.fixed_dictionaries(
    {"index": _mostly(st.integers(0, 2))},
    optional={"delta": _mostly(_DELTA), "text": _mostly(_TEXT), "finish_reason": _mostly(st.sampled_from([None, "stop", "length"]))},
)
CHUNKS = _mostly(st.fixed_dictionaries(
    {"choices": _mostly(st.lists(_mostly(_CHOICE), max_size=2))}, optional={"usage": _mostly(_USAGE | st.none())}
))


@st.composite
def embeddings_answers(draw: st.DrawFn) -> tuple[Any, int]:
    texts, dimensions = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rows = [
        {"index": draw(_mostly(st.just(index))),
         "embedding": draw(_mostly(st.lists(_mostly(_NUMBER), min_size=dimensions, max_size=dimensions)))}
        for index in draw(st.permutations(range(texts)))
    ]
    payload: dict[str, Any] = {"data": draw(_mostly(st.just(rows)))}
    if draw(st.booleans()):
        payload["usage"] = draw(_mostly(_USAGE))
    return draw(_mostly(st.just(payload)).filter(lambda p: isinstance(p, dict))), texts


_ID = _mostly(st.sampled_from(["google/gemma-3-270m", "qwen/qwen3-8b", "text-embedding-nomic"]) | _TEXT)
_CONFIG = st.fixed_dictionaries({}, optional={"context_length": _mostly(_COUNT), "parallel": _mostly(st.integers(1, 8))})
_V1_MODEL = st.fixed_dictionaries({"key": _ID}, optional={
    "type": _mostly(st.sampled_from(["llm", "embedding"])), "display_name": _mostly(_TEXT),
    "quantization": _mostly(st.fixed_dictionaries({"name": _mostly(_TEXT)})), "max_context_length": _mostly(_COUNT),
    "capabilities": _mostly(st.dictionaries(st.sampled_from(["vision", "trained_for_tool_use", "reasoning"]), JSON)),
    "loaded_instances": _mostly(st.lists(_mostly(st.fixed_dictionaries({"id": _TEXT, "config": _mostly(_CONFIG)})),
                                         max_size=3)),
})
_V0_MODEL = st.fixed_dictionaries({"id": _ID}, optional={
    "type": _mostly(st.sampled_from(["llm", "vlm", "embeddings"])), "state": _mostly(st.sampled_from(["loaded", "not-loaded"])),
    "capabilities": _mostly(st.lists(_mostly(st.just("tool_use")))), "max_context_length": _mostly(_COUNT),
    "quantization": _mostly(_TEXT), "owned_by": _mostly(_TEXT),
})
LISTINGS = st.one_of(
    st.tuples(st.just("lmstudio-v1"), _mostly(st.fixed_dictionaries({"models": _mostly(st.lists(_mostly(_V1_MODEL), max_size=3))}))),
    st.tuples(st.just("lmstudio-v0"), _mostly(st.fixed_dictionaries({"data": _mostly(st.lists(_mostly(_V0_MODEL), max_size=3))}))),
    st.tuples(st.just("openai"), _mostly(st.fixed_dictionaries({"data": _mostly(st.lists(_mostly(_V0_MODEL), max_size=3))}))),
)
FUZZ = settings(max_examples=int(os.environ.get("LLM_HUB_FUZZ_EXAMPLES", "400")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _json_safe(value: Any) -> None:
    """What the SDK will have to write: strict JSON, in UTF-8."""
    json.dumps(value, allow_nan=False).encode("utf-8")


@FUZZ
@given(st.lists(CHUNKS, max_size=4))
def test_fuzz_stream_chunks_are_read_or_refused(chunks: list[Any]) -> None:
    gen = Generation(model="m")
    for chunk in chunks:
        try:
            piece = read_chunk(chunk, gen)
        except Unreadable as exc:
            assert unsendable(str(exc)) is None
            return
        assert isinstance(piece, str)
        if piece:
            gen.add(piece)
    assert all(type(v) is int for v in gen.usage.values())
    _json_safe(gen.structured())


@FUZZ
@given(embeddings_answers())
def test_fuzz_embeddings_are_read_or_refused(answer: tuple[dict[str, Any], int]) -> None:
    payload, texts = answer
    try:
        vectors = read_embeddings(payload, texts)
    except Unreadable:
        return
    assert len(vectors) == texts and len({len(v) for v in vectors}) == 1
    assert all(type(x) is float and math.isfinite(x) for v in vectors for x in v)
    _json_safe(vectors)


@FUZZ
@given(LISTINGS)
def test_fuzz_listings_are_read_or_refused(listing: tuple[Any, Any]) -> None:
    flavour, payload = listing
    try:
        models = parse_listing(flavour, payload)
    except Unreadable:
        return
    for model in models:
        assert isinstance(model, ModelInfo) and isinstance(model.id, str) and model.id
        assert model.slots is None or (type(model.slots) is int and model.slots >= 1)
        assert model.context_length is None or type(model.context_length) is int
        assert all(isinstance(c, str) for c in model.capabilities)
        _json_safe(model.as_dict())
    # Whatever was read becomes tools that the SDK can list.
    tools = build_tools(models, ["chat", "embed", "complete"], ["*"], [])
    types.ListToolsResult(tools=[t.definition for t in tools.values()]).model_dump_json()
