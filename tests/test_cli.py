"""The `llm-hub` command: settings, `check`, and a stdio channel that carries only protocol (the other
commands, help and refusals at start: test_commands.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from mcp_server.settings import BridgeSettings
from tests.conftest import CHAT_MODEL, CHAT_TOOL, default_models, fake_process, llm_hub_command
from tests.fake_lmstudio import FakeLMStudio, serve

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [llm_hub_command(), *args], env={**CLEAN_ENV, **env}, capture_output=True, text=True, timeout=60, check=False
    )


def test_settings_read_the_documented_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTUDIO_URL", "http://gpu-box:1234/")
    monkeypatch.setenv("LM_API_TOKEN", "from-lm-studio-docs")
    monkeypatch.setenv("LLM_HUB_POLL_INTERVAL", "7")
    monkeypatch.setenv("LLM_HUB_EXCLUDE_MODELS", "*embed*, *32b")
    monkeypatch.setenv("LLM_HUB_TOOLS", "chat,complete")
    settings = BridgeSettings()
    assert settings.lmstudio_url == "http://gpu-box:1234"
    assert settings.lmstudio_api_token is not None
    assert settings.lmstudio_api_token.get_secret_value() == "from-lm-studio-docs"
    assert "from-lm-studio-docs" not in repr(settings)
    assert settings.poll_interval == 7
    assert settings.exclude_models == ["*embed*", "*32b"]
    assert settings.tools == ["chat", "complete"]
    monkeypatch.setenv("LMSTUDIO_API_TOKEN", "sdk-name")
    monkeypatch.delenv("LM_API_TOKEN")
    assert BridgeSettings().lmstudio_api_token.get_secret_value() == "sdk-name"  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_flags_override_the_environment() -> None:
    env = {"LMSTUDIO_URL": "http://127.0.0.1:9", "LLM_HUB_TOOLS": "embed", "LLM_HUB_INCLUDE_MODELS": "none*"}
    async with fake_process("--models", f"{CHAT_MODEL},other/model,text-embedding-x") as (_, url):
        result = await anyio.to_thread.run_sync(lambda: _run(
            "check", "--lmstudio-url", url, "--tools", "chat", "--include", "google/*", "--include", "other/*", **env))
    assert result.returncode == 0, result.stderr
    assert f"OK at {url}" in result.stdout
    assert CHAT_TOOL in result.stdout and "chat_other_model" in result.stdout and "embed_" not in result.stdout


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLM_HUB_POLL_INTERVAL": "soon"}, "LLM_HUB_POLL_INTERVAL"),
        ({"LLM_HUB_POLL_INTERVAL": "-1"}, "LLM_HUB_POLL_INTERVAL"),
        ({"LMSTUDIO_URL": "localhost:1234"}, "LMSTUDIO_URL"),
        ({"LLM_HUB_TOOLS": "chat,draw"}, "LLM_HUB_TOOLS"),
        ({"LLM_HUB_LOG_LEVEL": "loud"}, "LLM_HUB_LOG_LEVEL"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_setting(env: dict[str, str], named: str) -> None:
    result = _run("check", **env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"llm-hub check: invalid {named}: ")
    assert result.stdout == ""


@pytest.mark.anyio
async def test_check_reports_models_and_tool_names() -> None:
    async with fake_process("--models", f"{CHAT_MODEL},text-embedding-nomic-embed-text-v1.5") as (_, url):
        result = await anyio.to_thread.run_sync(lambda: _run("check", "--lmstudio-url", url))
    assert result.returncode == 0, result.stderr
    assert f"LM Studio: OK at {url} (lmstudio-v1 API)" in result.stdout
    assert CHAT_TOOL in result.stdout and "embed_text-embedding-nomic-embed-text-v1.5" in result.stdout


def test_check_fails_when_lmstudio_is_down(free_tcp_port: int) -> None:
    result = _run("check", LMSTUDIO_URL=f"http://127.0.0.1:{free_tcp_port}")
    assert result.returncode == 1
    assert "NOT OK" in result.stdout and "lms server start" in result.stdout


@pytest.mark.anyio
async def test_stdout_carries_only_protocol(free_tcp_port: int) -> None:
    process = await anyio.open_process(
        [llm_hub_command(), "--log-level", "DEBUG"], env={**CLEAN_ENV, "LMSTUDIO_URL": f"http://127.0.0.1:{free_tcp_port}"}
    )
    assert process.stdin and process.stdout
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    await process.stdin.send((json.dumps(initialize) + "\n").encode())
    await anyio.sleep(1.0)  # a failed poll and its DEBUG logs happen meanwhile
    await process.stdin.aclose()
    with anyio.fail_after(15):
        out = b"".join([chunk async for chunk in process.stdout])
        await process.wait()
    lines = out.decode().splitlines()
    assert lines, "no answer on stdout"
    for line in lines:
        assert json.loads(line)["jsonrpc"] == "2.0"
    answer = json.loads(lines[0])
    assert answer["result"]["capabilities"]["tools"]["listChanged"] is True
    await process.aclose()


@pytest.mark.anyio
async def test_logs_are_json_and_hold_no_prompt_completion_or_token() -> None:
    fake = FakeLMStudio(default_models(), token="TOKEN-never-logged")
    fake.chunk_text = ["ZEBRA-", "COMPLETION"]
    env = {**CLEAN_ENV, "LMSTUDIO_API_TOKEN": "TOKEN-never-logged", "LLM_HUB_POLL_INTERVAL": "0.2"}
    with tempfile.TemporaryFile("w+") as errlog:
        async with serve(fake.app) as url:
            env["LMSTUDIO_URL"] = url
            params = StdioServerParameters(command=llm_hub_command(), env=env)
            async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
                with anyio.fail_after(10):
                    while CHAT_TOOL not in {t.name for t in (await client.list_tools()).tools}:
                        await anyio.sleep(0.1)
                result = await client.call_tool(CHAT_TOOL, {"prompt": "PURPLE-ELEPHANT-PROMPT"})
                assert not result.is_error
        errlog.seek(0)
        logged = errlog.read()
    records = [json.loads(line) for line in logged.splitlines() if line.strip()]
    assert any("done in" in r["message"] and r["level"] == "INFO" for r in records)
    assert "PURPLE-ELEPHANT" not in logged and "ZEBRA" not in logged and "TOKEN-never-logged" not in logged


@pytest.mark.anyio
async def test_bridge_on_a_non_loopback_address_without_a_token_warns(tmp_path, free_tcp_port: int) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import service

    log = tmp_path / "bridge.log"
    env = {**CLEAN_ENV, "LLM_HUB_LOG_FORMAT": "text", "LMSTUDIO_URL": "http://127.0.0.1:9"}
    command = [llm_hub_command(), "serve", "--host", "0.0.0.0", "--port", str(free_tcp_port)]
    async with service(command, env, f"http://127.0.0.1:{free_tcp_port}/health", log):
        pass
    assert "without LLM_HUB_BRIDGE_TOKEN" in log.read_text()
