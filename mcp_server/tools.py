"""Which MCP tools a set of models becomes: names, schemas, descriptions and argument checks."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import mcp_types as types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mcp_server.jsonsafe import unsendable
from mcp_server.lmstudio import ModelInfo
from mcp_server.settings import ToolKind

MAX_NAME = 128
LIST_MODELS = "list_models"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PREFIX: dict[ToolKind, str] = {"chat": "chat_", "embed": "embed_", "complete": "complete_"}


# -- arguments -----------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Args):
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(_Args):
    # Optional fields are typed without `| None` (default None, never validated): the schema a
    # calling model reads stays free of anyOf-null branches, and errors name the field plainly.
    temperature: float = Field(None, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(None, ge=1, description="Upper bound on generated tokens.")
    top_p: float = Field(None, gt=0, le=1, description="Nucleus sampling probability mass.")
    stop: str | list[str] = Field(None, description="Stop sequence(s).")
    seed: int = Field(None, description="Seed for reproducible sampling.")

    def sampling(self) -> dict[str, Any]:
        return self.model_dump(include=set(_Sampling.model_fields), exclude_none=True)


class ChatArgs(_Sampling):
    prompt: str = Field(None, description="The user message. Give this or `messages`.")
    messages: list[Message] = Field(
        None, min_length=1, description="A whole conversation, oldest first. Give this or `prompt`."
    )
    system: str = Field(None, description="System prompt put before the conversation.")
    json_schema: dict[str, Any] = Field(
        None, description="A JSON Schema the answer must follow (structured output); the answer is then JSON."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> ChatArgs:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def request_body(self, model: str) -> dict[str, Any]:
        messages = [m.model_dump() for m in self.messages] if self.messages else [{"role": "user", "content": self.prompt}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        body: dict[str, Any] = {"model": model, "messages": messages, **self.sampling()}
        if self.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "strict": True, "schema": self.json_schema},
            }
        return body


class CompleteArgs(_Sampling):
    prompt: str = Field(description="Raw text to continue; no chat template is applied.")

    def request_body(self, model: str) -> dict[str, Any]:
        return {"model": model, "prompt": self.prompt, **self.sampling()}


class EmbedArgs(_Args):
    input: str | list[str] = Field(description="A text, or a list of texts, to embed.")

    @model_validator(mode="after")
    def _not_empty(self) -> EmbedArgs:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("`input` must hold at least one text")
        return self

    def request_body(self, model: str) -> dict[str, Any]:
        return {"model": model, "input": self.input}


class ListModelsArgs(_Args):
    pass


ARGS: dict[str, type[_Args]] = {"chat": ChatArgs, "complete": CompleteArgs, "embed": EmbedArgs}


class InvalidArguments(Exception):
    """The caller's arguments do not fit the tool; the message names each bad field."""


def parse_arguments(tool_name: str, model: type[_Args], arguments: dict[str, Any] | None) -> Any:
    # Before validation: pydantic would accept a lone surrogate or NaN (where a float is allowed)
    # and the request to LM Studio would then fail to encode.
    if (problem := unsendable(arguments or {})) is not None:
        raise InvalidArguments(f"Invalid arguments for {tool_name}: {problem}")
    try:
        return model.model_validate(arguments or {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "arguments"
            problems.append(f"{where}: {error['msg']}")
        raise InvalidArguments(f"Invalid arguments for {tool_name}: " + "; ".join(problems)) from None


# -- output schemas ------------------------------------------------------------------------

_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}
_GENERATION_OUTPUT = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "text": {"type": "string"},
        "finish_reason": {"type": ["string", "null"]},
        "usage": _USAGE,
        "timings": {
            "type": "object",
            "properties": {
                "time_to_first_token_s": {"type": ["number", "null"]},
                "tokens_per_second": {"type": ["number", "null"]},
                "total_s": {"type": "number"},
            },
        },
    },
    "required": ["model", "text", "finish_reason", "usage", "timings"],
}
_EMBED_OUTPUT = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "dimensions": {"type": "integer"},
        "usage": _USAGE,
    },
    "required": ["model", "embeddings", "dimensions"],
}
_MODEL_ENTRY = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string"},
        "display_name": {"type": ["string", "null"]},
        "loaded": {"type": ["boolean", "null"]},
        "context_length": {"type": ["integer", "null"]},
        "quantization": {"type": ["string", "null"]},
        "architecture": {"type": ["string", "null"]},
        "publisher": {"type": ["string", "null"]},
        "capabilities": {"type": "array", "items": {"type": "string"}},
        "tools": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id", "type", "tools"],
}
LIST_MODELS_OUTPUT = {
    "type": "object",
    "properties": {
        "models": {"type": "array", "items": _MODEL_ENTRY},
        "lmstudio": {
            "type": "object",
            "properties": {
                "url": {"type": "string"},
                "reachable": {"type": "boolean"},
                "api": {"type": ["string", "null"]},
                "last_error": {"type": ["string", "null"]},
            },
        },
    },
    "required": ["models", "lmstudio"],
}


# -- naming --------------------------------------------------------------------------------


def slug(model_id: str) -> str:
    return _UNSAFE.sub("_", model_id)


def _short_hash(model_id: str) -> str:
    return hashlib.sha256(model_id.encode()).hexdigest()[:8]


def tool_name(kind: ToolKind, model_id: str, *, disambiguate: bool = False) -> str:
    """`chat_<slug>` etc.; a stable hash of the id keeps long or colliding names unique."""
    prefix = _PREFIX[kind]
    body = slug(model_id)
    if disambiguate or len(prefix) + len(body) > MAX_NAME:
        suffix = "_" + _short_hash(model_id)
        body = body[: MAX_NAME - len(prefix) - len(suffix)] + suffix
    return prefix + body


def _names_for(kind: ToolKind, model_ids: Iterable[str]) -> dict[str, str]:
    """Model id -> tool name for one kind, unique within it.

    When several ids slug to the same name, an id that is already a valid name keeps it (so
    adding `a/b` never renames an existing `a_b`) and the others get a hash suffix.
    """
    by_name: dict[str, list[str]] = defaultdict(list)
    for model_id in model_ids:
        by_name[tool_name(kind, model_id)].append(model_id)
    names: dict[str, str] = {}
    for name, ids in by_name.items():
        for model_id in ids:
            unique = len(ids) == 1 or slug(model_id) == model_id
            names[model_id] = name if unique else tool_name(kind, model_id, disambiguate=True)
    return names


# -- tools ---------------------------------------------------------------------------------

_KINDS_FOR: dict[str, tuple[ToolKind, ...]] = {"llm": ("chat", "complete"), "embedding": ("embed",)}


@dataclass(frozen=True)
class ModelTool:
    """One MCP tool backed by one model."""

    name: str
    kind: ToolKind
    model: ModelInfo
    definition: types.Tool


def wanted(model_id: str, include: list[str], exclude: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(model_id, g) for g in include) and not any(
        fnmatch.fnmatchcase(model_id, g) for g in exclude
    )


def build_tools(
    models: Iterable[ModelInfo], kinds: Iterable[ToolKind], include: list[str], exclude: list[str]
) -> dict[str, ModelTool]:
    """The tools a model listing becomes, by name, in a stable order."""
    enabled = set(kinds)
    chosen = sorted((m for m in models if wanted(m.id, include, exclude)), key=lambda m: m.id)
    tools: dict[str, ModelTool] = {}
    for kind in ("chat", "complete", "embed"):
        if kind not in enabled:
            continue
        of_kind = [m for m in chosen if kind in _KINDS_FOR[m.kind]]
        names = _names_for(kind, (m.id for m in of_kind))
        for model in of_kind:
            name = names[model.id]
            tools[name] = ModelTool(name, kind, model, _definition(name, kind, model))
    return tools


def describe(model: ModelInfo) -> str:
    facts = ["embedding model" if model.kind == "embedding" else "language model"]
    if model.loaded is True:
        facts.append("loaded")
    elif model.loaded is False:
        facts.append("not loaded (the first call loads it, which can take a while)")
    if model.context_length:
        facts.append(f"context {model.context_length} tokens")
    if model.quantization:
        facts.append(f"quantization {model.quantization}")
    if model.architecture:
        facts.append(f"architecture {model.architecture}")
    if model.capabilities:
        facts.append("capabilities: " + ", ".join(model.capabilities))
    return "; ".join(facts)


_PURPOSE: dict[ToolKind, str] = {
    "chat": "Ask {label} a question or give it a task; it answers in text (streamed as progress).",
    "complete": "Continue raw text with {label} (no chat template); streamed as progress.",
    "embed": "Turn text into embedding vectors with {label}, for search and similarity.",
}
_TITLE: dict[ToolKind, str] = {"chat": "Chat with {label}", "complete": "Complete text with {label}", "embed": "Embed text with {label}"}


def _definition(name: str, kind: ToolKind, model: ModelInfo) -> types.Tool:
    label = model.display_name or model.id
    description = (
        _PURPOSE[kind].format(label=label)
        + f" Model `{model.id}` served by LM Studio: {describe(model)}."
    )
    return types.Tool(
        name=name,
        title=_TITLE[kind].format(label=label),
        description=description,
        input_schema=ARGS[kind].model_json_schema(),
        output_schema=_EMBED_OUTPUT if kind == "embed" else _GENERATION_OUTPUT,
        annotations=types.ToolAnnotations(
            title=_TITLE[kind].format(label=label),
            read_only_hint=True,
            destructive_hint=False,
            idempotent_hint=kind == "embed",
            open_world_hint=False,
        ),
    )


LIST_MODELS_TOOL = types.Tool(
    name=LIST_MODELS,
    title="List LM Studio models",
    description=(
        "List every model LM Studio serves with its metadata (type, loaded or not, context length, "
        "quantization, capabilities) and the tool names it is offered under."
    ),
    input_schema=ListModelsArgs.model_json_schema(),
    output_schema=LIST_MODELS_OUTPUT,
    annotations=types.ToolAnnotations(
        title="List LM Studio models", read_only_hint=True, destructive_hint=False, idempotent_hint=True,
        open_world_hint=False,
    ),
)
