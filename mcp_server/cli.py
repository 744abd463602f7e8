"""`llm-hub`: serve the bridge over stdio (default) or HTTP, or check what LM Studio offers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from loguru import logger
from pydantic import ValidationError

from mcp_server import __version__
from mcp_server.errors import LMStudioError
from mcp_server.log import setup_logging
from mcp_server.settings import BridgeSettings, env_name

# (flag, settings field, help, extra argparse options); every flag names its environment variable.
_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--lmstudio-url", "lmstudio_url", "LM Studio's base URL (default http://localhost:1234)", {}),
    ("--poll-interval", "poll_interval", "seconds between model-list polls (default 30)", {"type": float}),
    ("--request-timeout", "request_timeout", "seconds one LM Studio request may take (default 300)", {"type": float}),
    ("--include", "include_models", "glob on model ids to offer as tools; repeatable (default *)", {"action": "append"}),
    ("--exclude", "exclude_models", "glob on model ids never to offer; repeatable", {"action": "append"}),
    ("--tools", "tools", "tool kinds, comma-separated: chat,embed,complete (default chat,embed)", {}),
    ("--log-level", "log_level", "TRACE, DEBUG, INFO, WARNING or ERROR (default INFO)", {}),
    ("--log-format", "log_format", "json or text (default json)", {"choices": ["json", "text"]}),
    ("--transport", "transport", "stdio or http (default stdio; `serve` means http)", {"choices": ["stdio", "http"]}),
    ("--host", "host", "HTTP bind address (default 127.0.0.1)", {}),
    ("--port", "port", "HTTP port (default 3000)", {"type": int}),
    ("--allowed-host", "allowed_hosts", "extra Host header accepted over HTTP, e.g. bridge:3000; repeatable",
     {"action": "append"}),
    ("--allowed-origin", "allowed_origins", "extra Origin accepted over HTTP; repeatable", {"action": "append"}),
]

_EPILOG = """\
LM Studio's API token is read from LMSTUDIO_API_TOKEN (or LM_API_TOKEN) only, never from a flag, so it
stays out of process listings. LLM_HUB_BRIDGE_TOKEN makes HTTP clients of /mcp send that bearer token.
LLM_HUB_HEARTBEAT_INTERVAL (default 5 s) spaces keep-alive progress while a model loads.
Flags override the environment."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    for flag, field, text, extra in _FLAGS:
        common.add_argument(flag, dest=field, help=f"{text} [env: {env_name(field)}]", default=argparse.SUPPRESS,
                            **extra)

    parser = argparse.ArgumentParser(
        prog="llm-hub",
        description="MCP bridge: every model LM Studio serves becomes an MCP tool. No command: serve over stdio.",
        epilog=_EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llm-hub {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("stdio", parents=[common], help="serve MCP over stdio (the default)", epilog=_EPILOG)
    commands.add_parser("serve", parents=[common], help="serve MCP over streamable HTTP at /mcp", epilog=_EPILOG)
    commands.add_parser("check", parents=[common], help="show what LM Studio serves and the tools it becomes",
                        epilog=_EPILOG)
    up = commands.add_parser(
        "up", parents=[common], epilog=_EPILOG,
        help="a bridge (127.0.0.1:3000) and a gateway (--host/--port, default 127.0.0.1:8080) in one process",
        description="Run a bridge and, in front of it, an authenticated gateway: one command for local networked "
        "use. --host/--port are the gateway's; the gateway's settings (LLM_HUB_API_KEYS ...) come from the "
        "environment, see llm-hub-gateway --help.",
    )
    up.add_argument("--bridge-port", type=int, default=3000, help="the bridge's loopback port (default 3000)")
    return parser


def load_settings(args: argparse.Namespace) -> BridgeSettings:
    overrides = {field: getattr(args, field) for _, field, _, _ in _FLAGS if getattr(args, field, None) is not None}
    if args.command == "serve":
        overrides["transport"] = "http"
    elif args.command == "stdio":
        overrides["transport"] = "stdio"
    return BridgeSettings(**overrides)


def describe_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "settings"
        name = env_name(field) if field in BridgeSettings.model_fields else field
        lines.append(f"invalid setting {name} ({field.replace('_', '-')}): {error['msg']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        sys.stderr.write(f"llm-hub: {describe_error(exc)}\n")
        raise SystemExit(2) from None
    if args.command == "up":
        _up(args)
        return
    setup_logging(settings.log_level, settings.log_format)
    if args.command == "check":
        raise SystemExit(anyio.run(check, settings))
    try:
        anyio.run(serve, settings, backend_options=server_loop_options(settings.transport))
    except KeyboardInterrupt:
        pass


def _up(args: argparse.Namespace) -> None:
    from gateway.cli import up  # the gateway is only needed for this command

    flags = {field: getattr(args, field) for _, field, _, _ in _FLAGS if hasattr(args, field)}
    gateway = {name: flags.pop(name) for name in ("host", "port", "log_level", "log_format") if name in flags}
    for name in ("log_level", "log_format"):
        if name in gateway:
            flags[name] = gateway[name]
    try:
        anyio.run(up, args.bridge_port, gateway, flags, backend_options=server_loop_options("http"))
    except KeyboardInterrupt:
        pass


def server_loop_options(transport: str) -> dict[str, bool]:
    """uvloop for the HTTP services: about a fifth less CPU per request. stdio has no use for it."""
    return {"use_uvloop": transport == "http" and sys.platform != "win32"}


async def serve(settings: BridgeSettings) -> None:
    from mcp_server.server import Bridge  # the SDK import is the slow part of start-up: only when serving

    async with Bridge(settings) as bridge:
        if settings.transport == "stdio":
            logger.info("llm-hub {} serving MCP over stdio; LM Studio at {}", __version__, settings.lmstudio_url)
            await bridge.serve_stdio()
            return
        import uvicorn

        if not settings.is_loopback and settings.bridge_token is None:
            logger.warning(
                "bridge bound to {} without LLM_HUB_BRIDGE_TOKEN: anyone who can reach this port can use your "
                "models. Set a token (the gateway sends it) or bind 127.0.0.1.", settings.host
            )
        config = uvicorn.Config(
            bridge.http_app(), host=settings.host, port=settings.port, log_config=None, access_log=False,
            timeout_graceful_shutdown=5,
        )
        logger.info("llm-hub {} serving MCP at http://{}:{}/mcp", __version__, settings.host, settings.port)
        await uvicorn.Server(config).serve()


async def check(settings: BridgeSettings) -> int:
    from mcp_server.lmstudio import LMStudioClient
    from mcp_server.tools import LIST_MODELS, build_tools, describe

    out = sys.stdout
    token = settings.lmstudio_api_token.get_secret_value() if settings.lmstudio_api_token else None
    async with LMStudioClient(settings.lmstudio_url, token=token, timeout=min(settings.request_timeout, 10)) as client:
        try:
            models = await client.list_models()
        except LMStudioError as exc:
            out.write(f"LM Studio: NOT OK\n{exc}\n")
            return 1
    tools = build_tools(models, settings.tools, settings.include_models, settings.exclude_models)
    out.write(f"LM Studio: OK at {settings.lmstudio_url} ({client.flavour} API)\n")
    out.write(f"Models: {len(models)}\n")
    for model in models:
        out.write(f"  {model.id}: {describe(model)}\n")
    out.write(f"Tools: {len(tools) + 1}\n  {LIST_MODELS}\n")
    for tool in tools.values():
        out.write(f"  {tool.name}  <- {tool.model.id}\n")
    if not tools:
        out.write("  (no model tools: load a model in LM Studio, or check --include/--exclude/--tools)\n")
    return 0
