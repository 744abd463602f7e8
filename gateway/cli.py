"""`llm-hub-gateway`, and `llm-hub up` (a bridge and a gateway in one process)."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import uvicorn
from loguru import logger
from pydantic import ValidationError

from gateway import __version__
from gateway.settings import GatewaySettings
from mcp_server.cli import server_loop_options
from mcp_server.log import setup_logging

_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--bridge", "bridges", "bridge base URL, e.g. http://127.0.0.1:3000; repeatable", {"action": "append"}),
    ("--host", "host", "bind address (default 127.0.0.1; 0.0.0.0 to serve the network)", {}),
    ("--port", "port", "port (default 8080)", {"type": int}),
    ("--rate-limit", "rate_limit", "tool calls per key, e.g. 60/minute (default)", {}),
    ("--redis-url", "redis_url", "Redis for a rate-limit budget shared by several gateways", {}),
    ("--cors-origin", "cors_origins", "origin allowed by CORS; repeatable (default none)", {"action": "append"}),
    ("--health-interval", "health_interval", "seconds between bridge health checks (default 30)", {"type": float}),
    ("--log-level", "log_level", "TRACE, DEBUG, INFO, WARNING or ERROR (default INFO)", {}),
    ("--log-format", "log_format", "json or text (default json)", {"choices": ["json", "text"]}),
]

EPILOG = """\
API keys come from LLM_HUB_API_KEYS only (comma-separated NAME:KEY or KEY), never from a flag, so they stay
out of process listings. Without keys the gateway refuses to start; LLM_HUB_AUTH_DISABLED=true runs it
open, for development. Also: LLM_HUB_KEY_LIMITS (NAME=LIMIT,...), LLM_HUB_REQUEST_LIMIT, LLM_HUB_BRIDGE_TOKEN,
LLM_HUB_RATE_LIMIT_FAIL_OPEN, LLM_HUB_CALL_TIMEOUT, LLM_HUB_MAX_BODY_BYTES. Flags override the environment."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-hub-gateway",
        description="One authenticated, rate-limited MCP and HTTP endpoint in front of many llm-hub bridges.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, field, text, extra in _FLAGS:
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=f"{text} [env: LLM_HUB_{field.upper()}]",
                            **extra)
    parser.add_argument("--version", action="version", version=f"llm-hub-gateway {__version__}")
    return parser


def load_settings(overrides: dict[str, Any]) -> GatewaySettings:
    """Settings from env and overrides, or exit 2 with a message naming what is wrong."""
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "settings"
            sys.stderr.write(f"llm-hub-gateway: invalid setting LLM_HUB_{field.upper()}: {error['msg']}\n")
        raise SystemExit(2) from None
    if not settings.api_keys and not settings.auth_disabled:
        sys.stderr.write(
            "llm-hub-gateway: no API keys configured, refusing to start.\n"
            "  Set LLM_HUB_API_KEYS to comma-separated NAME:KEY pairs, e.g.\n"
            "    LLM_HUB_API_KEYS=alice:$(openssl rand -hex 24)\n"
            "  or, for development only, LLM_HUB_AUTH_DISABLED=true.\n"
        )
        raise SystemExit(2)
    if not settings.bridges:
        sys.stderr.write("llm-hub-gateway: no bridges: pass --bridge http://HOST:3000 or set LLM_HUB_BRIDGES.\n")
        raise SystemExit(2)
    return settings


def _announce(settings: GatewaySettings) -> None:
    setup_logging(settings.log_level, settings.log_format)
    if settings.auth_disabled:
        logger.warning("authentication is DISABLED (LLM_HUB_AUTH_DISABLED): anyone who reaches this port can use it")
    logger.info(
        "llm-hub-gateway {} on http://{}:{} in front of {} bridge(s); {} key(s); rate limit {} per key{}",
        __version__, settings.host, settings.port, len(settings.bridges), len(settings.api_keys),
        settings.rate_limit, " (Redis)" if settings.redis_url else "",
    )


def _uvicorn(app: Any, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def main(argv: Sequence[str] | None = None) -> None:
    from gateway.app import Gateway

    args = vars(_parser().parse_args(argv))
    settings = load_settings(args)
    _announce(settings)
    server = _uvicorn(Gateway(settings).app(), settings.host, settings.port)
    try:
        anyio.run(server.serve, backend_options=server_loop_options("http"))
    except KeyboardInterrupt:
        pass


async def up(bridge_port: int, gateway_overrides: dict[str, Any], bridge_overrides: dict[str, Any]) -> None:
    """A bridge on loopback and a gateway in front of it, in one process, for local networked use."""
    from gateway.app import Gateway
    from mcp_server.server import Bridge
    from mcp_server.settings import BridgeSettings

    # The bridge only talks to this gateway: a fresh token keeps other local users off its port.
    token = secrets.token_urlsafe(24)
    bridge_settings = BridgeSettings(
        **{**bridge_overrides, "transport": "http", "host": "127.0.0.1", "port": bridge_port, "bridge_token": token}
    )
    settings = load_settings(
        {**gateway_overrides, "bridges": [f"http://127.0.0.1:{bridge_port}"], "bridge_token": token}
    )
    _announce(settings)
    async with Bridge(bridge_settings) as bridge, anyio.create_task_group() as tg:
        bridge_server = _uvicorn(bridge.http_app(), "127.0.0.1", bridge_port)
        tg.start_soon(bridge_server.serve)
        while not bridge_server.started:  # so the gateway's first health check finds it listening
            await anyio.sleep(0.02)
        await _uvicorn(Gateway(settings).app(), settings.host, settings.port).serve()
        tg.cancel_scope.cancel()
