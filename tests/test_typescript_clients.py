"""The official TypeScript MCP clients against the bridge and the gateway: SDK v1, SDK v2 in both eras, mcp-remote.

`tests/ts/client.mjs` is a client built on each SDK the way TypeScript hosts build theirs (versions
pinned in tests/ts/package.json). Here it runs against the bridge over stdio (the client spawns
`llm-hub`), over HTTP (`llm-hub serve` on a loopback port), and through mcp-remote in front of that
HTTP bridge, as desktop users reach remote servers. It lists the tools, streams calls, sees
list_changed and cancels; the fake LM Studio runs in this process, so the tests can change its
models and see the upstream stream abandoned.

Then the same through the gateway, as teams' users meet it (`llm-hub-gateway` with an API key, in
front of a bridge that wants the gateway's token): SDK v1 over HTTP in the handshake era (the
gateway's SDK server, with its own ping before the result), SDK v2 over HTTP in the 2026 era (whose
tool calls carry matching Mcp-Method/Mcp-Name headers, so gateway/fastpath.py relays the bridge's
SSE unchanged: in that era the gateway's SDK server answers no tools/call), and mcp-remote in front
of the gateway with `--header "Authorization: Bearer KEY"`, as in a desktop host's config. Each of
those tests shares one bridge and gateway between the three clients.

These clients drop progress that arrives in the same read as the result (typescript-sdk#2580,
mcp_server/delivery.py). The client stands in for a host that spends 1 ms drawing each update:
without the bridge's ping before the result, a quarter to a half of the calls over stdio and through
mcp-remote then lose text (measured); with it, none may. Through the gateway the same holds for its
own ping: without it, about a third of mcp-remote's calls lost text (measured).

Needs `npm ci --prefix tests/ts`; skipped without it, except where LLM_HUB_REQUIRE_TS=1 (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.conftest import (
    CHAT_TOOL,
    _env_for,
    bridge_process,
    bridge_settings,
    default_models,
    free_port,
    gateway_process,
    llm_hub_command,
)
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

pytestmark = pytest.mark.anyio

TS_DIR = Path(__file__).with_name("ts")
CLIENT = TS_DIR / "client.mjs"
REPLY = [f"piece {i} " for i in range(50)]
NEW_MODEL = FakeModel("qwen/qwen3-8b", publisher="qwen", arch="qwen3")
NEW_TOOL = "chat_qwen_qwen3-8b"
API_KEY = "ts-clients-key-0123456789abcdef"
BRIDGE_TOKEN = "ts-clients-bridge-token-0123456789"


@dataclass(frozen=True)
class TSClient:
    sdk: str  # "v1": @modelcontextprotocol/sdk; "v2": @modelcontextprotocol/client
    mode: str  # version negotiation: "legacy" (handshake era) or "auto" (2026-07-28 when offered)
    via: str  # "stdio", "http", or "remote" (mcp-remote in front of the HTTP bridge or gateway)

    @property
    def era(self) -> str:
        return "2026-07-28" if self.mode == "auto" else "2025-11-25"


CLIENTS = {
    "v1-stdio": TSClient("v1", "legacy", "stdio"),
    "v2-stdio": TSClient("v2", "legacy", "stdio"),
    "v2-stdio-2026": TSClient("v2", "auto", "stdio"),
    "v1-http": TSClient("v1", "legacy", "http"),
    "v2-http-2026": TSClient("v2", "auto", "http"),
    "mcp-remote-http": TSClient("v1", "legacy", "remote"),
}
# Over 2026-era stdio the bridge cannot ping, and its pause only makes a loss rare (delivery.py).
GUARANTEED = [name for name, client in CLIENTS.items() if not (client.via == "stdio" and client.mode == "auto")]
# In front of the gateway, as its users reach it.
GATEWAY_CLIENTS = {
    "v1-gateway": TSClient("v1", "legacy", "http"),
    "v2-gateway-2026": TSClient("v2", "auto", "http"),
    "mcp-remote-gateway": TSClient("v1", "legacy", "remote"),
}


@pytest.fixture
def node() -> str:
    node = shutil.which("node")
    if node is None:
        missing = "node is not installed"
    elif not (TS_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        missing = "the TypeScript clients are not installed: npm ci --prefix tests/ts"
    else:
        return node
    if os.environ.get("LLM_HUB_REQUIRE_TS") == "1":
        pytest.fail(missing)
    pytest.skip(missing)


@pytest.fixture
async def lmstudio() -> AsyncIterator[tuple[FakeLMStudio, str]]:
    fake = FakeLMStudio(default_models())
    fake.chunk_text = list(REPLY)
    async with serve(fake.app) as url:
        yield fake, url


class Run:
    """A running client: its JSON lines as they come, and its stdin."""

    def __init__(self, process: anyio.abc.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self._buffer = b""

    async def until(self, event: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            while b"\n" not in self._buffer:
                try:
                    self._buffer += await self.process.stdout.receive()
                except anyio.EndOfStream:
                    pytest.fail(f"the client exited before {event!r}:\n{self.log.read_text()[-3000:]}")
            line, self._buffer = self._buffer.split(b"\n", 1)
            record = json.loads(line)
            if record["event"] == "error":
                pytest.fail(f"the client failed: {record['error']}\n{self.log.read_text()[-3000:]}")
            if record["event"] == event:
                return record

    async def send_line(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(b"\n")


@dataclass(frozen=True)
class Server:
    """Where an HTTP client connects (a bridge's or the gateway's /mcp), and the headers it sends."""

    url: str
    headers: tuple[str, ...] = ()


@asynccontextmanager
async def http_bridge(lmstudio_url: str, tmp_path: Path, **env: str) -> AsyncIterator[str]:
    """`llm-hub serve` in front of `lmstudio_url`; yields its base URL."""
    port = free_port()
    async with bridge_process(lmstudio_url, port, tmp_path / "bridge.log", **env):
        yield f"http://127.0.0.1:{port}"


@asynccontextmanager
async def gateway(lmstudio_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    """A bridge that wants the gateway's token, and the gateway in front of it, wanting an API key."""
    port = free_port()
    async with (
        http_bridge(lmstudio_url, tmp_path, LLM_HUB_BRIDGE_TOKEN=BRIDGE_TOKEN) as bridge,
        # 300 calls in a test: above the default 60 tool calls a minute per key.
        gateway_process([bridge], port, tmp_path / "gateway.log", LLM_HUB_API_KEYS=f"ts-tests:{API_KEY}",
                        LLM_HUB_BRIDGE_TOKEN=BRIDGE_TOKEN, LLM_HUB_RATE_LIMIT="1000/minute"),
    ):
        yield Server(f"http://127.0.0.1:{port}/mcp", (f"Authorization: Bearer {API_KEY}",))


@asynccontextmanager
async def run_client(node: str, client: TSClient, lmstudio_url: str, tmp_path: Path, scenario: str,
                     *args: str) -> AsyncIterator[Run]:
    """The client running `scenario` against a bridge in front of `lmstudio_url`, reached as `client` says."""
    async with AsyncExitStack() as stack:
        server = None
        if client.via != "stdio":
            server = Server(f"{await stack.enter_async_context(http_bridge(lmstudio_url, tmp_path))}/mcp")
        yield await stack.enter_async_context(
            start_client(node, client, server, lmstudio_url, tmp_path / "client.log", scenario, *args)
        )


@asynccontextmanager
async def start_client(node: str, client: TSClient, server: Server | None, lmstudio_url: str, log: Path,
                       scenario: str, *args: str) -> AsyncIterator[Run]:
    """The client running `scenario` against `server`, or over stdio (`server` None) against a bridge it spawns."""
    command = [node, str(CLIENT), "--sdk", client.sdk, "--mode", client.mode, "--tool", CHAT_TOOL]
    async with AsyncExitStack() as stack:
        if server is None:
            # The client hands its environment to the bridge it spawns.
            env = _env_for(bridge_settings(lmstudio_url))
            command += ["--stdio", llm_hub_command()]
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_"))}
            env["MCP_REMOTE_CONFIG_DIR"] = str(log.parent / "mcp-remote")  # its auth store, kept out of $HOME
            command += ["--url" if client.via == "http" else "--remote", server.url]
            for header in server.headers:
                command += ["--header", header]
        sink = stack.enter_context(log.open("ab"))
        process = await stack.enter_async_context(
            await anyio.open_process([*command, scenario, *args], env=env, stderr=sink)
        )
        try:
            run = Run(process, log)
            connected = await run.until("connected")
            assert {"list_models", CHAT_TOOL} <= set(connected["tools"])
            if client.sdk == "v2":  # v1 has no accessor for it, and speaks only the handshake era
                assert connected["protocolVersion"] == client.era
            yield run
        finally:
            if process.returncode is None:
                process.kill()


@pytest.mark.parametrize("name", GUARANTEED)
async def test_progress_adds_up_to_the_result_on_every_call(node: str, lmstudio: tuple[FakeLMStudio, str],
                                                            tmp_path: Path, name: str) -> None:
    _fake, url = lmstudio
    calls = 100
    with anyio.fail_after(90):
        async with run_client(node, CLIENTS[name], url, tmp_path, "stream", "--calls", str(calls),
                              "--busy-ms", "1") as run:
            done = await run.until("done")
    assert done["texts"] == ["".join(REPLY)]
    assert done["incomplete"] == [], f"{calls - done['complete']} of {calls} calls lost progress"
    assert done["complete"] == calls
    assert done["unknownToken"] == 0, done["errors"]
    assert done["messages"] >= calls


async def test_progress_reaches_a_2026_era_stdio_client(node: str, lmstudio: tuple[FakeLMStudio, str],
                                                        tmp_path: Path) -> None:
    # The bridge can make a loss rare here, not impossible (no pings in this era): results and
    # progress are checked, not that every last piece arrived.
    _fake, url = lmstudio
    calls = 20
    with anyio.fail_after(60):
        async with run_client(node, CLIENTS["v2-stdio-2026"], url, tmp_path, "stream", "--calls", str(calls)) as run:
            done = await run.until("done")
    assert done["texts"] == ["".join(REPLY)]
    assert done["messages"] >= calls


@pytest.mark.parametrize("name", list(CLIENTS))
async def test_list_changed_reaches_the_client(node: str, lmstudio: tuple[FakeLMStudio, str], tmp_path: Path,
                                               name: str) -> None:
    fake, url = lmstudio
    with anyio.fail_after(60):
        async with run_client(node, CLIENTS[name], url, tmp_path, "list-changed") as run:
            await run.until("ready")
            fake.models.append(NEW_MODEL)
            changed = await run.until("list_changed")
    assert NEW_TOOL in changed["tools"]
    assert CHAT_TOOL in changed["tools"]


@pytest.mark.parametrize("name", list(CLIENTS))
async def test_cancelling_closes_the_lmstudio_stream(node: str, lmstudio: tuple[FakeLMStudio, str], tmp_path: Path,
                                                     name: str) -> None:
    fake, url = lmstudio
    fake.chunk_delay = 0.05  # 2.5 s for the whole answer: the cancel lands mid-stream
    with anyio.fail_after(60):
        async with run_client(node, CLIENTS[name], url, tmp_path, "cancel") as run:
            cancelled = await run.until("cancelled")
            assert cancelled["outcome"] == "aborted"
            assert cancelled["first"].startswith(REPLY[0])
            # The client is still connected: only the cancellation can have closed the stream.
            with anyio.fail_after(10):
                await fake.disconnected.wait()
            await run.send_line()
            await run.process.wait()
    assert fake.disconnects == 1


# -- through the gateway ---------------------------------------------------------------------------


def _losses(done: dict[str, Any]) -> str:
    return f"{done['calls'] - done['complete']} of {done['calls']} lost progress: {done['incomplete']}"


async def test_progress_adds_up_to_the_result_through_the_gateway(node: str, lmstudio: tuple[FakeLMStudio, str],
                                                                  tmp_path: Path) -> None:
    _fake, url = lmstudio
    calls = 100
    outcomes: dict[str, dict[str, Any]] = {}
    with anyio.fail_after(150):
        async with gateway(url, tmp_path) as server:
            for name, client in GATEWAY_CLIENTS.items():  # one after the other: each measured alone
                async with start_client(node, client, server, url, tmp_path / f"{name}.log", "stream",
                                        "--calls", str(calls), "--busy-ms", "1") as run:
                    outcomes[name] = await run.until("done")
    # Every client's figures before any assertion, so one failure shows all three.
    losses = {name: _losses(done) for name, done in outcomes.items() if done["incomplete"]}
    assert not losses, losses
    for name, done in outcomes.items():
        assert done["texts"] == ["".join(REPLY)], name
        assert done["complete"] == calls, name
        assert done["unknownToken"] == 0, (name, done["errors"])
        assert done["messages"] >= calls, name


async def test_list_changed_reaches_the_client_through_the_gateway(node: str, lmstudio: tuple[FakeLMStudio, str],
                                                                   tmp_path: Path) -> None:
    fake, url = lmstudio
    with anyio.fail_after(60):
        async with gateway(url, tmp_path) as server, AsyncExitStack() as stack:
            runs = {
                name: await stack.enter_async_context(
                    start_client(node, client, server, url, tmp_path / f"{name}.log", "list-changed")
                )
                for name, client in GATEWAY_CLIENTS.items()
            }
            for run in runs.values():
                await run.until("ready")
            fake.models.append(NEW_MODEL)
            changed = {name: (await run.until("list_changed"))["tools"] for name, run in runs.items()}
    for name, tools in changed.items():
        assert NEW_TOOL in tools, name
        assert CHAT_TOOL in tools, name


async def test_cancelling_through_the_gateway_closes_the_lmstudio_stream(
    node: str, lmstudio: tuple[FakeLMStudio, str], tmp_path: Path
) -> None:
    fake, url = lmstudio
    fake.chunk_delay = 0.05  # 2.5 s for the whole answer: the cancel lands mid-stream
    closed: dict[str, int] = {}
    with anyio.fail_after(90):
        async with gateway(url, tmp_path) as server:
            for name, client in GATEWAY_CLIENTS.items():
                fake.disconnects, fake.disconnected = 0, anyio.Event()
                async with start_client(node, client, server, url, tmp_path / f"{name}.log", "cancel") as run:
                    cancelled = await run.until("cancelled")
                    assert cancelled["outcome"] == "aborted", name
                    assert cancelled["first"].startswith(REPLY[0]), name
                    # The client is still connected: only the cancellation can have closed the stream.
                    with anyio.move_on_after(10):
                        await fake.disconnected.wait()
                    await run.send_line()
                    await run.process.wait()
                closed[name] = fake.disconnects
    assert closed == dict.fromkeys(GATEWAY_CLIENTS, 1)
