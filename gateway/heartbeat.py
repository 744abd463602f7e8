"""Heartbeats for a call the gateway holds before its bridge begins to answer.

A call can wait here for a free connection towards its bridge (`LLM_HUB_BRIDGE_CONNECTIONS`) and then for the
bridge's first message, which itself may wait for a free connection towards LM Studio. The bridge covers its own
waits with heartbeats; until its first message arrives, the gateway sends the same kind itself: progress
without a message, every `LLM_HUB_HEARTBEAT_INTERVAL`, so the caller can tell a queued call from a dead one.
Once the bridge has said anything, its own heartbeats take over.

Progress must increase. The bridge's first progress is at least 0.001 (its heartbeats step by that much, text
counts tokens), so the gateway's values climb towards 0.001 without reaching it, however many there are.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.types import Message, Send

from gateway.upstream import Progress

_BRIDGE_FIRST_PROGRESS = 0.001
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


def beat_progress(count: int) -> float:
    """The progress value of the gateway's `count`-th heartbeat (1, 2, ...) for a call."""
    return _BRIDGE_FIRST_PROGRESS * count / (count + 1)


@asynccontextmanager
async def kept_alive(progress: Progress | None, interval: float) -> AsyncIterator[Progress | None]:
    """`progress`, with heartbeats sent through it until the first update passes; None stays None (the
    caller asked for no progress)."""
    if progress is None:
        yield None
        return
    heard = anyio.Event()

    async def relay(value: float, total: float | None, message: str | None) -> None:
        heard.set()
        await progress(value, total, message)

    async def beat() -> None:
        for count in itertools.count(1):
            with anyio.move_on_after(interval):
                await heard.wait()
            if heard.is_set():
                return
            await progress(beat_progress(count), None, None)

    async with _beside(beat):
        yield relay


class KeptAliveAnswer:
    """The ASGI `send` of a fast-path call (2026 era, relayed as bytes), kept alive until the bridge answers.

    While nothing has been sent, it opens an SSE response itself and sends heartbeats on it (notifications
    for the caller's progress token). The answer that follows then continues that stream, as the status is
    already out: an SSE answer as it comes, a whole JSON answer (a result, or an error such as a 503's) as
    one event.
    """

    def __init__(self, send: Send, token: str | int, interval: float) -> None:
        self.send = send
        self.token = token
        self.interval = interval
        self._lock = anyio.Lock()  # a heartbeat and the answer never interleave their messages
        self._answering = False
        self._opened = False  # by a heartbeat: the answer's own start is dropped
        self._answer_is_sse = False
        self._held = b""

    async def __call__(self, message: Message) -> None:
        async with self._lock:
            self._answering = True
            if not self._opened:
                await self.send(message)
            elif message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                self._answer_is_sse = content_type.startswith(b"text/event-stream")
            elif self._answer_is_sse:
                await self.send(message)
            else:
                self._held += message.get("body", b"")
                if not message.get("more_body", False):
                    data = b"".join(b"data: " + line + b"\n" for line in self._held.splitlines())
                    await self.send({"type": "http.response.body", "body": b"event: message\n" + data + b"\n"})

    async def beat(self) -> None:
        for count in itertools.count(1):
            await anyio.sleep(self.interval)
            async with self._lock:
                if self._answering:
                    return
                if not self._opened:
                    self._opened = True
                    await self.send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                params = {"progressToken": self.token, "progress": beat_progress(count)}
                event = {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
                body = b"event: message\ndata: " + json.dumps(event).encode() + b"\n\n"
                await self.send({"type": "http.response.body", "body": body, "more_body": True})


@asynccontextmanager
async def kept_alive_answer(send: Send, token: Any, interval: float) -> AsyncIterator[Send]:
    """`send`, kept alive as `KeptAliveAnswer` describes while the context is open; unchanged when the caller
    gave no usable progress token (it asked for no progress)."""
    if isinstance(token, bool) or not isinstance(token, str | int):
        yield send
        return
    answer = KeptAliveAnswer(send, token, interval)
    async with _beside(answer.beat):
        yield answer


@asynccontextmanager
async def _beside(task: Any) -> AsyncIterator[None]:
    """Runs `task` while the context is open. An error of the body leaves as itself, not in an exception group,
    so callers catch it as they would without the heartbeats."""
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(task)
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - raised again below, after the heartbeats stopped
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
