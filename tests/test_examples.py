"""Every file in examples/ run as written: the curl script and both Python clients against a real
fake-LM-Studio -> bridge process -> gateway process topology, and each host's configuration (the
files, and the README's) parsed, checked for that host's shape, and its servers launched or
connected as the host would: from this checkout, or with uv from the git URL (this checkout
standing in for it), as nothing is published under llm-hub's name yet."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import (
    CHAT_MODEL,
    CHAT_TOOL,
    EMBED_MODEL,
    EMBED_TOOL,
    bridge_process,
    free_port,
    gateway_process,
)
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
KEY = "examples-test-key-0123456789abcdef"
WORDS = ["Streamed", " word", " by", " word", " from", " the", " fake", "."]
ANSWER = "".join(WORDS)
GATEWAY_DEFAULT = "http://127.0.0.1:8080"
WRONG_KEY = "not-a-key-of-this-gateway-42"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so one topology serves every test here (the in-process fake needs asyncio)."""
    return "asyncio"


@dataclass
class Topology:
    fake: FakeLMStudio
    lmstudio: str
    gateway: str

    def last_prompt(self) -> str:
        return self.fake.requests[-1]["json"]["messages"][-1]["content"]


@pytest.fixture(scope="module")
async def topology(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Topology]:
    logs = tmp_path_factory.mktemp("examples")
    # The embedding model comes first, so "the first chat_ tool" is really looked for.
    fake = FakeLMStudio([FakeModel(EMBED_MODEL, type="embeddings"), FakeModel(CHAT_MODEL)])
    fake.chunk_text, fake.chunk_delay = list(WORDS), 0.03  # several progress updates per answer
    async with serve(fake.app) as lmstudio:
        bridge_port, gateway_port = free_port(), free_port()
        async with (
            bridge_process(lmstudio, bridge_port, logs / "bridge.log"),
            gateway_process(
                [f"http://127.0.0.1:{bridge_port}"],
                gateway_port,
                logs / "gateway.log",
                LLM_HUB_API_KEYS=f"tester:{KEY}",
            ),
        ):
            gateway = f"http://127.0.0.1:{gateway_port}"
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
                with anyio.fail_after(20):
                    while CHAT_TOOL not in {t["name"] for t in (await http.get(f"{gateway}/v1/tools")).json()["tools"]}:
                        await anyio.sleep(0.1)
            yield Topology(fake, lmstudio, gateway)


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any llm-hub or LM Studio setting, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
    return {**env, **values}


async def run(command: list[str], env: dict[str, str], seconds: float = 60) -> tuple[int, str, str]:
    """Run an example to completion without blocking the event loop the fake LM Studio runs on."""
    with anyio.fail_after(seconds):
        done = await anyio.run_process(command, env=env, check=False, cwd=ROOT)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# -- curl ----------------------------------------------------------------------------------------


def sse_events(text: str) -> list[tuple[str, Any]]:
    events, name = [], None
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


async def test_curl_lists_calls_and_streams(topology: Topology) -> None:
    prompt = 'Say "hi" \\ twice'  # quotes and a backslash survive the script's JSON escaping
    code, out, err = await run(
        ["bash", str(EXAMPLES / "curl.sh"), "", prompt], clean_env(LLM_HUB_URL=topology.gateway, LLM_HUB_API_KEY=KEY)
    )
    assert code == 0, err
    assert topology.last_prompt() == prompt

    listing, json_call, streamed = re.split(r"^== .*$\n", out, flags=re.MULTILINE)[1:]
    assert {CHAT_TOOL, EMBED_TOOL, "list_models"} <= set(listing.split())

    result = json.loads(json_call)
    assert result["structuredContent"]["text"] == ANSWER and not result.get("isError")
    assert result["structuredContent"]["model"] == CHAT_MODEL

    assert "event: progress" in streamed and "event: result" in streamed
    events = sse_events(streamed)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "result" and kinds.count("progress") >= 2
    assert "".join(data["message"] for kind, data in events if kind == "progress") == ANSWER
    assert events[-1][1]["structuredContent"]["text"] == ANSWER


async def test_curl_names_a_tool_and_explains_a_missing_or_wrong_key(topology: Topology) -> None:
    script = ["bash", str(EXAMPLES / "curl.sh")]
    code, out, err = await run(
        [*script, CHAT_TOOL, "hello"], clean_env(LLM_HUB_URL=topology.gateway, LLM_HUB_API_KEY=KEY)
    )
    assert code == 0 and f"/v1/tools/{CHAT_TOOL}" in out, err

    code, out, err = await run(script, clean_env(LLM_HUB_URL=topology.gateway))
    assert code == 2 and "LLM_HUB_API_KEY is not set" in err and not out

    code, _, err = await run(script, clean_env(LLM_HUB_URL=topology.gateway, LLM_HUB_API_KEY=WRONG_KEY))
    assert code != 0 and "Could not list the tools" in err and "Unknown API key" in err
    assert WRONG_KEY not in err


# -- Python clients ------------------------------------------------------------------------------


def assert_streamed_and_summarised(out: str) -> None:
    """The scripts print only progress text as the answer (the result's text is left out of the
    summary), so the answer on stdout proves it streamed; the summary is the structured result."""
    assert f"{CHAT_TOOL}> {ANSWER}\n" in out
    summary = json.loads(out[out.index(ANSWER) + len(ANSWER) :])
    assert summary["model"] == CHAT_MODEL and summary["finish_reason"] == "stop"
    assert summary["usage"]["completion_tokens"] == len(WORDS)
    assert set(summary["timings"]) >= {"time_to_first_token_s", "tokens_per_second"}


async def test_gateway_client_streams_through_the_gateway(topology: Topology) -> None:
    code, out, err = await run(
        [sys.executable, str(EXAMPLES / "gateway_client.py"), "", "Hello gateway"],
        clean_env(LLM_HUB_URL=topology.gateway, LLM_HUB_API_KEY=KEY),
    )
    assert code == 0, err
    assert out.startswith("tools: ") and EMBED_TOOL in out.splitlines()[0]
    assert_streamed_and_summarised(out)
    assert topology.last_prompt() == "Hello gateway"

    code, out, err = await run(
        [sys.executable, str(EXAMPLES / "gateway_client.py")], clean_env(LLM_HUB_URL=topology.gateway)
    )
    assert code == 1 and "LLM_HUB_API_KEY is not set" in err

    code, out, err = await run(
        [sys.executable, str(EXAMPLES / "gateway_client.py")],
        clean_env(LLM_HUB_URL=topology.gateway, LLM_HUB_API_KEY=WRONG_KEY),
    )
    assert code == 1 and "Could not use the gateway" in err and "Traceback" not in err


async def test_gateway_client_keeps_heartbeats_out_of_the_answer(topology: Topology) -> None:
    # A model "loading" for longer than the bridge's heartbeat interval (0.5 s in these tests).
    topology.fake.mode, topology.fake.slow_seconds = "slow", 1.6
    try:
        code, out, err = await run(
            [sys.executable, str(EXAMPLES / "gateway_client.py")],
            clean_env(LLM_HUB_URL=topology.gateway, LLM_HUB_API_KEY=KEY),
        )
    finally:
        topology.fake.mode = "ok"
    assert code == 0, err
    assert "[waiting for LM Studio" in err and "waiting" not in out  # heartbeats shown apart from text
    assert_streamed_and_summarised(out)


async def test_stdio_client_launches_the_bridge(topology: Topology) -> None:
    code, out, err = await run(
        [sys.executable, str(EXAMPLES / "stdio_client.py"), CHAT_TOOL, "Hello stdio"],
        clean_env(LMSTUDIO_URL=topology.lmstudio),
    )
    assert code == 0, err
    assert out.startswith("tools: ") and CHAT_TOOL in out.splitlines()[0]
    assert_streamed_and_summarised(out)
    assert topology.last_prompt() == "Hello stdio"


# -- host configuration files --------------------------------------------------------------------

CONFIGS = {  # file, from the repository root -> the key holding its servers
    "claude_desktop_config.example.json": "mcpServers",
    "examples/cursor-mcp.json": "mcpServers",
    "examples/lmstudio-mcp.json": "mcpServers",
    "examples/vscode-mcp.json": "servers",
}
INPUT = re.compile(r"\$\{input:([^}]+)\}")
CHECKOUT = "/Users/YOU/llm-hub"  # the placeholder for where the user's checkout is


def readme_configs() -> dict[str, dict[str, Any]]:
    """The JSON blocks of the README's "Desktop hosts" section, by position."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Desktop hosts\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"^```json\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert blocks, "the README shows no host configuration"
    return {f"README.md, Desktop hosts, block {i}": json.loads(block) for i, block in enumerate(blocks, 1)}


README_CONFIGS = readme_configs()


def test_every_example_is_checked_and_listed_in_the_readme() -> None:
    assert {f"examples/{p.name}" for p in EXAMPLES.glob("*.json")} == {c for c in CONFIGS if "/" in c}
    readme = (EXAMPLES / "README.md").read_text()
    for example in EXAMPLES.iterdir():
        if example.name != "README.md":
            assert f"[`{example.name}`]({example.name})" in readme, example.name


def servers_of(name: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The configuration's stdio and HTTP server entries, after checking the host's shape."""
    if name in README_CONFIGS:  # Claude Desktop's, Cursor's or LM Studio's: one shape
        document, key = README_CONFIGS[name], "mcpServers"
    else:
        document, key = json.loads((ROOT / name).read_text()), CONFIGS[name]
    assert set(document) <= {key, "inputs"} and document[key], document
    stdio, http = {}, {}
    for server, entry in document[key].items():
        if "command" in entry:
            assert set(entry) <= {"type", "command", "args", "env"}, entry
            assert entry.get("type", "stdio") == "stdio"
            assert all(isinstance(a, str) for a in entry.get("args", []))
            assert all(isinstance(v, str) for v in entry.get("env", {}).values())
            stdio[server] = entry
        else:
            assert set(entry) <= {"type", "url", "headers"} and "url" in entry, entry
            http[server] = entry
    if key == "servers":  # VS Code names the transport and declares the ${input:...} it prompts for
        assert all("type" in entry for entry in document[key].values())
        assert {e["type"] for e in http.values()} <= {"http"}
        declared = {i["id"]: i for i in document.get("inputs", [])}
        for used in INPUT.findall(json.dumps(document[key])):
            assert declared[used]["type"] == "promptString" and declared[used]["password"] is True
    else:
        assert "inputs" not in document
    if name.startswith("claude_desktop"):
        assert not http, "Claude Desktop's config file launches stdio servers only"
    elif name in CONFIGS:
        assert http, "show the gateway over HTTP too"
    assert stdio
    return stdio, http


def uvx() -> str:
    found = Path(sys.executable).with_name("uvx")
    return str(found) if found.exists() else shutil.which("uvx") or pytest.fail("uvx missing: pip install -e '.[test]'")


def index_access() -> dict[str, str]:
    """What this machine's processes need to reach the package index (its certificates, a proxy), which the
    SDK leaves out of a server's environment and a desktop host has from its own machine."""
    wanted = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    return {k: v for k, v in os.environ.items() if k.upper() in wanted or k.startswith("UV_")}


def launch(entry: dict[str, Any]) -> tuple[str, list[str]]:
    """What a host runs for this entry, on this machine: the checkout's console script, or uvx taking
    llm-hub from this checkout where the entry names its git URL."""
    command, args = entry["command"], list(entry.get("args", []))
    path = PureWindowsPath(command) if "\\" in command else PurePosixPath(command)
    assert path.is_absolute(), f"desktop hosts do not inherit PATH: give an absolute path, not {command!r}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    if path.name in {"uvx", "uvx.exe"}:
        assert args[:1] == ["--from"] and args[1].startswith("git+https://"), \
            f"llm-hub is not on PyPI yet: uvx must take it --from its git URL, not {args}"
        assert args[2] in scripts, args
        return uvx(), ["--from", str(ROOT), *args[2:]]
    assert command == f"{CHECKOUT}/.venv/bin/llm-hub", f"the console script in a checkout's .venv, not {command!r}"
    installed = ROOT / ".venv" / "bin" / "llm-hub"
    if not installed.exists():
        pytest.fail(f"{installed} is missing: make it as the README says (python3 -m venv .venv && "
                    ".venv/bin/pip install -e '.[test]')")
    return str(installed), args


@pytest.mark.parametrize("name", [*sorted(CONFIGS), *README_CONFIGS])
async def test_config_servers_start_and_connect(name: str, topology: Topology) -> None:
    stdio, http = servers_of(name)

    for entry in stdio.values():
        command, args = launch(entry)
        env = {**entry.get("env", {}), "LMSTUDIO_URL": topology.lmstudio}  # LM Studio: the fake
        if command == uvx():
            env.update(index_access())
            # uv builds llm-hub from source once: a host's first start waits for that too.
            code, _, err = await run([command, *args, "--version"], clean_env(), seconds=300)
            assert code == 0, err[-2000:]
        # Launch it as the host would, with the entry's environment.
        async with Client(StdioServerParameters(command=command, args=args, env=env)) as client:
            with anyio.fail_after(10):
                while CHAT_TOOL not in {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}:
                    await anyio.sleep(0.1)

    for entry in http.values():
        url, authorization = entry["url"], entry["headers"]["Authorization"]
        assert url == f"{GATEWAY_DEFAULT}/mcp"
        scheme, placeholder = authorization.split(" ", 1)
        assert scheme == "Bearer" and placeholder
        # The same entry with the test gateway's address and key filled in.
        headers = {**entry["headers"], "Authorization": f"Bearer {KEY}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http_client,
            Client(
                streamable_http_client(url.replace(GATEWAY_DEFAULT, topology.gateway), http_client=http_client)
            ) as client,
        ):
            assert CHAT_TOOL in {t.name for t in (await client.list_tools()).tools}
