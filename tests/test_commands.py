"""The commands as a user meets them, each a spawned process: a port in use, a stop by Ctrl-C or SIGTERM,
settings refused at start, each command's --help, and `llm-hub up` in a terminal."""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import anyio.abc
import httpx2
import pytest

from llm_hub.cli import STOP_GRACE
from tests.conftest import (
    CHAT_TOOL,
    bridge_process,
    default_models,
    free_port,
    gateway_command,
    gateway_process,
    llm_hub_command,
    service,
)
from tests.fake_lmstudio import FakeLMStudio, serve

ROOT = Path(__file__).resolve().parents[1]
KEY = "commands-test-key-0123456789"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
GATEWAY_ENV = {"LLM_HUB_API_KEYS": f"tester:{KEY}"}


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env={**CLEAN_ENV, **env}, capture_output=True, text=True, timeout=60, check=False)


def llm_hub(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run([llm_hub_command(), *args], **env)


def gateway(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run([gateway_command(), *args], **env)


@contextmanager
def listening() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- a port in use -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "flag", "variable"),
    [
        (["serve", "--port", "{taken}"], "--port", "LLM_HUB_PORT"),
        (["up", "--port", "{taken}", "--bridge-port", "{free}"], "--port", "LLM_HUB_PORT"),
        (["up", "--port", "{free}", "--bridge-port", "{taken}"], "--bridge-port", "LLM_HUB_BRIDGE_PORT"),
        (["gateway", "--port", "{taken}", "--bridge", "http://127.0.0.1:9"], "--port", "LLM_HUB_PORT"),
    ],
    ids=["serve", "up-gateway-port", "up-bridge-port", "gateway"],
)
def test_a_port_in_use_is_one_line_naming_the_port_and_how_to_change_it(command: list[str], flag: str,
                                                                        variable: str) -> None:
    with listening() as taken:
        args = [a.format(taken=taken, free=free_port()) for a in command]
        if args[0] == "gateway":
            result = gateway(*args[1:], **GATEWAY_ENV)
        else:
            result = llm_hub(*args, **GATEWAY_ENV)
    assert result.returncode == 3, result.stderr
    prog = "llm-hub-gateway" if args[0] == "gateway" else f"llm-hub {args[0]}"
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{prog}: ") and f" {taken} " in line and "in use" in line, line
    assert flag in line and variable in line, line


def test_up_names_both_ports_when_both_are_in_use() -> None:
    with listening() as bridge_port, listening() as gateway_port:
        result = llm_hub("up", "--port", str(gateway_port), "--bridge-port", str(bridge_port), **GATEWAY_ENV)
    assert result.returncode == 3
    bridge_line, gateway_line = result.stderr.splitlines()
    assert f"the bridge's port {bridge_port} " in bridge_line and "--bridge-port" in bridge_line
    assert f"the gateway's port {gateway_port} " in gateway_line and "--port" in gateway_line


def test_up_refuses_one_port_for_both_services() -> None:
    port = str(free_port())
    result = llm_hub("up", "--port", port, **GATEWAY_ENV, LLM_HUB_BRIDGE_PORT=port)
    assert result.returncode == 2
    assert result.stderr == f"llm-hub up: the bridge and the gateway cannot both listen on port {port}: change " \
                            "LLM_HUB_BRIDGE_PORT or --port\n"


# -- clean stops --------------------------------------------------------------------------------------


def problems(log: str) -> list[str]:
    """What a stop must not log: an ERROR, an exception, or anything but a JSON log line (a traceback)."""
    bad = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if record["level"] in ("ERROR", "CRITICAL") or "exception" in record:
            bad.append(line)
    return bad


async def stop(process: anyio.abc.Process, signum: int) -> float:
    """Send `signum`, wait for the exit, and return how long the stop took."""
    started = time.monotonic()
    process.send_signal(signum)
    with anyio.fail_after(15):
        await process.wait()
    return time.monotonic() - started


INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


@asynccontextmanager
async def client_stream(gateway_url: str) -> AsyncIterator[None]:
    """A client's MCP session on the gateway with its GET stream open, as a connected host holds one."""
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(base_url=gateway_url, headers=headers, timeout=30) as http:
        with anyio.fail_after(20):
            while CHAT_TOOL not in {t["name"] for t in (await http.get("/v1/tools")).json()["tools"]}:
                await anyio.sleep(0.2)
        init = await http.post("/mcp", json=INIT)
        assert init.status_code == 200, init.text
        session = {"Mcp-Session-Id": init.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-06-18"}
        ready = await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                                headers=session)
        assert ready.status_code == 202, ready.text
        async with http.stream("GET", "/mcp", headers={**session, "Accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200
            yield


@asynccontextmanager
async def call_in_flight(gateway_url: str) -> AsyncIterator[None]:
    """A tool call through the gateway, streaming its progress: yielded once the first has arrived."""
    streaming, ended = anyio.Event(), anyio.Event()
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"}

    async def call(http: httpx2.AsyncClient) -> None:
        with contextlib.suppress(httpx2.HTTPError):  # the stop may cut it
            async with http.stream("POST", f"/v1/tools/{CHAT_TOOL}", json={"prompt": "hi"}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("event: progress"):
                        streaming.set()
        ended.set()

    async with httpx2.AsyncClient(base_url=gateway_url, headers=headers, timeout=30) as http, \
            anyio.create_task_group() as tg:
        tg.start_soon(call, http)
        with anyio.fail_after(20):
            await streaming.wait()
        yield
        with anyio.move_on_after(10):
            await ended.wait()
        tg.cancel_scope.cancel()


def slow_lmstudio() -> FakeLMStudio:
    """LM Studio answering a word every 0.2 s, so that a call is still streaming when the stop comes."""
    fake = FakeLMStudio(default_models())
    fake.chunk_text, fake.chunk_delay = ["word "] * 100, 0.2
    return fake


SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.mark.anyio
@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
async def test_up_stops_cleanly(tmp_path: Path, signum: int) -> None:
    log = tmp_path / "up.log"
    gateway_port, bridge_port = free_port(), free_port()
    async with serve(slow_lmstudio().app) as lmstudio:
        command = [llm_hub_command(), "up", "--port", str(gateway_port), "--bridge-port", str(bridge_port),
                   "--lmstudio-url", lmstudio, "--health-interval", "0.5"]
        env = {**CLEAN_ENV, **GATEWAY_ENV}
        async with (
            service(command, env, f"http://127.0.0.1:{gateway_port}/health", log, ready=(200,)) as process,
            client_stream(f"http://127.0.0.1:{gateway_port}"),
            call_in_flight(f"http://127.0.0.1:{gateway_port}"),
        ):
            took = await stop(process, signum)
    assert process.returncode == 0
    text = log.read_text()
    assert not problems(text), text
    assert all(json.loads(line) for line in text.splitlines()), "not a terminal: JSON lines"
    assert took < STOP_GRACE + 2, f"the stop took {took:.1f} s"


@pytest.mark.anyio
@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stopped", ["bridge", "gateway"])
async def test_serve_and_the_gateway_stop_cleanly_with_the_other_attached(tmp_path: Path, signum: int,
                                                                           stopped: str) -> None:
    bridge_port, gateway_port = free_port(), free_port()
    async with (
        serve(slow_lmstudio().app) as lmstudio,
        bridge_process(lmstudio, bridge_port, tmp_path / "bridge.log") as bridge,
        gateway_process([f"http://127.0.0.1:{bridge_port}"], gateway_port, tmp_path / "gateway.log",
                        **GATEWAY_ENV) as gateway_,
        client_stream(f"http://127.0.0.1:{gateway_port}"),
        call_in_flight(f"http://127.0.0.1:{gateway_port}"),
    ):
        process = bridge if stopped == "bridge" else gateway_
        took = await stop(process, signum)
    assert process.returncode == 0
    text = (tmp_path / f"{stopped}.log").read_text()
    assert not problems(text), text
    assert took < STOP_GRACE + 2, f"the stop took {took:.1f} s"


# -- settings refused at start -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        # A bad URL is named as the user gave it: the flag, else the variable that was set.
        (["check"], {"LMSTUDIO_URL": "http://localhost:99999"},
         "llm-hub check: invalid LMSTUDIO_URL: 'http://localhost:99999' has no usable port"),
        (["check", "--lmstudio-url", "http://localhost:99999"], {},
         "llm-hub check: invalid --lmstudio-url: 'http://localhost:99999' has no usable port"),
        (["serve"], {"LLM_HUB_LMSTUDIO_URL": "localhost:1234"},
         "llm-hub serve: invalid LLM_HUB_LMSTUDIO_URL: 'localhost:1234' must start with http:// or https://"),
        (["check"], {"LMSTUDIO_URL": "http://localhost:1234/v1"},
         ("llm-hub check: invalid LMSTUDIO_URL: 'http://localhost:1234/v1' ends in /v1, which llm-hub adds itself: "
          "use http://localhost:1234")),
        (["gateway", "--bridge", "http://gpu-1:3000/mcp"], {},
         ("llm-hub-gateway: invalid --bridge: 'http://gpu-1:3000/mcp' ends in /mcp, which the gateway adds itself: "
          "use http://gpu-1:3000")),
        (["gateway", "--bridge", "http://127.0.0.1:9", "--redis-url", "notaurl"], {},
         "llm-hub-gateway: invalid --redis-url: not a Redis URL"),
        (["gateway", "--bridge", "http://127.0.0.1:9"], {"LLM_HUB_REDIS_URL": "redis://:pw@localhost:99999/0"},
         "llm-hub-gateway: invalid LLM_HUB_REDIS_URL: not a Redis URL (Port out of range"),
        (["gateway", "--bridge", "http://127.0.0.1:9"], {"LLM_HUB_API_KEYS": "me:"},
         "llm-hub-gateway: invalid LLM_HUB_API_KEYS: the key named 'me' is empty"),
        (["up"], {"LLM_HUB_API_KEYS": ":the-secret-key"},
         "llm-hub up: invalid LLM_HUB_API_KEYS: an entry has no name before its ':'"),
        (["up"], {"LLM_HUB_API_KEYS": "me:a-secret-key,me:the-secret-key"},
         "llm-hub up: invalid LLM_HUB_API_KEYS: two keys are named 'me'"),
        (["up", "--rate-limit", "0/minute"], GATEWAY_ENV,
         "llm-hub up: invalid --rate-limit: '0/minute' would refuse everything"),
        (["gateway", "--bridge", "http://127.0.0.1:9"], {**GATEWAY_ENV, "LLM_HUB_REQUEST_LIMIT": "0/second"},
         "llm-hub-gateway: invalid LLM_HUB_REQUEST_LIMIT: '0/second' would refuse everything"),
        (["up"], {**GATEWAY_ENV, "LLM_HUB_KEY_LIMITS": "nobody=5/minute"},
         ("llm-hub up: invalid LLM_HUB_KEY_LIMITS: 'nobody=5/minute' limits a key named 'nobody', which "
          "LLM_HUB_API_KEYS does not have (its names: tester)")),
        (["up", "--bridge-port", "70000"], GATEWAY_ENV, "llm-hub up: invalid --bridge-port: "),
        (["up"], {**GATEWAY_ENV, "LLM_HUB_BRIDGE_PORT": "70000"}, "llm-hub up: invalid LLM_HUB_BRIDGE_PORT: "),
        (["serve", "--port", "70000"], {}, "llm-hub serve: invalid --port: Input should be less than or equal to"),
        ([], {"LLM_HUB_POLL_INTERVAL": "soon"},
         ("llm-hub: invalid LLM_HUB_POLL_INTERVAL: Input should be a valid number, unable to parse string as a "
          "number (given: 'soon')")),
    ],
)
def test_bad_settings_are_refused_at_start_named_as_given(command: list[str], env: dict[str, str],
                                                          message: str) -> None:
    if command[:1] == ["gateway"]:
        result = gateway(*command[1:], **env)
    else:
        result = llm_hub(*command, **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert "Value error" not in result.stderr and "secret-key" not in result.stderr


def test_the_key_message_names_the_command_that_was_run() -> None:
    for result, prog in [(llm_hub("up"), "llm-hub up"), (gateway("--bridge", "http://127.0.0.1:9"), "llm-hub-gateway")]:
        assert result.returncode == 2
        assert result.stderr.startswith(f"{prog}: no API keys configured")
        assert f"LLM_HUB_API_KEYS=me:$(openssl rand -hex 16) {prog}\n" in result.stderr


# -- help ------------------------------------------------------------------------------------------------

LMSTUDIO_FLAGS = {
    "--lmstudio-url": ("http://localhost:1234", "LMSTUDIO_URL"),
    "--poll-interval": ("30", "LLM_HUB_POLL_INTERVAL"),
    "--request-timeout": ("300", "LLM_HUB_REQUEST_TIMEOUT"),
    "--include": ("*", "LLM_HUB_INCLUDE_MODELS"),
    "--exclude": ("none", "LLM_HUB_EXCLUDE_MODELS"),
    "--tools": ("chat,embed", "LLM_HUB_TOOLS"),
    "--log-level": ("INFO", "LLM_HUB_LOG_LEVEL"),
    "--log-format": ("json", "LLM_HUB_LOG_FORMAT"),
}
GATEWAY_FLAGS = {
    "--host": ("127.0.0.1", "LLM_HUB_HOST"),
    "--port": ("8080", "LLM_HUB_PORT"),
    "--rate-limit": ("60/minute", "LLM_HUB_RATE_LIMIT"),
    "--redis-url": ("none", "LLM_HUB_REDIS_URL"),
    "--cors-origin": ("none", "LLM_HUB_CORS_ORIGINS"),
    "--health-interval": ("30", "LLM_HUB_HEALTH_INTERVAL"),
    "--log-level": ("INFO", "LLM_HUB_LOG_LEVEL"),
    "--log-format": ("json", "LLM_HUB_LOG_FORMAT"),
}
HELP = {
    "llm-hub": LMSTUDIO_FLAGS,
    "llm-hub stdio": LMSTUDIO_FLAGS,
    "llm-hub check": LMSTUDIO_FLAGS,
    "llm-hub serve": {
        **LMSTUDIO_FLAGS,
        "--host": ("127.0.0.1", "LLM_HUB_HOST"),
        "--port": ("3000", "LLM_HUB_PORT"),
        "--allowed-host": ("none", "LLM_HUB_ALLOWED_HOSTS"),
        "--allowed-origin": ("none", "LLM_HUB_ALLOWED_ORIGINS"),
    },
    "llm-hub up": {**LMSTUDIO_FLAGS, **GATEWAY_FLAGS, "--bridge-port": ("3000", "LLM_HUB_BRIDGE_PORT")},
    "llm-hub-gateway": {**GATEWAY_FLAGS, "--bridge": ("none", "LLM_HUB_BRIDGES")},
}


def flag_help(text: str) -> dict[str, str]:
    """Each flag of a --help page, with its help text on one line."""
    found: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"^  (--[a-z-]+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if start:
            current = start.group(1)
            found[current] = start.group(2) or ""
        elif current and line.startswith(" " * 10) and line.strip():
            found[current] += " " + line.strip()
        else:
            current = None
    return found


@pytest.mark.parametrize("prog", sorted(HELP))
def test_each_command_helps_with_its_own_flags_their_true_defaults_and_variables(prog: str) -> None:
    command = prog.split()
    if command[0] == "llm-hub-gateway":
        result = gateway("--help")
    else:
        result = llm_hub(*command[1:], "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog} ")
    flags = flag_help(result.stdout)
    assert set(flags) - {"--help", "--version"} == set(HELP[prog]), "only this command's flags"
    for flag, (default, variable) in HELP[prog].items():
        assert f"(default: {default}) [env: {variable}]" in flags[flag], (flag, flags[flag])
    assert "--transport" not in result.stdout


def test_help_lists_what_is_read_from_the_environment_only() -> None:
    bridge = llm_hub("serve", "--help").stdout
    assert "LMSTUDIO_API_TOKEN or LM_API_TOKEN" in bridge and "LLM_HUB_BRIDGE_TOKEN" in bridge
    up = llm_hub("up", "--help").stdout
    assert "LLM_HUB_API_KEYS" in up and "LLM_HUB_KEY_LIMITS" in up and "LMSTUDIO_API_TOKEN" in up
    assert "LLM_HUB_BRIDGE_TOKEN" not in up  # `up` makes its own


@pytest.mark.parametrize(
    "args",
    [["up", "--bridge", "3001"], ["serve", "--po", "3001"], ["check", "--lmstudio", "http://x:1"]],
    ids=["up --bridge", "serve --po", "check --lmstudio"],
)
def test_no_flag_is_taken_as_an_abbreviation(args: list[str]) -> None:
    result = llm_hub(*args, **GATEWAY_ENV)
    assert result.returncode == 2
    assert f"llm-hub {args[0]}: error: unrecognized arguments: {args[1]}" in result.stderr
    assert gateway("--brid", "http://127.0.0.1:9", **GATEWAY_ENV).returncode == 2


# -- llm-hub up in a terminal --------------------------------------------------------------------------


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_until(fd: int, done: Callable[[str], bool], seconds: float = 30) -> str:
    """What a terminal shows, colours removed, once `done` says it is enough."""
    text, deadline = "", time.monotonic() + seconds
    while not done(text):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up waiting:\n{text}"
        if select.select([fd], [], [], left)[0]:
            text += ANSI.sub("", os.read(fd, 65536).decode(errors="replace"))
    return text


def test_up_in_a_terminal_logs_text_and_prints_the_dashboard_url() -> None:
    gateway_port = free_port()
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [llm_hub_command(), "up", "--port", str(gateway_port), "--bridge-port", str(free_port()),
         "--lmstudio-url", "http://127.0.0.1:9"],
        env={**CLEAN_ENV, **GATEWAY_ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary,
    )
    os.close(secondary)
    try:
        text = read_until(primary, lambda t: t.count("Application startup complete") == 2)  # both servers
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
        text += read_until(primary, lambda t: "Finished server process" in t)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(primary)
    assert f"dashboard: http://127.0.0.1:{gateway_port}/ " in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} (INFO|WARNING) ", line) for line in lines), text


# -- one module owns the commands ----------------------------------------------------------------------


def test_one_module_owns_every_command_and_imports_the_sdk_only_to_serve() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"llm-hub", "llm-hub-gateway"}
    modules = {target.partition(":")[0] for target in scripts.values()}
    assert len(modules) == 1, scripts
    [owner] = modules
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))
    # The commands sit above both services: nothing in them imports the commands, and the bridge never
    # imports the gateway (data flows one way), so no circle can form.
    package = owner.partition(".")[0]
    assert package not in {"mcp_server", "gateway"}, owner
    forbidden = {"gateway": {package}, "mcp_server": {package, "gateway"}}
    for path in [*ROOT.glob("mcp_server/*.py"), *ROOT.glob("gateway/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                reached = {name.partition(".")[0] for name in names} & forbidden[path.parent.name]
                assert not reached, f"{path.parent.name}/{path.name} imports {reached}"
    # `llm-hub` over stdio starts without the SDK, uvicorn or the gateway's app loaded until it serves.
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {owner}; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in {"mcp", "uvicorn", "starlette"} or m == "gateway.app"]


def test_readme_documents_the_exit_codes() -> None:
    from llm_hub import cli

    readme = (ROOT / "README.md").read_text()
    for code in (0, cli.EXIT_UNREACHABLE, cli.EXIT_USAGE, cli.EXIT_CANNOT_LISTEN):
        assert re.search(rf"^\| `{code}` \|", readme, re.MULTILINE), f"exit code {code} is not in the README"
