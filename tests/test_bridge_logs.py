"""No prompt, completion or token in the bridge's logs at any level, whatever its libraries log.

At DEBUG the SDK, sse-starlette, httpcore2 and uvicorn print the messages passing through them; the
bridge runs here as the real command at DEBUG and TRACE, over stdio and over HTTP (both eras), with
distinctive prompts, completions, embeddings input and tokens, and its whole stderr is searched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import (
    CHAT_TOOL,
    EMBED_TOOL,
    _env_for,
    bridge_process,
    bridge_settings,
    default_models,
    free_port,
    llm_hub_command,
)
from tests.fake_lmstudio import FakeLMStudio, serve

pytestmark = pytest.mark.anyio

PROMPT, SYSTEM, EMBED_INPUT = "PURPLE-ELEPHANT-PROMPT", "SYSTEM-WALRUS-ORDERS", "EMBEDDED-PANGOLIN-TEXT"
COMPLETION = ["QUOKKA-", "NARWHAL-", "AXOLOTL"]
LM_TOKEN, BRIDGE_TOKEN = "sk-lm-LMTOKEN1:never-in-any-log-00000", "BRIDGETOKEN-never-in-any-log"
SECRETS = [PROMPT, SYSTEM, EMBED_INPUT, *(piece.strip("-") for piece in COMPLETION), "LMTOKEN1", "never-in-any-log"]


def _fake() -> FakeLMStudio:
    fake = FakeLMStudio(default_models(), token=LM_TOKEN)
    fake.chunk_text = list(COMPLETION)
    return fake


async def _use(client: Client) -> None:
    with anyio.fail_after(15):
        while CHAT_TOOL not in {t.name for t in (await client.list_tools()).tools}:
            await anyio.sleep(0.1)
    chat = await client.call_tool(CHAT_TOOL, {"prompt": PROMPT, "system": SYSTEM}, progress_callback=_ignore)
    assert not chat.is_error and "QUOKKA" in chat.content[0].text  # type: ignore[union-attr]
    assert not (await client.call_tool(EMBED_TOOL, {"input": [EMBED_INPUT]})).is_error
    assert (await client.call_tool(CHAT_TOOL, {"prompt": PROMPT, "colour": PROMPT})).is_error


async def _ignore(progress: float, total: float | None, message: str | None) -> None:
    pass


def _assert_clean(logged: str, level: str) -> None:
    records = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert any("done in" in r["message"] for r in records), logged[-2000:]  # the calls were logged
    leaked = [secret for secret in SECRETS if secret in logged]
    assert not leaked, f"{leaked} in the {level} log:\n{logged[-4000:]}"


@pytest.mark.parametrize("level", ["DEBUG", "TRACE"])
async def test_stdio_logs_hold_no_prompt_completion_or_token(level: str) -> None:
    fake = _fake()
    async with serve(fake.app) as url:
        settings = bridge_settings(url, log_level=level, log_format="json", lmstudio_api_token=LM_TOKEN)
        with tempfile.TemporaryFile("w+") as errlog:
            params = StdioServerParameters(command=llm_hub_command(), env=_env_for(settings))
            for mode in ("legacy", "auto"):
                async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:
                    await _use(client)
            errlog.seek(0)
            logged = errlog.read()
    _assert_clean(logged, level)


@pytest.mark.parametrize("level", ["DEBUG", "TRACE"])
async def test_http_logs_hold_no_prompt_completion_or_token(level: str, tmp_path: Path) -> None:
    fake = _fake()
    log = tmp_path / "bridge.log"
    port = free_port()
    env = {"LLM_HUB_LOG_LEVEL": level, "LLM_HUB_BRIDGE_TOKEN": BRIDGE_TOKEN, "LLM_HUB_LMSTUDIO_API_TOKEN": LM_TOKEN}
    async with serve(fake.app) as url, bridge_process(url, port, log, **env):
        base = f"http://127.0.0.1:{port}"
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {BRIDGE_TOKEN}"}) as http:
            for mode in ("legacy", "auto"):
                async with Client(streamable_http_client(f"{base}/mcp", http_client=http), mode=mode) as client:
                    await _use(client)
            # A body the SDK cannot parse, holding the prompt, and a wrong token.
            await http.post(f"{base}/mcp", content=f'{{"prompt": "{PROMPT}\\ud800"',
                            headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
            await http.post(f"{base}/mcp", json={}, headers={"Authorization": f"Bearer {BRIDGE_TOKEN}x"})
    _assert_clean(log.read_text(), level)


def test_exceptions_libraries_log_keep_their_type_and_lose_their_text() -> None:
    script = (
        "import logging\n"
        "from mcp_server.log import setup_logging\n"
        "setup_logging('DEBUG', '{fmt}')\n"
        "try:\n"
        f"    raise ValueError('input_value={PROMPT}')\n"
        "except ValueError:\n"
        "    logging.getLogger('mcp.server.streamable_http').exception('Error handling POST request')\n"
        f"logging.getLogger('sse_starlette.sse').debug('chunk: {COMPLETION[0]}')\n"
    )
    for fmt in ("json", "text"):
        done = subprocess.run([sys.executable, "-c", script.format(fmt=fmt)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Error handling POST request" in done.stderr and "ValueError" in done.stderr
        assert PROMPT not in done.stderr and "QUOKKA" not in done.stderr, done.stderr
