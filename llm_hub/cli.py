"""Every command: `llm-hub` (the bridge over stdio, `serve`, `check`, `up`) and `llm-hub-gateway`.

The commands are where the two services meet (`llm-hub up` runs one of each), so this one module owns
them all, outside both packages: it imports the bridge and the gateway, and neither imports it. Beyond the
settings (for --help), the gateway's app is imported only by the commands that run a gateway, and the SDK
and uvicorn only by those that serve, so `llm-hub` over stdio starts quickly.

Exit codes: 0 done (a stop by Ctrl-C or SIGTERM included), 1 LM Studio unreachable (`check`), 2 bad
settings or usage (argparse's own code), 3 a port that cannot be listened on (in use).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import signal
import socket
import sys
import textwrap
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import anyio
from loguru import logger
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.settings import GatewaySettings
from mcp_server import __version__
from mcp_server.errors import LMStudioError
from mcp_server.log import setup_logging
from mcp_server.settings import BridgeSettings

EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
EXIT_CANNOT_LISTEN = 3

# uvloop for the HTTP services: about a fifth less CPU per request (it is not installed on Windows).
HTTP_LOOP = {"use_uvloop": sys.platform != "win32"}
LOOPBACK = "127.0.0.1"

Settings = TypeVar("Settings", bound=BaseSettings)


class UpSettings(BaseSettings):
    """What `llm-hub up` adds to the bridge's and the gateway's settings."""

    model_config = SettingsConfigDict(env_prefix="LLM_HUB_", extra="ignore", env_ignore_empty=True, frozen=True)

    bridge_port: int = Field(3000, ge=0, le=65535, description="The port of the bridge, on 127.0.0.1.")


# -- flags -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A flag for one settings field; its help shows the field's default and environment variable."""

    name: str
    setting: str
    help: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """Flags that feed one settings class, shown under one heading."""

    title: str
    settings: type[BaseSettings]
    flags: tuple[Flag, ...]


_LMSTUDIO = (
    Flag("--lmstudio-url", "lmstudio_url", "LM Studio's base URL, without /v1"),
    Flag("--poll-interval", "poll_interval", "seconds between model-list polls", {"type": float}),
    Flag("--request-timeout", "request_timeout", "seconds one LM Studio request may take, model loading included",
         {"type": float}),
    Flag("--include", "include_models", "glob on model ids to offer as tools; repeatable", {"action": "append"}),
    Flag("--exclude", "exclude_models", "glob on model ids never to offer; repeatable", {"action": "append"}),
    Flag("--tools", "tools", "tool kinds, comma-separated: chat, embed, complete"),
)
_LOGS = (
    Flag("--log-level", "log_level", "TRACE, DEBUG, INFO, WARNING or ERROR"),
    Flag("--log-format", "log_format", "json lines, or text for a terminal", {"choices": ["json", "text"]}),
)
_BRIDGE_HTTP = (
    Flag("--host", "host", "bind address (beyond loopback, set LLM_HUB_BRIDGE_TOKEN)"),
    Flag("--port", "port", "port", {"type": int}),
    Flag("--allowed-host", "allowed_hosts", "extra Host header accepted, e.g. bridge:3000; repeatable",
         {"action": "append"}),
    Flag("--allowed-origin", "allowed_origins", "extra Origin accepted; repeatable", {"action": "append"}),
)
_GATEWAY_LIMITS = (
    Flag("--rate-limit", "rate_limit", "tool calls per key, e.g. 60/minute"),
    Flag("--redis-url", "redis_url", "Redis for a rate-limit budget shared by several gateways"),
    Flag("--cors-origin", "cors_origins", "origin allowed by CORS; repeatable", {"action": "append"}),
    Flag("--health-interval", "health_interval", "seconds between bridge health checks", {"type": float}),
)
_GATEWAY = (
    Flag("--bridge", "bridges", "bridge base URL, e.g. http://127.0.0.1:3000; repeatable", {"action": "append"}),
    Flag("--host", "host", "bind address (0.0.0.0 to serve the network)"),
    Flag("--port", "port", "port", {"type": int}),
    *_GATEWAY_LIMITS,
)
_UP_GATEWAY = (
    Flag("--host", "host", "the gateway's bind address (0.0.0.0 to let other machines in)"),
    Flag("--port", "port", "the gateway's port", {"type": int}),
    *_GATEWAY_LIMITS,
)

STDIO = (Group("LM Studio", BridgeSettings, _LMSTUDIO), Group("logs", BridgeSettings, _LOGS))
SERVE = (*STDIO, Group("HTTP", BridgeSettings, _BRIDGE_HTTP))
GATEWAY = (Group("gateway", GatewaySettings, _GATEWAY), Group("logs", GatewaySettings, _LOGS))
UP = (
    Group("LM Studio (the bridge's)", BridgeSettings, _LMSTUDIO),
    Group("the bridge", UpSettings, (Flag("--bridge-port", "bridge_port", "the bridge's port on 127.0.0.1",
                                          {"type": int}),)),
    Group("the gateway", GatewaySettings, _UP_GATEWAY),
    Group("logs (both)", GatewaySettings, _LOGS),
)

# Settings each command sets itself, or that mean nothing to it: left out of its --help.
_HTTP_ONLY = {"transport", "host", "port", "allowed_hosts", "allowed_origins", "bridge_token"}
_NOT_SHOWN: dict[str, dict[type[BaseSettings], Collection[str]]] = {
    "stdio": {BridgeSettings: _HTTP_ONLY},
    "check": {BridgeSettings: _HTTP_ONLY},
    "serve": {BridgeSettings: {"transport"}},
    "up": {BridgeSettings: {*_HTTP_ONLY, "log_level", "log_format"}, GatewaySettings: {"bridges", "bridge_token"}},
    "gateway": {GatewaySettings: ()},
}


def variables(settings: type[BaseSettings], name: str) -> list[str]:
    """The environment variables a setting is read from, the documented one first."""
    alias = settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(choice) for choice in alias.choices if str(choice).isupper()]
        return sorted(names, key=lambda n: n.startswith("LLM_HUB_"))  # LM Studio's own names come first
    return [f"LLM_HUB_{name.upper()}"]


def _default(settings: type[BaseSettings], name: str) -> str:
    value = settings.model_fields[name].get_default(call_default_factory=True)
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _add_groups(parser: argparse.ArgumentParser, groups: Sequence[Group]) -> None:
    for group in groups:
        section = parser.add_argument_group(group.title)
        for flag in group.flags:
            text = f"{flag.help} (default: {_default(group.settings, flag.setting)}) " \
                   f"[env: {variables(group.settings, flag.setting)[0]}]"
            metavar = None if "choices" in flag.options else flag.name[2:].upper().replace("-", "_")
            section.add_argument(flag.name, dest=flag.setting, metavar=metavar, help=text, default=argparse.SUPPRESS,
                                 **flag.options)


def _environment_help(command: str, groups: Sequence[Group], intro: str) -> str:
    """The settings this command reads from the environment only, with their defaults and meaning."""
    lines = [intro, "", "Also read from the environment (flags override it):"]
    for settings, hidden in _NOT_SHOWN[command].items():
        flagged = {flag.setting for group in groups if group.settings is settings for flag in group.flags}
        for name, info in settings.model_fields.items():
            if name in flagged or name in hidden:
                continue
            lines.append(f"  {' or '.join(variables(settings, name))} (default: {_default(settings, name)})")
            if info.description:
                lines.append(textwrap.fill(info.description, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _parser(prog: str, description: str, groups: Sequence[Group], command: str, intro: str,
            add_to: Any = None) -> argparse.ArgumentParser:
    """A command's parser: its own flags, and its epilog on what it reads from the environment only."""
    options: dict[str, Any] = {
        "description": description,
        "epilog": _environment_help(command, groups, intro),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "allow_abbrev": False,  # --bridge must not be taken for --bridge-port, nor a typo for a flag
    }
    parser = add_to.add_parser(prog, help=description, **options) if add_to else argparse.ArgumentParser(
        prog=prog, **options)
    _add_groups(parser, groups)
    return parser


_TOKENS = "Tokens are read from the environment only, never from a flag, so they stay out of process listings."
_KEYS = """\
API keys are read from LLM_HUB_API_KEYS only (comma-separated NAME:KEY), never from a flag, so they stay
out of process listings. Without keys the gateway refuses to start; LLM_HUB_AUTH_DISABLED=true runs it
open, for development."""


def llm_hub_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `llm-hub` parser, and its commands' parsers by name."""
    parser = _parser("llm-hub", "MCP bridge: every model LM Studio serves becomes an MCP tool. With no command "
                     "it serves MCP over stdio, as desktop hosts launch it.", STDIO, "stdio", _TOKENS)
    parser.add_argument("--version", action="version", version=f"llm-hub {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands = {
        "stdio": _parser("stdio", "serve MCP over stdio (the default)", STDIO, "stdio", _TOKENS, sub),
        "serve": _parser("serve", "serve MCP over streamable HTTP at /mcp, and GET /health", SERVE, "serve", _TOKENS,
                         sub),
        "check": _parser("check", "show what LM Studio serves and the tools it becomes; exit 1 if it cannot be "
                         "reached", STDIO, "check", _TOKENS, sub),
        "up": _parser("up", "a bridge on 127.0.0.1 and, in front of it, an authenticated gateway, in one process",
                      UP, "up", _KEYS, sub),
    }
    return parser, commands


def gateway_parser() -> argparse.ArgumentParser:
    parser = _parser("llm-hub-gateway", "One authenticated, rate-limited MCP and HTTP endpoint in front of many "
                     "llm-hub bridges.", GATEWAY, "gateway", _KEYS)
    parser.add_argument("--version", action="version", version=f"llm-hub-gateway {__version__}")
    return parser


# -- settings ----------------------------------------------------------------------------------------


def _fail(prog: str, lines: Sequence[str], code: int) -> NoReturn:
    sys.stderr.write("".join(f"{prog}: {line}\n" for line in lines))
    raise SystemExit(code)


@dataclass(frozen=True)
class Given:
    """What the user typed for one command, and so how each setting is named back to them."""

    prog: str
    args: argparse.Namespace
    groups: Sequence[Group]

    def values(self, settings: type[BaseSettings]) -> dict[str, Any]:
        """The flags typed for `settings`' fields."""
        return {flag.setting: getattr(self.args, flag.setting) for group in self.groups if group.settings is settings
                for flag in group.flags if hasattr(self.args, flag.setting)}

    def name(self, settings: type[BaseSettings], setting: str) -> str:
        """The flag if one was typed, else the variable that was set (or the documented one)."""
        for group in self.groups:
            for flag in group.flags:
                if group.settings is settings and flag.setting == setting and hasattr(self.args, setting):
                    return flag.name
        names = variables(settings, setting)
        environment = {key.upper() for key in os.environ}  # pydantic-settings reads them case-insensitively
        return next((n for n in names if n in environment), names[0])

    def load(self, settings: type[Settings], **fixed: Any) -> Settings:
        """`settings` from the environment, the flags and `fixed`, or exit 2 naming every bad setting."""
        try:
            return settings(**{**self.values(settings), **fixed})
        except ValidationError as exc:
            _fail(self.prog, [f"invalid {self.name(settings, str(e['loc'][0]))}: {_reason(e)}" for e in exc.errors()],
                  EXIT_USAGE)

    def fail(self, *lines: str, code: int = EXIT_USAGE) -> NoReturn:
        _fail(self.prog, lines, code)


def _reason(error: Any) -> str:
    if error["type"] == "value_error":  # ours, which say what was wrong and what to give instead
        return str(error["ctx"]["error"])
    return f"{error['msg']} (given: {error['input']!r})"


def _gateway_settings(given: Given, **fixed: Any) -> GatewaySettings:
    settings = given.load(GatewaySettings, **fixed)
    if not settings.api_keys and not settings.auth_disabled:
        given.fail(
            "no API keys configured, refusing to start.\n"
            "  Set LLM_HUB_API_KEYS to comma-separated NAME:KEY pairs, e.g.\n"
            f"    LLM_HUB_API_KEYS=me:$(openssl rand -hex 16) {given.prog}\n"
            "  or, for development only, LLM_HUB_AUTH_DISABLED=true."
        )
    if not settings.bridges:
        given.fail("no bridges: pass --bridge http://HOST:3000 or set LLM_HUB_BRIDGES.")
    return settings


# -- listening -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where a service is to listen, and the flags that change it (for the message when it cannot)."""

    what: str
    host: str
    port: int
    port_flag: str
    host_flag: str | None = None

    def problem(self, exc: OSError) -> str:
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)):
            return f"{self.what} {self.port} on {self.host} is in use (by another llm-hub?): choose another " \
                   f"with {self.port_flag}"
        change = f"{self.host_flag} or {self.port_flag}" if self.host_flag else self.port_flag
        return f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc}): change {change}"


def _bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on accepted sockets whose listener says
    # TCP, and without it a kept-alive response can wait ~40 ms on Nagle and delayed ACKs.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name == "posix":
            # A restart can take the port while the last run's connections linger in TIME_WAIT. (On Windows
            # the option would let a second server share a port in use.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _listen(given: Given, addresses: Sequence[Address]) -> list[socket.socket]:
    """A bound socket per address, before anything starts; or exit 3 with a line for each that is taken."""
    sockets, problems = [], []
    for address in addresses:
        try:
            sockets.append(_bind(address.host, address.port))
        except OSError as exc:
            problems.append(address.problem(exc))
    if problems:
        for sock in sockets:
            sock.close()
        given.fail(*problems, code=EXIT_CANNOT_LISTEN)
    return sockets


def _url(sock: socket.socket) -> str:
    """The URL to reach a listening socket from this machine."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": LOOPBACK, "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- serving -------------------------------------------------------------------------------------------


STOP_GRACE = 5.0  # seconds a stop gives the requests in flight before it cuts them


async def serve_apps(apps: Sequence[tuple[Any, socket.socket]]) -> None:
    """Serve each ASGI app on its socket until SIGINT or SIGTERM. Each starts once the one before it
    listens, and they stop the other way round: in `up` the gateway first, while its bridge still answers.
    A second signal cuts the requests still running at once, instead of after STOP_GRACE."""
    import uvicorn  # only when serving over HTTP

    class Server(uvicorn.Server):
        def __init__(self, app: InFlight) -> None:
            # uvicorn's own cut, which logs an ERROR per request, only comes if ours did not end them.
            super().__init__(uvicorn.Config(app, log_config=None, access_log=False,
                                            timeout_graceful_shutdown=STOP_GRACE + 5))
            self.in_flight = app

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the signals are taken once for all the servers: see on_signal

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.cut_when_due)
                await super().shutdown(sockets)
                tg.cancel_scope.cancel()

        async def cut_when_due(self) -> None:
            with anyio.move_on_after(STOP_GRACE):
                while not self.in_flight.hurried:
                    await anyio.sleep(0.1)
            if cut := self.in_flight.cut():
                logger.warning("stopping: cut {} request(s) still running (their callers see them fail)", cut)

    servers = [Server(InFlight(app)) for app, _ in apps]

    def on_signal(signum: int, frame: Any) -> None:
        # A signal handler only sets flags: the servers poll them.
        for server in servers:
            server.in_flight.hurried = server.in_flight.stopping
            server.in_flight.stopping = True
        servers[-1].handle_exit(signum, frame)  # uvicorn's own, which sse-starlette hooks to end its streams

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        await _serve_in_order([(server, sock) for server, (_, sock) in zip(servers, apps, strict=True)])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _serve_in_order(servers: Sequence[tuple[Any, socket.socket]]) -> None:
    (server, sock), rest = servers[0], servers[1:]
    if not rest:
        await server.serve([sock])
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:  # so that the next one (the gateway's first health check) finds it listening
            await anyio.sleep(0.02)
        await _serve_in_order(rest)
        server.should_exit = True


class InFlight:
    """An ASGI app's requests in flight, so that a stop ends each of them cleanly.

    uvicorn cancels the requests a stop leaves running with an ERROR for each, and sse-starlette ends
    every open event stream at once by cancelling it, which leaves its response unfinished (an ERROR
    again). Here the server cuts what is left after STOP_GRACE itself, and a response that a stop cut
    short is finished: a stream ends as normal, a request not yet answered gets 503."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stopping = False
        self.hurried = False  # asked to stop a second time
        self._running: set[anyio.CancelScope] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def send_and_watch(message: Any) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body":
                finished = not message.get("more_body", False)
            await send(message)

        with anyio.CancelScope() as request:
            self._running.add(request)
            try:
                await self.app(scope, receive, send_and_watch)
            finally:
                self._running.discard(request)
        if finished or not self.stopping:
            return
        if not started:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b"the server is stopping\n"})
        else:
            await send({"type": "http.response.body", "body": b""})

    def cut(self) -> int:
        """Ends every request still running, and says how many there were."""
        for request in self._running:
            request.cancel()
        return len(self._running)


async def _stdio(settings: BridgeSettings) -> None:
    from mcp_server.server import Bridge  # the SDK import is the slow part of start-up: only when serving

    async with Bridge(settings) as bridge:
        logger.info("llm-hub {} serving MCP over stdio; LM Studio at {}", __version__, settings.lmstudio_url)
        await bridge.serve_stdio()


async def _bridge(settings: BridgeSettings, sock: socket.socket) -> None:
    from mcp_server.server import Bridge

    async with Bridge(settings) as bridge:
        await serve_apps([(bridge.http_app(), sock)])


async def _gateway(settings: GatewaySettings, sock: socket.socket) -> None:
    from gateway.app import Gateway

    await serve_apps([(Gateway(settings).app(), sock)])


async def _up(bridge_settings: BridgeSettings, settings: GatewaySettings, bridge_sock: socket.socket,
              gateway_sock: socket.socket) -> None:
    from gateway.app import Gateway
    from mcp_server.server import Bridge

    async with Bridge(bridge_settings) as bridge:
        await serve_apps([(bridge.http_app(), bridge_sock), (Gateway(settings).app(), gateway_sock)])


# -- commands ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """`llm-hub`: the bridge over stdio (no command), `serve`, `check` or `up`."""
    parser, commands = llm_hub_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, so the message and usage are the command's
        commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "up":
            up(Given("llm-hub up", args, UP))
        elif args.command == "check":
            settings = Given("llm-hub check", args, STDIO).load(BridgeSettings)
            setup_logging(settings.log_level, settings.log_format)
            raise SystemExit(anyio.run(check, settings))
        elif args.command == "serve":
            serve(Given("llm-hub serve", args, SERVE), transport="http")
        else:
            transport = {"transport": "stdio"} if args.command == "stdio" else {}
            serve(Given(f"llm-hub {args.command}" if args.command else "llm-hub", args, STDIO), **transport)
    except KeyboardInterrupt:  # Ctrl-C over stdio, or before a server took the signal: a normal stop
        pass


def gateway_main(argv: Sequence[str] | None = None) -> None:
    """`llm-hub-gateway`."""
    given = Given("llm-hub-gateway", gateway_parser().parse_args(argv), GATEWAY)
    settings = _gateway_settings(given)
    [sock] = _listen(given, [Address("port", settings.host, settings.port, "--port (or LLM_HUB_PORT)",
                                     "--host (or LLM_HUB_HOST)")])
    setup_logging(settings.log_level, settings.log_format)
    raise_open_file_limit()
    _announce_gateway(settings, sock, "{} {} on {} in front of {} bridge(s)", given.prog, __version__, _url(sock),
                      len(settings.bridges))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the server took the signal: a normal stop
        anyio.run(_gateway, settings, sock, backend_options=HTTP_LOOP)


def serve(given: Given, **fixed: Any) -> None:
    """The bridge over stdio, or over HTTP (`serve`, or LLM_HUB_TRANSPORT=http with no command)."""
    settings = given.load(BridgeSettings, **fixed)
    if settings.transport == "stdio":
        setup_logging(settings.log_level, settings.log_format)
        raise_open_file_limit()
        anyio.run(_stdio, settings)
        return
    [sock] = _listen(given, [Address("port", settings.host, settings.port, "--port (or LLM_HUB_PORT)",
                                     "--host (or LLM_HUB_HOST)")])
    setup_logging(settings.log_level, settings.log_format)
    raise_open_file_limit()
    if not settings.is_loopback and settings.bridge_token is None:
        logger.warning(
            "bridge bound to {} without LLM_HUB_BRIDGE_TOKEN: anyone who can reach this port can use your "
            "models. Set a token (the gateway sends it) or bind 127.0.0.1.", settings.host
        )
    logger.info("llm-hub {} serving MCP at {}/mcp; LM Studio at {}", __version__, _url(sock), settings.lmstudio_url)
    anyio.run(_bridge, settings, sock, backend_options=HTTP_LOOP)


def up(given: Given) -> None:
    """A bridge on loopback and a gateway in front of it, in one process, for local networked use."""
    where = given.load(UpSettings)
    # The bridge only talks to this gateway: a fresh token keeps other local users off its port.
    token = secrets.token_urlsafe(24)
    bridge = given.load(BridgeSettings, transport="http", host=LOOPBACK, port=where.bridge_port, bridge_token=token)
    settings = _gateway_settings(given, bridges=[f"http://{LOOPBACK}:{where.bridge_port}"], bridge_token=token)
    if where.bridge_port == settings.port != 0:
        given.fail(f"the bridge and the gateway cannot both listen on port {settings.port}: change "
                   f"{given.name(UpSettings, 'bridge_port')} or {given.name(GatewaySettings, 'port')}")
    bridge_sock, gateway_sock = _listen(given, [
        Address("the bridge's port", LOOPBACK, where.bridge_port, "--bridge-port (or LLM_HUB_BRIDGE_PORT)"),
        Address("the gateway's port", settings.host, settings.port, "--port (or LLM_HUB_PORT)",
                "--host (or LLM_HUB_HOST)"),
    ])
    bridge_port = bridge_sock.getsockname()[1]
    if bridge_port != where.bridge_port:  # port 0: the system chose one
        bridge = bridge.model_copy(update={"port": bridge_port})
        settings = settings.model_copy(update={"bridges": [f"http://{LOOPBACK}:{bridge_port}"]})
    # A person at a terminal reads text; JSON lines are for log collectors, and still the default elsewhere.
    text = "log_format" not in settings.model_fields_set and sys.stderr.isatty()
    setup_logging(settings.log_level, "text" if text else settings.log_format)
    raise_open_file_limit()
    _announce_gateway(settings, gateway_sock, "{} {}: the bridge on {} (LM Studio at {}), the gateway on {}",
                      given.prog, __version__, _url(bridge_sock), bridge.lmstudio_url, _url(gateway_sock))
    anyio.run(_up, bridge, settings, bridge_sock, gateway_sock, backend_options=HTTP_LOOP)


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit. Every stream holds a descriptor or two
    (the gateway: its caller's connection and one to a bridge), and the common soft default of 1,024 would hold a
    few hundred, however high the hard limit an operator set."""
    if sys.platform == "win32":
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a value the soft one may take everywhere (macOS caps it): then a large one.
    wanted = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        logger.debug("open-file limit: {} (the hard limit)", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logger.debug("open-file limit kept at {} (raising it to {} failed: {})", soft, wanted, exc)
        return
    logger.info("open-file limit raised from {} to {} (the hard limit)", soft, wanted)


def _announce_gateway(settings: GatewaySettings, sock: socket.socket, started: str, *args: Any) -> None:
    if settings.auth_disabled:
        logger.warning("authentication is DISABLED (LLM_HUB_AUTH_DISABLED): anyone who reaches {} can use it",
                       _url(sock))
    logger.info(started + "; {} key(s); rate limit {} per key{}", *args, len(settings.api_keys), settings.rate_limit,
                " (Redis)" if settings.redis_url else "")
    logger.info("dashboard: {}/ (sign in with a key of LLM_HUB_API_KEYS); MCP clients: {}/mcp", _url(sock), _url(sock))


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
            return EXIT_UNREACHABLE
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
