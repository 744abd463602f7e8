"""Shared fixtures: a fake LM Studio on a real port, and bridges reached over every transport."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest
import redis
from mcp import Client, StdioServerParameters

from mcp_server.server import Bridge
from mcp_server.settings import BridgeSettings
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

CHAT_MODEL = "google/gemma-3-270m"
EMBED_MODEL = "text-embedding-nomic-embed-text-v1.5"
CHAT_TOOL = "chat_google_gemma-3-270m"
EMBED_TOOL = "embed_text-embedding-nomic-embed-text-v1.5"

TRANSPORTS = ["inproc", "stdio", "http"]
MODES = ["legacy", "auto"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def clear_of_minute_boundary(needed: float = 15.0) -> None:
    """Waits, if need be, until the current minute has `needed` seconds left.

    Per-minute limits use `limits`' sliding-window counter, which rounds the previous minute's
    weighted count down: just after a minute boundary one call more than the limit may pass. Tests
    that count calls exactly do their counting inside one minute.
    """
    left = 60 - time.time() % 60
    if left < needed:
        await anyio.sleep(left + 0.05)


def llm_hub_command() -> str:
    """The installed `llm-hub` console script beside this interpreter."""
    found = Path(sys.executable).with_name("llm-hub")
    if found.exists():
        return str(found)
    which = shutil.which("llm-hub")
    assert which, "llm-hub is not installed: pip install -e '.[test]'"
    return which


def default_models() -> list[FakeModel]:
    return [
        FakeModel(CHAT_MODEL, display_name="Gemma 3 270M", capabilities=["tool_use"]),
        FakeModel(EMBED_MODEL, type="embeddings", publisher="nomic-ai", arch="nomic-bert"),
    ]


@pytest.fixture
async def lmstudio() -> AsyncIterator[tuple[FakeLMStudio, str]]:
    fake = FakeLMStudio(default_models())
    async with serve(fake.app) as url:
        yield fake, url


def bridge_settings(url: str, **overrides: Any) -> BridgeSettings:
    values: dict[str, Any] = {
        "lmstudio_url": url,
        "poll_interval": 0.2,
        "request_timeout": 10,
        "heartbeat_interval": 0.5,
        "log_format": "text",
        **overrides,
    }
    return BridgeSettings(**values)


def _env_for(settings: BridgeSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, list):
            value = ",".join(value)
        elif hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"LLM_HUB_{name.upper()}"] = str(value)
    return env


FAKE_SCRIPT = Path(__file__).with_name("fake_lmstudio.py")


@asynccontextmanager
async def fake_process(*args: str) -> AsyncIterator[tuple[anyio.abc.Process, str]]:
    """The fake LM Studio in a process of its own, which a test can kill like a real server."""
    process = await anyio.open_process([sys.executable, str(FAKE_SCRIPT), "--port", "0", *args])
    try:
        assert process.stdout is not None
        with anyio.fail_after(20):
            line = await process.stdout.receive()
        url = re.search(rb"http://[\w.:\[\]]+", line)
        assert url, line
        yield process, url.group().decode()
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()


Connect = Callable[..., AbstractAsyncContextManager[Client]]


@asynccontextmanager
async def connect_bridge(transport: str, mode: str, settings: BridgeSettings, **client_kwargs: Any) -> AsyncIterator[Client]:
    """An SDK `Client` connected to a bridge with these settings over the named transport."""
    if transport == "stdio":
        params = StdioServerParameters(command=llm_hub_command(), args=[], env=_env_for(settings))
        async with Client(params, mode=mode, **client_kwargs) as client:
            yield client
        return
    async with Bridge(settings) as bridge:
        if transport == "inproc":
            async with Client(bridge.server, mode=mode, **client_kwargs) as client:
                yield client
        else:
            async with serve(bridge.http_app()) as base, Client(f"{base}/mcp", mode=mode, **client_kwargs) as client:
                yield client


@pytest.fixture(params=[(t, m) for t in TRANSPORTS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def connect(request: pytest.FixtureRequest) -> Connect:
    """Connect to a bridge over every transport in both protocol eras: `async with connect(settings) as c`."""
    transport, mode = request.param

    def factory(settings: BridgeSettings, **client_kwargs: Any) -> AbstractAsyncContextManager[Client]:
        return connect_bridge(transport, mode, settings, **client_kwargs)

    factory.transport = transport  # type: ignore[attr-defined]
    factory.mode = mode  # type: ignore[attr-defined]
    return factory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def service(command: list[str], env: dict[str, str], health_url: str, log: Path,
                  ready: tuple[int, ...] = (200, 503)) -> AsyncIterator[anyio.abc.Process]:
    """A server process (logs to `log`), ready once `health_url` answers with one of `ready`."""
    with log.open("ab") as sink:
        process = await anyio.open_process(command, env=env, stdout=sink, stderr=sink)
    try:
        async with httpx2.AsyncClient() as http:
            with anyio.fail_after(30):
                while True:
                    if process.returncode is not None:
                        raise RuntimeError(f"{command[0]} exited {process.returncode}: {log.read_text()[-2000:]}")
                    try:
                        if (await http.get(health_url)).status_code in ready:
                            break
                    except httpx2.TransportError:
                        pass
                    await anyio.sleep(0.1)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
        await process.aclose()


def bridge_process(lmstudio_url: str, port: int, log: Path, **env: str) -> AbstractAsyncContextManager[anyio.abc.Process]:
    """`llm-hub serve` on a loopback port, in front of `lmstudio_url`."""
    settings = bridge_settings(lmstudio_url, port=port, log_format="json", poll_interval=0.3)
    return service([llm_hub_command(), "serve"], {**_env_for(settings), **env}, f"http://127.0.0.1:{port}/health", log)


def gateway_command() -> str:
    return str(Path(llm_hub_command()).with_name("llm-hub-gateway"))


def gateway_process(bridges: list[str], port: int, log: Path, **env: str) -> AbstractAsyncContextManager[anyio.abc.Process]:
    """`llm-hub-gateway` on a loopback port in front of `bridges`; healthy once one bridge is."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
    values = {
        "LLM_HUB_BRIDGES": ",".join(bridges), "LLM_HUB_PORT": str(port), "LLM_HUB_HEALTH_INTERVAL": "0.5",
        "LLM_HUB_LOG_FORMAT": "json", **env,
    }
    return service([gateway_command()], {**base, **values}, f"http://127.0.0.1:{port}/health", log, ready=(200,))


REDIS_SERVER = "/usr/bin/redis-server"


@contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A throwaway redis-server on a free port; yields its URL and process."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail(f"{REDIS_SERVER} is missing: these tests need a real Redis (apt-get install -y redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                    pytest.fail(f"redis-server did not start on port {port}:\n{output}")
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()
