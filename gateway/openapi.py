"""The OpenAPI 3.1 description of the gateway's plain HTTP endpoints, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway import __version__
from mcp_server.jsonsafe import MAX_DEPTH

_ERROR = {"$ref": "#/components/schemas/Error"}
_UNAUTHORIZED = {"description": "Missing or wrong API key", "content": {"application/json": {"schema": _ERROR}}}
_LIMITED = {
    "description": "Rate limit exceeded, or (for a call) the key's token budget is spent; see Retry-After",
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds until a retry may pass"}},
    "content": {"application/json": {"schema": _ERROR}},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_RETRY_AFTER = {"schema": {"type": "integer"}, "description": "Seconds until it is worth trying again"}

_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
_OPENAI_UNAUTHORIZED = _json(_OPENAI_ERROR, "Missing or wrong API key (code invalid_api_key)")
_OPENAI_LIMITED = {**_LIMITED, "content": {"application/json": {"schema": _OPENAI_ERROR}}}
_OPENAI_CALLS = {
    "/v1/chat/completions": "OpenAI chat completion (`stream: true` for server-sent events)",
    "/v1/completions": "OpenAI text completion of a raw prompt (`stream: true` for server-sent events)",
    "/v1/embeddings": "OpenAI embeddings of a string or a list of strings",
}


def _openai_call(path: str, summary: str) -> dict[str, Any]:
    streams = path != "/v1/embeddings"
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    retry = {"Retry-After": _RETRY_AFTER}
    return {
        "post": {
            "summary": summary,
            "description": (
                "Relayed to a bridge that has the body's `model` (loaded first) and from it to LM Studio; LM "
                "Studio's answer comes back unchanged, status included. Retried once on another bridge when "
                "the first proves down before anything was sent. A streamed call's usage chunk is sent only "
                "when `stream_options.include_usage` is true."
            ),
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {
                "200": {"description": "LM Studio's answer" + (" (JSON, or SSE chunks)" if streams else ""),
                        "content": ok},
                "400": _json(_OPENAI_ERROR, "The body is not a JSON object, lacks `model` or a required field, or "
                             "holds what cannot be sent on; the message names it"),
                "401": _OPENAI_UNAUTHORIZED,
                "403": _json(_OPENAI_ERROR, "This key may not use the model (LLM_HUB_KEY_MODELS)"),
                "404": _json(_OPENAI_ERROR, "No bridge has the model (code model_not_found)"),
                "413": _json(_OPENAI_ERROR, "The body is larger than LLM_HUB_MAX_BODY_BYTES"),
                "429": {**_OPENAI_LIMITED, "description": "Rate limit or token budget exceeded; see Retry-After"},
                "502": _json(_OPENAI_ERROR, "The bridge or its LM Studio failed on the call (the message says which)"),
                "503": {"description": "No bridge can serve the model now (the message names them and why)",
                        "headers": retry, "content": {"application/json": {"schema": _OPENAI_ERROR}}},
                "504": _json(_OPENAI_ERROR, "The call took longer than LLM_HUB_CALL_TIMEOUT"),
            },
        }
    }


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "llm-hub gateway",
        "version": __version__,
        "description": (
            "Plain HTTP access to the tools of every bridge behind this gateway (the same tools as the "
            "MCP endpoint at /mcp), and the OpenAI API for the models behind them. Every endpoint except "
            "GET /health needs `Authorization: Bearer <key>`."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
            "Tool": {
                "type": "object",
                "description": "An MCP tool definition",
                "properties": {
                    "name": {"type": "string"},
                    "title": {"type": "string"},
                    "description": {"type": "string"},
                    "inputSchema": {"type": "object"},
                    "outputSchema": {"type": "object"},
                    "annotations": {"type": "object"},
                },
                "required": ["name", "inputSchema"],
            },
            "CallToolResult": {
                "type": "object",
                "description": "An MCP tool result; isError true when the call failed (the text says why)",
                "properties": {
                    "content": {"type": "array", "items": {"type": "object"}},
                    "structuredContent": {"type": "object"},
                    "isError": {"type": "boolean"},
                },
                "required": ["content"],
            },
            "ListedTool": {
                "description": (
                    "A tool of the union and whether it can be called now. A bridge that is down keeps its "
                    "tools listed for the grace period (LLM_HUB_GRACE_PERIOD), marked unavailable."
                ),
                "allOf": [
                    {"$ref": "#/components/schemas/Tool"},
                    {
                        "type": "object",
                        "properties": {
                            "available": {"type": "boolean", "description": "true while a healthy bridge has it"},
                            "bridges": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "Names of the bridges that have it, healthy or not",
                            },
                            "unavailable_reason": {
                                "type": "string",
                                "description": "Only when not available: the bridges that have it and why none can take it",
                            },
                        },
                        "required": ["available", "bridges"],
                    },
                ],
            },
            "Bridge": {
                "type": "object",
                "properties": {
                    "url": {"type": "string"},
                    "name": {"type": "string", "description": "host:port, as logs, metrics and other answers name it"},
                    "healthy": {"type": "boolean"},
                    "latency_ms": {"type": ["number", "null"]},
                    "last_check": {"type": ["string", "null"], "format": "date-time"},
                    "last_error": {"type": ["string", "null"]},
                    "calls": {"type": "integer", "description": "Tool calls this gateway routed to it since start"},
                    "in_flight": {"type": "integer", "description": "This gateway's calls running on it now"},
                    "tools": {"type": "array", "items": {"type": "string"}},
                    "models": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/BridgeModel"},
                        "description": "Per model, as its last health check reported (empty from a bridge that does not say)",
                    },
                },
                "required": ["url", "name", "healthy", "tools", "models"],
            },
            "BridgeModel": {
                "type": "object",
                "description": "One model on one bridge: what calls are routed by",
                "properties": {
                    "model": {"type": "string"},
                    "tools": {"type": "array", "items": {"type": "string"}},
                    "loaded": {"type": "boolean", "description": "false: a call would make LM Studio load it first"},
                    "slots": {"type": "integer", "description": "Predictions it runs at once (LM Studio's parallel)"},
                    "in_flight": {
                        "type": "integer",
                        "description": "Calls running on it now: this gateway's, plus other callers' at the last check",
                    },
                },
                "required": ["model", "tools", "loaded", "slots", "in_flight"],
            },
            "OpenAIError": {
                "type": "object",
                "description": "OpenAI's error envelope, which OpenAI clients raise as their own exceptions",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                        "required": ["message", "type", "param", "code"],
                    }
                },
                "required": ["error"],
            },
            "OpenAIModel": {
                "type": "object",
                "description": "A model in OpenAI's shape, with where llm-hub serves it under `llm_hub`",
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer", "description": "When this gateway started (Unix seconds)"},
                    "owned_by": {"type": "string", "description": "The id's publisher part, or llm-hub"},
                    "llm_hub": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string", "description": "llm or embedding"},
                            "loaded_on": {"type": "array", "items": {"type": "string"},
                                          "description": "Healthy bridges whose LM Studio has it loaded"},
                            "bridges": {"type": "array", "items": {"type": "string"},
                                        "description": "Bridges that have it, healthy or within their grace period"},
                            "available": {"type": "boolean", "description": "true while a healthy bridge has it"},
                        },
                        "required": ["type", "loaded_on", "bridges", "available"],
                    },
                },
                "required": ["id", "object", "created", "owned_by", "llm_hub"],
            },
            "Model": {
                "type": "object",
                "description": "A model LM Studio serves, merged over the bridges that offer it",
                "properties": {
                    "id": {"type": "string"},
                    "type": {"type": "string", "description": "llm or embedding"},
                    "display_name": {"type": ["string", "null"]},
                    "loaded": {"type": ["boolean", "null"], "description": "true when any bridge has it loaded"},
                    "context_length": {"type": ["integer", "null"]},
                    "quantization": {"type": ["string", "null"]},
                    "capabilities": {"type": "array", "items": {"type": "string"}},
                    "tools": {"type": "array", "items": {"type": "string"}},
                    "bridges": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Bridges that list it; one that is down counts during its grace period",
                    },
                    "available": {"type": "boolean", "description": "true while one of its tools can be called"},
                    "unavailable_reason": {"type": "string", "description": "Only when not available: why"},
                },
                "required": ["id", "tools", "bridges", "available"],
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/health": {
            "get": {
                "summary": "Overall state: 200 while at least one bridge is healthy, 503 otherwise",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "At least one bridge is healthy"),
                    "503": _json({"type": "object"}, "No bridge is healthy"),
                },
            }
        },
        "/v1/tools": {
            "get": {
                "summary": "The union of the bridges' tools, each marked available or not",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"tools": {"type": "array", "items": {"$ref": "#/components/schemas/ListedTool"}}},
                        },
                        "The union of the bridges' tools",
                    ),
                    "401": _UNAUTHORIZED,
                    "429": _LIMITED,
                },
            }
        },
        "/v1/tools/{name}": {
            "post": {
                "summary": "Call a tool",
                "description": (
                    "The body is the tool's arguments as a JSON object. With `Accept: text/event-stream` the "
                    "answer streams as `progress` events (`{progress, total, message}`, message = new text) "
                    "followed by one `result` event holding the CallToolResult. A tool that failed (LM Studio "
                    "down, a bad argument) answers 200 with isError true."
                ),
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": {
                        "description": "The tool's result (JSON), or a stream of events (SSE)",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/CallToolResult"}},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "400": _json(
                        _ERROR,
                        "The body is not a JSON object, or holds arguments that cannot be sent on: a lone "
                        f"surrogate (\\ud800-\\udfff), nesting deeper than {MAX_DEPTH} levels, NaN or Infinity. "
                        "The message names where.",
                    ),
                    "401": _UNAUTHORIZED,
                    "403": _json(_ERROR, "This key may not use the tool's model (LLM_HUB_KEY_MODELS); the message names both"),
                    "404": _json(_ERROR, "No bridge has offered this tool within the grace period"),
                    "413": {"description": "Request body too large"},
                    "429": _LIMITED,
                    "502": _json(_ERROR, "The bridge refused the call (its JSON-RPC error message)"),
                    "503": {
                        "description": (
                            "No bridge can take the call now (the message names the bridges that have the tool "
                            "and why), or the gateway is out of connections. Also before a stream starts."
                        ),
                        "headers": {"Retry-After": _RETRY_AFTER},
                        "content": {"application/json": {"schema": _ERROR}},
                    },
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "OpenAI's model list: the models this key may use, and where each is loaded",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "object": {"const": "list"},
                                "data": {"type": "array", "items": {"$ref": "#/components/schemas/OpenAIModel"}},
                            },
                        },
                        "The models",
                    ),
                    "401": _OPENAI_UNAUTHORIZED,
                    "429": _OPENAI_LIMITED,
                },
            }
        },
        **{path: _openai_call(path, summary) for path, summary in _OPENAI_CALLS.items()},
        "/v1/bridges": {
            "get": {
                "summary": "Each bridge's state, latency, tools, last error, and per model: loaded, slots, calls in flight",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"bridges": {"type": "array", "items": {"$ref": "#/components/schemas/Bridge"}}}},
                        "The bridges",
                    ),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/v1/dashboard/models": {
            "get": {
                "summary": "The models behind the healthy bridges, and whether each bridge reaches LM Studio (the dashboard's view)",
                "description": (
                    "Asks each healthy bridge's list_models tool (at most 2 s each); bridges that are down, "
                    "slow or failing are listed under `skipped` with the reason. A bridge that is down but in "
                    "its grace period adds the models it last listed, marked unavailable."
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                                "lmstudio": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "bridge": {"type": "string"},
                                            "reachable": {"type": ["boolean", "null"]},
                                            "last_error": {"type": ["string", "null"]},
                                        },
                                    },
                                },
                                "skipped": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {"bridge": {"type": "string"}, "error": {"type": "string"}},
                                    },
                                },
                            },
                        },
                        "The merged model list",
                    ),
                    "401": _UNAUTHORIZED,
                    "429": _LIMITED,
                },
            }
        },
        "/v1/stats": {
            "get": {
                "summary": "A JSON summary of the gateway's own metrics (what the dashboard shows)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "requests_total": {"type": "integer"},
                                "requests_last_minute": {"type": "integer"},
                                "requests_per_second": {"type": "number"},
                                "in_flight": {"type": "integer"},
                                "errors_5xx": {"type": "integer"},
                                "latency_ms": {
                                    "type": "object",
                                    "description": "p50, p95 and p99 over the last 1000 requests (null before any)",
                                    "additionalProperties": {"type": ["number", "null"]},
                                },
                                "latency_samples": {"type": "integer"},
                                "rate_limited": {"type": "object", "additionalProperties": {"type": "integer"}},
                                "tool_calls": {"type": "object", "additionalProperties": {"type": "integer"}},
                                "usage": {
                                    "type": "array",
                                    "description": "Per key name and model (those this key may use): calls and tokens",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "key": {"type": "string"},
                                            "model": {"type": "string"},
                                            "calls": {"type": "integer"},
                                            "prompt_tokens": {"type": "integer"},
                                            "completion_tokens": {"type": "integer"},
                                        },
                                    },
                                },
                                "usage_refused": {
                                    "type": "object",
                                    "description": "Calls refused before routing: `budget` (429) and `model` (403)",
                                    "additionalProperties": {"type": "integer"},
                                },
                                "tokens_per_minute": {
                                    "type": "object",
                                    "description": "Tokens this gateway charged per minute over the last hour, oldest first",
                                    "properties": {
                                        "prompt": {"type": "array", "items": {"type": "integer"}},
                                        "completion": {"type": "array", "items": {"type": "integer"}},
                                    },
                                },
                            },
                        },
                        "Totals since start, recent rate and latency percentiles, usage per key and model",
                    ),
                    "401": _UNAUTHORIZED,
                    "429": _LIMITED,
                },
            }
        },
        "/": {
            "get": {
                "summary": "The web dashboard (its page needs no key; it asks for one)",
                "security": [],
                "responses": {"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "401": _UNAUTHORIZED},
            }
        },
    },
}


async def endpoint(_request: Request) -> JSONResponse:
    return JSONResponse(DOCUMENT)
