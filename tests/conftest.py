"""Shared fixtures: a fake LM Studio on a real port, and bridges reached over every transport."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
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
