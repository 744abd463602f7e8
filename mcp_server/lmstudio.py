"""LM Studio's HTTP API as the bridge needs it: list models, chat, complete, embed.

One pooled `httpx2.AsyncClient` per bridge. Every failure leaves this module as an
`LMStudioError` subclass whose message tells a person what to do.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2

from mcp_server.errors import (
    AuthRequired,
    BadUpstreamResponse,
    LMStudioError,
    ModelNotFound,
    Unreachable,
    UpstreamError,
    UpstreamTimeout,
)

ApiFlavour = Literal["lmstudio-v1", "lmstudio-v0", "openai"]
ModelKind = Literal["llm", "embedding"]

# Richest surface first: LM Studio 0.4+, then 0.3.6+, then any OpenAI-compatible server.
_LISTING_PATHS: tuple[tuple[ApiFlavour, str], ...] = (
    ("lmstudio-v1", "/api/v1/models"),
    ("lmstudio-v0", "/api/v0/models"),
    ("openai", "/v1/models"),
)


@dataclass(frozen=True)
class ModelInfo:
    """What we know of one model; fields the serving API does not report stay None."""

    id: str
    kind: ModelKind = "llm"
    display_name: str | None = None
    loaded: bool | None = None
    context_length: int | None = None
    quantization: str | None = None
    architecture: str | None = None
    publisher: str | None = None
    capabilities: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.kind,
            "display_name": self.display_name,
            "loaded": self.loaded,
            "context_length": self.context_length,
            "quantization": self.quantization,
            "architecture": self.architecture,
            "publisher": self.publisher,
            "capabilities": list(self.capabilities),
        }


def _parse_v1(payload: dict[str, Any]) -> list[ModelInfo]:
    models = []
    for raw in payload["models"]:
        instances = raw.get("loaded_instances") or []
        loaded_ctx = next((i.get("config", {}).get("context_length") for i in instances), None)
        caps = raw.get("capabilities") or {}
        capabilities = tuple(
            name
            for name, present in (
                ("vision", caps.get("vision")),
                ("tool_use", caps.get("trained_for_tool_use")),
                ("reasoning", caps.get("reasoning")),
            )
            if present
        )
        quant = raw.get("quantization")
        models.append(
            ModelInfo(
                id=raw["key"],
                kind="embedding" if raw.get("type") == "embedding" else "llm",
                display_name=raw.get("display_name"),
                loaded=bool(instances),
                context_length=loaded_ctx or raw.get("max_context_length"),
                quantization=quant.get("name") if isinstance(quant, dict) else quant,
                architecture=raw.get("architecture"),
                publisher=raw.get("publisher"),
                capabilities=capabilities,
            )
        )
    return models


def _parse_v0(payload: dict[str, Any]) -> list[ModelInfo]:
    models = []
    for raw in payload["data"]:
        kind = raw.get("type")
        capabilities = tuple(raw.get("capabilities") or ())
        if kind == "vlm" and "vision" not in capabilities:
            capabilities = ("vision", *capabilities)
        models.append(
            ModelInfo(
                id=raw["id"],
                kind="embedding" if kind in ("embeddings", "embedding") else "llm",
                loaded=raw.get("state") == "loaded",
                context_length=raw.get("max_context_length"),
                quantization=raw.get("quantization"),
                architecture=raw.get("arch"),
                publisher=raw.get("publisher"),
                capabilities=capabilities,
            )
        )
    return models


def _parse_openai(payload: dict[str, Any]) -> list[ModelInfo]:
    # The OpenAI listing has no type: embedding models are recognised by name, as LM Studio's own ids
    # (text-embedding-nomic-embed-text-v1.5, ...) and llama.cpp aliases conventionally carry "embed".
    return [
        ModelInfo(
            id=raw["id"],
            kind="embedding" if "embed" in raw["id"].lower() else "llm",
            publisher=raw.get("owned_by"),
        )
        for raw in payload["data"]
    ]


_PARSERS = {"lmstudio-v1": _parse_v1, "lmstudio-v0": _parse_v0, "openai": _parse_openai}


class LMStudioClient:
    """Async client for one LM Studio server. Use as an async context manager."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx2.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx2.Timeout(timeout, connect=min(5.0, timeout)),
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self.flavour: ApiFlavour | None = None

    async def __aenter__(self) -> LMStudioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    # -- listing -------------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """Models from the richest listing surface that answers; remembers which one did."""
        order = list(_LISTING_PATHS)
        if self.flavour is not None:
            order.sort(key=lambda item: item[0] != self.flavour)
        last: LMStudioError | None = None
        for flavour, path in order:
            try:
                payload = await self._get_json(path)
                models = _PARSERS[flavour](payload)
            except (ModelNotFound, UpstreamError) as exc:
                last = exc  # this surface does not exist here (404/405...): try the next one
                continue
            except (KeyError, TypeError, AttributeError) as exc:
                last = BadUpstreamResponse(f"{self.base_url}{path} answered with an unexpected shape ({exc!r}).")
                continue
            self.flavour = flavour
            return models
        assert last is not None
        raise last

    async def _get_json(self, path: str) -> Any:
        with self._mapped_errors():
            response = await self._http.get(path)
        self._raise_for_status(response)
        return self._json(response)

    # -- inference -----------------------------------------------------------------------

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed inference request (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`)."""
        with self._mapped_errors():
            response = await self._http.post(path, json=body)
        self._raise_for_status(response)
        payload = self._json(response)
        if not isinstance(payload, dict):
            raise BadUpstreamResponse(f"LM Studio answered {path} with JSON that is not an object.")
        return payload

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A streamed inference request: yields the parsed SSE chunks.

        Leaving the context (normally, on error or on cancellation) closes the HTTP response,
        which is how LM Studio learns to stop generating.
        """
        with self._mapped_errors():
            async with self._http.stream("POST", path, json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._raise_for_status(response)
                yield self._chunks(response)

    async def _chunks(self, response: httpx2.Response) -> AsyncIterator[dict[str, Any]]:
        done = False
        with self._mapped_errors(mid_stream=True):
            async for line in response.aiter_lines():
                # After [DONE] the rest is read, not parsed: a response left unread cannot go back
                # to the pool, and a new connection per call costs more than the call itself.
                if done or not line.startswith("data:"):
                    continue  # blank separators, comments and event names carry nothing we need
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise BadUpstreamResponse("LM Studio sent a streamed chunk that is not valid JSON.") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise _error_from_envelope(chunk, response.status_code, self.base_url)
                yield chunk

    # -- error mapping -------------------------------------------------------------------

    def _mapped_errors(self, *, mid_stream: bool = False) -> _ErrorMapper:
        return _ErrorMapper(self.base_url, self.timeout, mid_stream)

    def _raise_for_status(self, response: httpx2.Response) -> None:
        if response.status_code < 400:
            return
        try:
            payload = response.json()
        except ValueError:
            payload = None
        raise _error_from_envelope(payload, response.status_code, self.base_url)

    def _json(self, response: httpx2.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise BadUpstreamResponse(
                f"LM Studio at {self.base_url} answered {response.request.url.path} with something that is not JSON."
            ) from None


class _ErrorMapper:
    """Turns httpx2 transport errors into the bridge's error family (a context manager)."""

    def __init__(self, base_url: str, timeout: float, mid_stream: bool) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.mid_stream = mid_stream

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, LMStudioError):
            return False
        if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
            raise Unreachable(
                f"LM Studio is not reachable at {self.base_url}. Start its server (LM Studio > Developer > "
                "Start Server, or `lms server start`) or set LMSTUDIO_URL to where it listens."
            ) from exc
        if isinstance(exc, httpx2.TimeoutException):
            raise UpstreamTimeout(
                f"LM Studio at {self.base_url} did not answer within {self.timeout:g} s. The model may still be "
                "loading or the prompt is long: try again, or raise LLM_HUB_REQUEST_TIMEOUT."
            ) from exc
        if isinstance(exc, httpx2.TransportError):
            where = "in the middle of the answer" if self.mid_stream else "before answering"
            raise BadUpstreamResponse(
                f"LM Studio at {self.base_url} closed the connection {where} ({type(exc).__name__}). "
                "The model may have crashed or been unloaded; check LM Studio's server log."
            ) from exc
        return False


def _error_from_envelope(payload: Any, status: int, base_url: str) -> LMStudioError:
    """Classify an error answer by LM Studio's envelope (code and message), not only the status."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = str(error.get("code") or "")
    else:
        message, code = (str(error) if error else ""), ""
    lowered = message.lower()
    if status in (401, 403) or code == "invalid_api_key":
        return AuthRequired(
            f"LM Studio at {base_url} requires an API token"
            + (" and rejected the one sent" if status == 403 else "")
            + ". Set LMSTUDIO_API_TOKEN (or LM_API_TOKEN) to a token from LM Studio's server settings."
        )
    if "no models loaded" in lowered:
        return ModelNotFound(f"LM Studio has no model loaded: {message} Load one in LM Studio or with `lms load`.")
    if code == "model_not_found" or (status == 404 and "model" in lowered):
        return ModelNotFound(f"LM Studio does not have this model: {message or 'model not found'}")
    if status in (404, 405):
        return UpstreamError(f"{base_url} does not serve this endpoint (HTTP {status}).")
    detail = message or f"HTTP {status}"
    return UpstreamError(f"LM Studio at {base_url} answered with an error: {detail}")
