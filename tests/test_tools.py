"""Tool naming and argument checks: the mapping from model ids to MCP tools."""

from __future__ import annotations

import re

import pytest

from mcp_server.lmstudio import ModelInfo
from mcp_server.tools import (
    MAX_NAME,
    ChatArgs,
    EmbedArgs,
    InvalidArguments,
    build_tools,
    parse_arguments,
    tool_name,
)

VALID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def _names(*ids: str, kinds: tuple[str, ...] = ("chat",)) -> list[str]:
    return list(build_tools([ModelInfo(i) for i in ids], kinds, ["*"], []))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("google/gemma-3-270m", "chat_google_gemma-3-270m"),
        ("qwen/qwen3-8b@q4_k_m", "chat_qwen_qwen3-8b_q4_k_m"),
        ("lmstudio-community/Meta-Llama-3.1-8B-Instruct-GGUF", "chat_lmstudio-community_Meta-Llama-3.1-8B-Instruct-GGUF"),
        ("model with spaces:latest", "chat_model_with_spaces_latest"),
        ("ünïcode/模型", "chat__n_code___"),
    ],
)
def test_slug_replaces_every_unsafe_character(model_id: str, expected: str) -> None:
    assert tool_name("chat", model_id) == expected
    assert VALID.match(expected)


def test_long_ids_are_shortened_with_a_stable_hash() -> None:
    long_id = "publisher/" + "very-long-model-name-" * 10
    name = tool_name("embed", long_id)
    assert len(name) == MAX_NAME and VALID.match(name)
    assert name == tool_name("embed", long_id)  # stable across calls and processes
    other = tool_name("embed", long_id + "x")
    assert other != name and len(other) == MAX_NAME


def test_colliding_slugs_stay_unique_and_an_already_valid_id_keeps_its_name() -> None:
    names = _names("a/b", "a_b", "a:b")
    assert len(set(names)) == 3
    assert "chat_a_b" in names  # the id that needed no mapping keeps the plain name
    assert all(VALID.match(n) for n in names)
    # Adding a colliding id later never renames the existing tool.
    assert "chat_a_b" in _names("a_b") and "chat_a_b" in _names("a_b", "a/b")


def test_collisions_without_a_plain_id_hash_them_all() -> None:
    names = _names("x/y", "x:y")
    assert len(set(names)) == 2 and "chat_x_y" not in names


def test_kinds_follow_model_type_and_settings() -> None:
    models = [ModelInfo("m/llm"), ModelInfo("m/embed-it", kind="embedding")]
    assert set(build_tools(models, ["chat", "embed"], ["*"], [])) == {"chat_m_llm", "embed_m_embed-it"}
    assert set(build_tools(models, ["chat", "embed", "complete"], ["*"], [])) == {
        "chat_m_llm", "complete_m_llm", "embed_m_embed-it",
    }
    assert set(build_tools(models, ["embed"], ["*"], [])) == {"embed_m_embed-it"}


def test_include_and_exclude_globs() -> None:
    models = [ModelInfo("qwen/qwen3-8b"), ModelInfo("qwen/qwen3-32b"), ModelInfo("google/gemma-3")]
    assert set(build_tools(models, ["chat"], ["qwen/*"], ["*32b"])) == {"chat_qwen_qwen3-8b"}


def test_chat_args_build_the_request() -> None:
    args = parse_arguments("t", ChatArgs, {"prompt": "hi", "system": "be brief", "temperature": 0.2, "stop": ["\n"]})
    body = args.request_body("m")
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert body["temperature"] == 0.2 and body["stop"] == ["\n"] and "top_p" not in body
    structured = parse_arguments("t", ChatArgs, {"prompt": "hi", "json_schema": {"type": "object"}})
    assert structured.request_body("m")["response_format"]["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({}, "exactly one of `prompt` or `messages`"),
        ({"prompt": 3}, "prompt: Input should be a valid string"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"prompt": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_chat_arguments_name_the_field(arguments: dict, fragment: str) -> None:
    with pytest.raises(InvalidArguments, match="Invalid arguments for chat_m") as caught:
        parse_arguments("chat_m", ChatArgs, arguments)
    assert fragment in str(caught.value)


def test_embed_input_must_not_be_empty() -> None:
    with pytest.raises(InvalidArguments, match="at least one text"):
        parse_arguments("embed_m", EmbedArgs, {"input": []})


def test_schemas_have_no_null_branches() -> None:
    # Calling models cope badly with anyOf-null; optional fields are simply not required.
    schema = ChatArgs.model_json_schema()
    assert "anyOf" not in schema["properties"]["temperature"]
    assert "required" not in schema


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"prompt": "\ud800"}, "arguments.prompt holds a lone surrogate"),
        ({"messages": [{"role": "user", "content": "a\udc00"}]}, "arguments.messages[0].content holds a lone surrogate"),
        ({"prompt": "x", "temperature": float("nan")}, "arguments.temperature is nan"),
        ({"prompt": "x", "json_schema": {"enum": [float("-inf")]}}, "arguments.json_schema.enum[0] is -inf"),
        ({"prompt": "x", "\udfff": 1}, "arguments has a key holding a lone surrogate"),
    ],
)
def test_input_that_cannot_be_sent_on_names_the_field(arguments: dict, message: str) -> None:
    # Checked before pydantic, which would take a lone surrogate (or NaN in `json_schema`) as valid.
    with pytest.raises(InvalidArguments) as caught:
        parse_arguments("chat_m", ChatArgs, arguments)
    assert str(caught.value).startswith(f"Invalid arguments for chat_m: {message}")


def test_nesting_too_deep_names_where_it_starts() -> None:
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(InvalidArguments, match=r"^Invalid arguments for chat_m: arguments\.stop\[0\] is nested deeper than 64"):
        parse_arguments("chat_m", ChatArgs, {"prompt": "x", "stop": deep})
    shallow: list = []
    for _ in range(60):
        shallow = [shallow]
    with pytest.raises(InvalidArguments, match="stop"):  # within the limit: pydantic's own error
        parse_arguments("chat_m", ChatArgs, {"prompt": "x", "stop": shallow})
