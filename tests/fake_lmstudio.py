"""A faithful fake LM Studio server for tests, benchmarks and manual runs.

`FakeLMStudio.app` is a Starlette app reproducing the response shapes described in
docs/lmstudio-api.md: the three model-listing surfaces, the OpenAI-compatible inference
endpoints (streamed and not), LM Studio's error envelopes, and failure modes a bridge has to
survive. `serve()` runs any ASGI app on a real uvicorn server on a free loopback port.

It also behaves like one box of a fleet (docs/lmstudio-api.md, "A box in a fleet"): each model is
loaded or only downloaded; a request for a downloaded model loads it first (just in time, taking
`load_delay` seconds), and with `auto_evict` that unloads the model loaded just in time before it,
while models loaded by hand stay; a loaded model with `parallel` slots runs that many requests at
once and the rest wait for a slot. `loads` and `evictions` count per model. A marker such as
`[[fake:malformed_midstream]]` anywhere in a request applies that mode to that request alone.

Standalone: `python tests/fake_lmstudio.py --port 1234 --models a/b,c/d --surface v1`; a fleet box:
`--models a/b,c/d --loaded a/b --parallel 4 --load-delay 2 --token-delay 0.02` (`GET /fake/stats`
reports loads, evictions and slots in use).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import anyio
import anyio.lowlevel
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

ModelType = Literal["llm", "vlm", "embeddings"]
Surface = Literal["v1", "v0", "openai"]
Mode = Literal["ok", "slow", "die_midstream", "no_models_loaded", "malformed", "malformed_midstream", "error500"]

DEFAULT_CHUNKS = ["Hello", " from", " the", " fake", " model", "."]
NO_MODELS_LOADED = (
    "No models loaded. Please load a model in the developer page or use the `lms load` command."
)
# `[[fake:<mode>]]` in a request body applies <mode> to that request only (see `marker`).
_MODE_MARKER = re.compile(rb"\[\[fake:(\w+)\]\]")
# uvicorn's grace period for in-flight requests when serve() exits; streams still open after it
# are cancelled, so a test that leaves a slow stream running does not hang on teardown.
_GRACEFUL_SHUTDOWN_SECONDS = 1.0


@dataclass
class FakeModel:
    id: str  # e.g. "google/gemma-3-270m"
    # "llm" | "vlm" | "embeddings" (v0 names); the v1 surface reports embeddings as
    # "embedding" and vlm as "llm" with capabilities.vision true.
    type: str = "llm"
    loaded: bool = True
    display_name: str | None = None
    context_length: int = 4096
    quantization: str = "Q4_K_M"
    publisher: str = "google"
    arch: str = "gemma3"
    capabilities: list[str] = field(default_factory=list)  # v0 names, e.g. ["tool_use"]
    # Predictions a loaded instance runs at once, reported as loaded_instances[].config.parallel;
    # further requests wait for a slot. None: not reported (older LM Studio) and no limit.
    parallel: int | None = None

    def __post_init__(self) -> None:
        if self.type not in get_args(ModelType):
            raise ValueError(f"unknown model type {self.type!r}; use one of {get_args(ModelType)}")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"parallel must be at least 1, not {self.parallel}")

    @property
    def is_embedding(self) -> bool:
        return self.type == "embeddings"

    def v1_entry(self, *, loaded: bool) -> dict[str, Any]:
        params = _params_string(self.id)
        bits = _bits_per_weight(self.quantization)
        return {
            "type": "embedding" if self.is_embedding else "llm",
            "publisher": self.publisher,
            "key": self.id,
            "display_name": self.display_name or _default_display_name(self.id),
            "architecture": self.arch,
            "quantization": {"name": self.quantization, "bits_per_weight": bits},
            "size_bytes": _size_bytes(params, bits),
            "params_string": params,
            "loaded_instances": [{"id": self.id, "config": self._instance_config()}] if loaded else [],
            "max_context_length": self.context_length,
            "format": "gguf",
            "capabilities": {
                "vision": self.type == "vlm" or "vision" in self.capabilities,
                "trained_for_tool_use": "tool_use" in self.capabilities,
            },
        }

    def _instance_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"context_length": self.context_length}
        if self.parallel is not None:
            config["parallel"] = self.parallel
        return config

    def v0_entry(self, *, loaded: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "type": self.type,
            "publisher": self.publisher,
            "arch": self.arch,
            "compatibility_type": "gguf",
            "quantization": self.quantization,
            "state": "loaded" if loaded else "not-loaded",
            "max_context_length": self.context_length,
            "capabilities": list(self.capabilities),
        }

    def openai_entry(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "owned_by": self.publisher}


def _default_display_name(model_id: str) -> str:
    return re.sub(r"[-_]+", " ", model_id.rsplit("/", 1)[-1]).title()


def _params_string(model_id: str) -> str | None:
    match = re.search(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([mb])(?![a-z0-9])", model_id.lower())
    return f"{match.group(1)}{match.group(2).upper()}" if match else None


def _bits_per_weight(quantization: str) -> float:
    match = re.search(r"\d+", quantization)
    return float(match.group()) if match else 4.0


def _size_bytes(params: str | None, bits: float) -> int:
    if params is None:
        return 1_000_000_000
    scale = 1e9 if params.endswith("B") else 1e6
    return int(float(params[:-1]) * scale * bits / 8)


def _error(
    message: str,
    status: int,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """OpenAI-style error envelope, as LM Studio sends it."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _model_not_found(name: str) -> JSONResponse:
    return _error(
        f'Model "{name}" not found. Please check the model name, or download and load it first.',
        404,
        param="model",
        code="model_not_found",
    )


async def _json_object(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _count_words(value: Any) -> int:
    """Rough token count for usage figures: whitespace words in any text the request carries."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(item) for item in value)
    if isinstance(value, dict):
        return _count_words(value.get("content")) + _count_words(value.get("text"))
    return 0


def marker(mode: Mode) -> str:
    """Text that, anywhere in a request (a prompt, say), makes the fake answer that request in `mode`."""
    if mode not in get_args(Mode):
        raise ValueError(f"unknown mode {mode!r}; use one of {get_args(Mode)}")
    return f"[[fake:{mode}]]"


def embedding_for(text: str) -> list[float]:
    """Eight deterministic floats (a unit vector) derived from the text's SHA-256."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [int.from_bytes(digest[i * 4 : i * 4 + 4], "big") / 2**31 - 1.0 for i in range(8)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


class _StreamAborted(Exception):
    """Raised by a body generator to drop the connection without finishing the response."""


class _TrackedStream(StreamingResponse):
    """A streaming response that notices when the client goes away before the end.

    Starlette's StreamingResponse only learns of a disconnect through cancellation, which can
    land while the body generator is suspended at a `yield` (inside `send`), leaving the
    generator unfinalized until garbage collection. Here a watcher task waits for
    `http.disconnect` and cancels the writer; the generator is then closed explicitly.
    `_StreamAborted` from the generator ends the ASGI call with the response incomplete, which
    makes uvicorn close the transport without a traceback in the logs.
    """

    def __init__(
        self,
        content: AsyncIterator[str | bytes],
        *,
        on_abandon: Callable[[], None],
        media_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content
        self._on_abandon = on_abandon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = aborted = abandoned = False

        async def watch_for_disconnect() -> None:
            nonlocal abandoned
            while (await receive())["type"] != "http.disconnect":
                pass
            # uvicorn also answers http.disconnect once the response is complete.
            abandoned = not completed
            task_group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(watch_for_disconnect)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                try:
                    async for chunk in self._content:
                        body = chunk.encode() if isinstance(chunk, str) else chunk
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                except _StreamAborted:
                    aborted = True
                if not aborted:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    completed = True
                task_group.cancel_scope.cancel()
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        if abandoned:
            self._on_abandon()


class _BearerAuth:
    """Pure ASGI middleware: 401 for any request lacking `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, fake: FakeLMStudio) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.fake.token
        if scope["type"] == "http" and token is not None:
            scheme, _, given = (Headers(scope=scope).get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or given.strip() != token:
                response = JSONResponse(
                    {
                        "error": {
                            "message": "Invalid or missing API token. Send it as 'Authorization: Bearer <token>'.",
                            "type": "invalid_request",
                            "code": "invalid_api_key",
                        }
                    },
                    status_code=401,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Slots:
    """The predictions one model runs at once: beyond `capacity`, requests wait for a slot."""

    def __init__(self) -> None:
        self.active = 0
        self.waiting = 0
        self.peak = 0
        self._freed = anyio.Condition()

    @asynccontextmanager
    async def hold(self, capacity: int | None) -> AsyncIterator[None]:
        async with self._freed:
            self.waiting += 1
            try:
                while capacity is not None and self.active >= capacity:
                    await self._freed.wait()
            finally:
                self.waiting -= 1
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            self.active -= 1
            with anyio.CancelScope(shield=True):
                async with self._freed:
                    # Every waiter looks again: one woken and then cancelled must not strand the rest.
                    self._freed.notify_all()


# Shapes one stream chunk from (delta, finish_reason); a None delta gives the usage chunk's base.
_ChunkMaker = Callable[[dict[str, Any] | None, str | None], dict[str, Any]]


@dataclass
class _Reply:
    pieces: list[str]
    finish_reason: str
    prompt_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        completion = len(self.pieces)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


class FakeLMStudio:
    """Fake LM Studio; every attribute may be changed between requests.

    `requests` records inference requests that passed authentication; `listing_calls` counts
    model listings answered with 200; `disconnects` counts inference responses the client
    abandoned before the end (streams, and non-streamed answers during a "slow" wait).

    A request for an unloaded model loads it, like LM Studio's just-in-time loading: one load at
    a time, each taking `load_delay` seconds; with `auto_evict` (LM Studio's default) it first
    unloads the model loaded just in time before it. Models loaded at construction, by setting
    `loaded`, or through `POST /api/v1/models/load` count as loaded by hand and are never evicted.
    `loads` and `evictions` count per model id; `slots(model_id)` tells the requests running and
    waiting; `chunk_delay` (the per-token delay) is slept before every streamed piece.
    """

    def __init__(
        self,
        models: list[FakeModel] | None = None,
        *,
        surface: Surface = "v1",
        token: str | None = None,
    ) -> None:
        if surface not in get_args(Surface):
            raise ValueError(f"unknown surface {surface!r}; use one of {get_args(Surface)}")
        self.models: list[FakeModel] = models if models is not None else [FakeModel("google/gemma-3-270m")]
        self.surface: Surface = surface
        self.token = token
        self.mode: Mode = "ok"
        self.slow_seconds = 3.0
        self.chunk_text: list[str] = list(DEFAULT_CHUNKS)
        self.chunk_delay = 0.0
        # While this is an unset Event, every stream stops before its last piece (the rest already
        # sent) until it is set: a test holds many calls mid-answer and releases them together.
        self.gate: anyio.Event | None = None
        # Real LM Studio answers unknown endpoints with 200 and {"error": "Unexpected endpoint
        # or method. ..."}; set this to 200 to reproduce that instead of a clean 404.
        self.unknown_endpoint_status = 404
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.disconnected = anyio.Event()
        self.listing_calls = 0
        self.load_delay = 0.0
        self.auto_evict = True
        self.loads: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self._jit_loaded: list[str] = []  # loaded just in time and not since evicted, oldest first
        self._slots: dict[str, _Slots] = {}
        self._load_lock: anyio.Lock | None = None  # made on first use, inside the event loop
        self.app = Starlette(
            routes=[
                Route("/api/v1/models", self._list_v1, methods=["GET"]),
                Route("/api/v0/models", self._list_v0, methods=["GET"]),
                Route("/v1/models", self._list_openai, methods=["GET"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/api/v1/models/load", self._load_by_hand, methods=["POST"]),
                Route("/api/v1/models/unload", self._unload, methods=["POST"]),
                Route("/fake/stats", self._stats, methods=["GET"]),
            ],
            middleware=[Middleware(_BearerAuth, fake=self)],
            exception_handlers={404: self._unknown_endpoint, 405: self._unknown_endpoint},
        )

    def reset(self) -> None:
        self.mode = "ok"
        self.requests.clear()
        self.disconnects = 0
        self.disconnected = anyio.Event()
        self.listing_calls = 0
        self.loads.clear()
        self.evictions.clear()

    def slots(self, model_id: str) -> _Slots:
        """The model's prediction slots: `active`, `waiting` and `peak` requests."""
        return self._slots.setdefault(model_id, _Slots())

    def stats(self) -> dict[str, Any]:
        """What `GET /fake/stats` answers: the fleet counters, for a fake in another process."""
        return {
            "requests": len(self.requests),
            "disconnects": self.disconnects,
            "loads": dict(self.loads),
            "evictions": dict(self.evictions),
            "loaded": [m.id for m in self.models if m.loaded],
            "slots": {
                model_id: {"active": slots.active, "waiting": slots.waiting, "peak": slots.peak}
                for model_id, slots in self._slots.items()
            },
        }

    # -- helpers ---------------------------------------------------------------------------

    def find(self, model_id: str) -> FakeModel | None:
        return next((model for model in self.models if model.id == model_id), None)

    def _is_loaded(self, model: FakeModel) -> bool:
        return model.loaded and self.mode != "no_models_loaded"

    def _note_abandoned(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    def _unknown_route(self, request: Request) -> Response:
        if self.surface == "openai":  # llama.cpp's server shape
            body: dict[str, Any] = {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
            return JSONResponse(body, status_code=404)
        message = f"Unexpected endpoint or method. ({request.method} {request.url.path})"
        return JSONResponse({"error": message}, status_code=self.unknown_endpoint_status)

    async def _unknown_endpoint(self, request: Request, exc: Exception) -> Response:
        return self._unknown_route(request)

    # -- loading -----------------------------------------------------------------------------

    async def _load(self, model: FakeModel, *, by_hand: bool) -> None:
        """Load `model` unless it is loaded; one load at a time, `load_delay` seconds each."""
        if model.loaded:
            return
        if self._load_lock is None:
            self._load_lock = anyio.Lock()
        async with self._load_lock:
            if model.loaded:  # loaded by the request this one queued behind
                return
            if self.auto_evict and not by_hand:
                self._evict_jit_loaded()
            if self.load_delay > 0:
                with anyio.CancelScope(shield=True):  # a load, once started, finishes
                    await anyio.sleep(self.load_delay)
            model.loaded = True
            self.loads[model.id] += 1
            if not by_hand:
                self._jit_loaded.append(model.id)

    def _evict_jit_loaded(self) -> None:
        for model_id in self._jit_loaded:
            model = self.find(model_id)
            if model is not None and model.loaded:
                model.loaded = False  # requests already running on it finish
                self.evictions[model_id] += 1
        self._jit_loaded.clear()

    async def _load_by_hand(self, request: Request) -> Response:
        if self.surface != "v1":
            return self._unknown_route(request)
        body = await _json_object(request)
        model = self.find(body.get("model")) if body and isinstance(body.get("model"), str) else None
        if model is None:
            return _model_not_found(str((body or {}).get("model")))
        if model.id in self._jit_loaded:  # now held by hand
            self._jit_loaded.remove(model.id)
        started = time.monotonic()
        await self._load(model, by_hand=True)
        return JSONResponse({
            "type": "embedding" if model.is_embedding else "llm",
            "instance_id": model.id,
            "load_time_seconds": round(time.monotonic() - started, 3),
            "status": "loaded",
        })

    async def _unload(self, request: Request) -> Response:
        if self.surface != "v1":
            return self._unknown_route(request)
        body = await _json_object(request)
        model = self.find(body.get("instance_id")) if body and isinstance(body.get("instance_id"), str) else None
        if model is None or not model.loaded:
            return _error(f"No loaded instance {(body or {}).get('instance_id')!r}.", 404, param="instance_id")
        model.loaded = False
        if model.id in self._jit_loaded:
            self._jit_loaded.remove(model.id)
        return JSONResponse({"instance_id": model.id})

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    # -- listing -----------------------------------------------------------------------------

    async def _list_v1(self, request: Request) -> Response:
        if self.surface != "v1":
            return self._unknown_route(request)
        self.listing_calls += 1
        return JSONResponse({"models": [m.v1_entry(loaded=self._is_loaded(m)) for m in self.models]})

    async def _list_v0(self, request: Request) -> Response:
        if self.surface == "openai":
            return self._unknown_route(request)
        self.listing_calls += 1
        data = [m.v0_entry(loaded=self._is_loaded(m)) for m in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def _list_openai(self, request: Request) -> Response:
        self.listing_calls += 1
        return JSONResponse({"object": "list", "data": [m.openai_entry() for m in self.models]})

    # -- inference ---------------------------------------------------------------------------

    async def _accept(
        self, request: Request, *, embeddings: bool
    ) -> tuple[dict[str, Any], FakeModel, Mode] | Response:
        """Record the request, then apply the failure modes and model checks LM Studio would.

        Answers the request's mode (a marker in it, else `self.mode`) beside the body and model.
        """
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        client = request.client.port if request.client else None  # which connection it came on
        self.requests.append({"path": request.url.path, "json": body, "headers": dict(request.headers), "client": client})
        if not isinstance(body, dict):
            return _error("Request body must be a JSON object.", 400)
        mode = self._mode_for(raw)
        if mode == "error500":
            return _error("Internal error", 500, type_="internal_error")
        if mode == "malformed":
            if body.get("stream") and not embeddings:
                return StreamingResponse(iter(["data: {broken\n\n"]), media_type="text/event-stream")
            return Response(b"not json{", media_type="application/json")
        if mode == "no_models_loaded":
            return _error(NO_MODELS_LOADED, 400, param="model", code="model_not_found")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return _error("'model' is required.", 400, param="model")
        model = self.find(name)
        if model is None:
            return _model_not_found(name)
        if embeddings and not model.is_embedding:
            return _error(f'Model "{name}" is not an embedding model.', 400, param="model")
        if not embeddings and model.is_embedding:
            return _error(f'Model "{name}" is an embedding model and cannot generate text.', 400, param="model")
        await self._load(model, by_hand=False)
        return body, model, mode

    def _mode_for(self, raw: bytes) -> Mode:
        found = _MODE_MARKER.search(raw)
        if found is not None and found.group(1).decode() in get_args(Mode):
            return found.group(1).decode()  # type: ignore[return-value]
        return self.mode

    def _reply(self, body: dict[str, Any], prompt: Any, *, structured: bool) -> _Reply:
        pieces = list(self.chunk_text)
        if structured:
            # json.dumps escapes character by character, so the escaped pieces join into the
            # same JSON document json.dumps({"answer": ...}) would give, one piece per token.
            pieces = ['{"answer": "', *(json.dumps(p)[1:-1] for p in pieces), '"}']
        finish_reason = "stop"
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 < max_tokens < len(pieces):
            pieces = pieces[:max_tokens]
            finish_reason = "length"
        return _Reply(pieces, finish_reason, max(1, _count_words(prompt)))

    async def _client_left_during(self, request: Request, seconds: float) -> bool:
        """Sleep `seconds`, returning early with True if the client disconnects meanwhile."""
        with anyio.move_on_after(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
            return True
        return False

    async def _answer(self, request: Request, payload: dict[str, Any], model: FakeModel, mode: Mode) -> Response:
        """Send a non-streamed answer, honouring the "slow" and "die_midstream" modes."""
        async with self.slots(model.id).hold(model.parallel):
            if mode == "slow" and await self._client_left_during(request, self.slow_seconds):
                self._note_abandoned()
                return Response()  # nobody is listening any more
        if mode != "die_midstream":
            return JSONResponse(payload)
        encoded = json.dumps(payload, separators=(",", ":")).encode()

        async def half_then_die() -> AsyncIterator[bytes]:
            yield encoded[: len(encoded) // 2]
            raise _StreamAborted

        return _TrackedStream(
            half_then_die(),
            on_abandon=self._note_abandoned,
            media_type="application/json",
            headers={"content-length": str(len(encoded))},
        )

    async def _chunks(
        self, reply: _Reply, chunk: _ChunkMaker, model: FakeModel, mode: Mode, *, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        """The SSE body shared by both completion endpoints; `chunk(delta, finish)` shapes one chunk.

        The slot is taken here, after the response has started, so a client that leaves while
        its request waits for a slot is noticed, and the slot is always given back.
        """
        async with self.slots(model.id).hold(model.parallel):
            if mode == "slow":
                await anyio.sleep(self.slow_seconds)
            if chat:
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
            for index, piece in enumerate(reply.pieces):
                if mode == "die_midstream" and index == 2:
                    raise _StreamAborted
                if mode == "malformed_midstream" and index == 2:
                    yield "data: {broken\n\n"  # one bad chunk; the stream goes on after it
                if self.gate is not None and index == len(reply.pieces) - 1:
                    await self.gate.wait()
                if self.chunk_delay > 0:
                    await anyio.sleep(self.chunk_delay)
                else:
                    await anyio.lowlevel.checkpoint()  # lets a disconnect be noticed between chunks
                yield _sse(chunk({"content": piece} if chat else {"text": piece}, None))
            if mode == "die_midstream":
                raise _StreamAborted
            yield _sse(chunk({} if chat else {"text": ""}, reply.finish_reason))
            if include_usage:
                yield _sse({**chunk(None, None), "choices": [], "usage": reply.usage})
            yield _sse("[DONE]")

    async def _chat_completions(self, request: Request) -> Response:
        accepted = await self._accept(request, embeddings=False)
        if isinstance(accepted, Response):
            return accepted
        body, model, mode = accepted
        response_format = body.get("response_format")
        structured = isinstance(response_format, dict) and response_format.get("type") == "json_schema"
        reply = self._reply(body, body.get("messages"), structured=structured)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": ident, "created": created, "model": model.id, "system_fingerprint": model.id}

        if not body.get("stream"):
            return await self._answer(request, {
                **base,
                "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(reply.pieces)},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }],
                "usage": reply.usage,
            }, model, mode)

        def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

        return self._stream(reply, chunk, body, model, mode, chat=True)

    async def _completions(self, request: Request) -> Response:
        accepted = await self._accept(request, embeddings=False)
        if isinstance(accepted, Response):
            return accepted
        body, model, mode = accepted
        reply = self._reply(body, body.get("prompt"), structured=False)
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model.id}

        if not body.get("stream"):
            return await self._answer(request, {
                **base,
                "object": "text_completion",
                "choices": [{
                    "index": 0,
                    "text": "".join(reply.pieces),
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }],
                "usage": reply.usage,
            }, model, mode)

        def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": (delta or {}).get("text", ""), "logprobs": None, "finish_reason": finish}
            return {**base, "object": "text_completion", "choices": [choice]}

        return self._stream(reply, chunk, body, model, mode, chat=False)

    def _stream(
        self,
        reply: _Reply,
        chunk: _ChunkMaker,
        body: dict[str, Any],
        model: FakeModel,
        mode: Mode,
        *,
        chat: bool,
    ) -> Response:
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        return _TrackedStream(
            self._chunks(reply, chunk, model, mode, chat=chat, include_usage=include_usage),
            on_abandon=self._note_abandoned,
            headers={"cache-control": "no-cache"},
        )

    async def _embeddings(self, request: Request) -> Response:
        accepted = await self._accept(request, embeddings=True)
        if isinstance(accepted, Response):
            return accepted
        body, model, mode = accepted
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return _error("'input' must be a string or a non-empty list of strings.", 400, param="input")
        tokens = sum(max(1, _count_words(t)) for t in texts)
        return await self._answer(request, {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": embedding_for(text)}
                for i, text in enumerate(texts)
            ],
            "model": model.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }, model, mode)


# -- serving -----------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it every keep-alive response waits ~40 ms on Nagle and delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _EmbeddedServer(uvicorn.Server):
    # Signal handlers are process-wide: several servers saving and restoring them in a
    # non-nested order would leave Ctrl-C bound to a dead server, so leave them to the host.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serve(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run `app` on a real uvicorn server in the current task (asyncio only); yield its base URL."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=host,
        port=bound_port,
        log_level="warning",
        lifespan="auto",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _EmbeddedServer(config)
    stopped = anyio.Event()
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        except (Exception, SystemExit) as exc:  # uvicorn sys.exit()s when lifespan startup fails
            failure.append(exc)
        finally:
            sock.close()
            stopped.set()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(run)
        try:
            while not server.started:
                if stopped.is_set():
                    raise RuntimeError(f"uvicorn failed to start on {host}:{bound_port}") from (
                        failure[0] if failure else None
                    )
                await anyio.sleep(0.005)
            url_host = f"[{host}]" if ":" in host else host
            yield f"http://{url_host}:{bound_port}"
        finally:
            # Ask for a graceful stop even when the body failed or was cancelled; cancelling
            # server.serve() instead would skip its shutdown and leave the listener open.
            server.should_exit = True
            with anyio.move_on_after(_GRACEFUL_SHUTDOWN_SECONDS + 5, shield=True):
                await stopped.wait()
            task_group.cancel_scope.cancel()


# -- command line ------------------------------------------------------------------------------


def _model_from_cli(model_id: str) -> FakeModel:
    publisher = model_id.split("/", 1)[0] if "/" in model_id else "local"
    model_type = "embeddings" if "embed" in model_id.lower() else "llm"
    return FakeModel(model_id, type=model_type, publisher=publisher)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake LM Studio (see tests/fake_lmstudio.py).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1234, help="0 picks a free port")
    parser.add_argument(
        "--models",
        default="google/gemma-3-270m",
        help="comma-separated model ids; ids containing 'embed' become embedding models",
    )
    parser.add_argument("--surface", choices=get_args(Surface), default="v1")
    parser.add_argument("--mode", choices=get_args(Mode), default="ok")
    parser.add_argument("--chunks", type=int, help='reply with N pieces "tok{i} " (no delay unless --token-delay)')
    parser.add_argument("--chunk-delay", "--token-delay", dest="chunk_delay", type=float, default=0.0,
                        help="seconds before each streamed piece (token)")
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN'")
    parser.add_argument("--loaded", help="comma-separated ids loaded (by hand) at start, '' for none; default: all")
    parser.add_argument("--parallel", type=int, help="prediction slots per loaded model (reported, and enforced)")
    parser.add_argument("--load-delay", type=float, default=0.0, help="seconds a just-in-time load takes")
    parser.add_argument("--no-auto-evict", dest="auto_evict", action="store_false",
                        help="keep every model loaded just in time (LM Studio's auto-evict off)")
    args = parser.parse_args()

    models = [_model_from_cli(name.strip()) for name in args.models.split(",") if name.strip()]
    if args.loaded is not None:
        loaded = {name.strip() for name in args.loaded.split(",") if name.strip()}
        if unknown := loaded - {m.id for m in models}:
            parser.error(f"--loaded names models not in --models: {', '.join(sorted(unknown))}")
        for model in models:
            model.loaded = model.id in loaded
    if args.parallel is not None:
        if args.parallel < 1:
            parser.error("--parallel must be at least 1")
        for model in models:
            model.parallel = args.parallel
    fake = FakeLMStudio(models, surface=args.surface, token=args.token)
    fake.mode = args.mode
    fake.chunk_delay = args.chunk_delay
    fake.load_delay = args.load_delay
    fake.auto_evict = args.auto_evict
    if args.chunks is not None:
        fake.chunk_text = [f"tok{i} " for i in range(args.chunks)]

    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"fake LM Studio ({args.surface} surface) on http://{url_host}:{port} "
        f"serving {', '.join(m.id for m in models)}",
        flush=True,
    )
    config = uvicorn.Config(fake.app, host=args.host, port=port, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
