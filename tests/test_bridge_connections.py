"""Connections to LM Studio: idle ones dropped before LM Studio drops them, and the one retry.

A request sent on a kept-alive connection that LM Studio is closing at that very moment fails
before any answer arrives ("closed the connection before answering"). The stand-in here makes that
race certain: it answers one request per connection, keeps the connection open, and closes it
without a word when the next request arrives on it. Such a request is retried once, on another
connection; a request whose answer had begun is never retried.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from mcp import Client

from mcp_server.errors import BadUpstreamResponse
from mcp_server.lmstudio import LMStudioClient
from mcp_server.server import Bridge
from tests.conftest import bridge_settings, default_models
from tests.fake_lmstudio import FakeLMStudio, serve
from tests.test_bridge_e2e import _text

pytestmark = pytest.mark.anyio

LISTING = {"models": [
    {"type": "llm", "key": "m/chat", "loaded_instances": [{"id": "m/chat", "config": {"parallel": 2}}]},
    {"type": "embedding", "key": "m/embed", "loaded_instances": []},
]}
_CHUNKS = [
    {"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
]
STREAM = "".join(f"data: {json.dumps(c)}\n\n" for c in _CHUNKS) + "data: [DONE]\n\n"
EMBEDDINGS = {"data": [{"index": 0, "embedding": [0.6, 0.8]}], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
ANSWERS: dict[str, tuple[str, bytes]] = {
    "/api/v1/models": ("application/json", json.dumps(LISTING).encode()),
    "/v1/chat/completions": ("text/event-stream", STREAM.encode()),
    "/v1/embeddings": ("application/json", json.dumps(EMBEDDINGS).encode()),
}


class OneRequestPerConnection:
    """HTTP/1.1 that answers the first request on each connection, keeps the connection open, and
    closes it unanswered when a second request arrives; paths in `cut` get half an answer."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered: list[str] = []
        self.dropped = 0  # requests that arrived on a used connection and got no answer
        self.cut: set[str] = set()

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        served = False
        async with stream:
            while True:
                try:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    lines = head.decode().split("\r\n")
                    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
                    length = int(fields.get("content-length", "0"))
                    while len(buffer) < length:
                        buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                buffer = buffer[length:]
                path = lines[0].split(" ")[1]
                if served:
                    self.dropped += 1
                    return  # this connection already answered one: close it, unanswered
                served = True
                self.answered.append(path)
                content_type, body = ANSWERS.get(path, ("application/json", b'{"error": "not here"}'))
                status = "200 OK" if path in ANSWERS else "404 Not Found"
                head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                            "Connection: keep-alive\r\n\r\n").encode()
                if path in self.cut:
                    await stream.send(head_out + body[: len(body) // 2])
                    return
                await stream.send(head_out + body)


@asynccontextmanager
async def one_request_per_connection() -> AsyncIterator[tuple[OneRequestPerConnection, str]]:
    server = OneRequestPerConnection()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        yield server, f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
        tg.cancel_scope.cancel()


async def test_a_request_on_a_connection_closed_under_it_is_retried_once() -> None:
    async with one_request_per_connection() as (server, url), LMStudioClient(url) as client:
        assert [m.id for m in await client.list_models()] == ["m/chat", "m/embed"]
        for _ in range(3):
            assert (await client.post_json("/v1/embeddings", {"model": "m/embed", "input": "x"}))["data"]
            async with client.stream("/v1/chat/completions", {"model": "m/chat", "messages": []}) as chunks:
                assert [chunk async for chunk in chunks] == _CHUNKS
    # Every request after the first met a connection closed under it, and went out again on a new one.
    assert server.dropped == 6 and len(server.answered) == 7 and server.connections == 7


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_calls_through_the_bridge_survive_connections_closed_under_them(mode: str) -> None:
    async with one_request_per_connection() as (server, url):
        async with Bridge(bridge_settings(url)) as bridge, Client(bridge.server, mode=mode) as client:
            with anyio.fail_after(10):
                while "chat_m_chat" not in {t.name for t in (await client.list_tools()).tools}:
                    await anyio.sleep(0.05)
            for _ in range(3):
                chat = await client.call_tool("chat_m_chat", {"prompt": "hi"})
                assert not chat.is_error and _text(chat) == "Hello there"
                embedded = await client.call_tool("embed_m_embed", {"input": "x"})
                assert not embedded.is_error, _text(embedded)
    assert server.dropped >= 6


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_no_retry_once_the_answer_began(path: str) -> None:
    async with one_request_per_connection() as (server, url), LMStudioClient(url) as client:
        server.cut.add(path)
        with pytest.raises(BadUpstreamResponse, match="closed the connection in the middle of the answer"):
            if path == "/v1/embeddings":
                await client.post_json(path, {"model": "m/embed", "input": "x"})
            else:
                async with client.stream(path, {"model": "m/chat", "messages": []}) as chunks:
                    async for _ in chunks:
                        pass
    assert server.answered == [path]  # sent once: a second answer would repeat what had arrived


async def test_idle_connections_are_dropped_before_the_server_drops_them() -> None:
    fake = FakeLMStudio(default_models())
    body = {"model": "text-embedding-nomic-embed-text-v1.5", "input": "x"}
    async with serve(fake.app) as url, LMStudioClient(url, keepalive_expiry=1.0) as client:
        await client.post_json("/v1/embeddings", body)
        await client.post_json("/v1/embeddings", body)  # at once: the same connection
        await anyio.sleep(2.5)  # idle longer than the expiry (the fake, like LM Studio, would wait 5 s)
        await client.post_json("/v1/embeddings", body)
    ports = [request["client"] for request in fake.requests]
    assert ports[0] == ports[1] and ports[2] != ports[1]
