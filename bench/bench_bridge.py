"""Benchmark of the llm-hub bridge, always against baselines measured in the same run.

Measures, with the fake LM Studio (tests/fake_lmstudio.py) in processes of its own:
  1. per-call latency of a chat tool call over stdio and HTTP vs a direct HTTP call to the fake;
  2. the SDK floor: a no-op tool on a bare low-level `mcp.server.Server`, over stdio and HTTP;
  3. streaming pass-through: text pieces/s delivered as progress vs reading the fake's SSE directly;
  4. cold start: spawn to initialize result vs `python -c "import mcp.server"`;
  5. resident memory of the bridge processes after use.

Usage: .venv/bin/python bench/bench_bridge.py [--calls 300] [--runs 5] [--stream-runs 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

ROOT = Path(__file__).resolve().parents[1]
LLM_HUB = str(Path(sys.executable).with_name("llm-hub"))
MODEL = "google/gemma-3-270m"
CHAT_TOOL = "chat_google_gemma-3-270m"
PROMPT = "Say hello."
SHORT_CHUNKS = 5
STREAM_CHUNKS = 3000
PIECE = "tok"  # the fake's --chunks pieces are "tok{i} "

TARGET_ADDED_MS = 1.0
TARGET_STREAM_RATIO = 0.9
TARGET_COLD_RATIO = 1.3
TARGET_RSS_MB = 100.0

# tests/fake_lmstudio.py binds its listening socket with proto 0, so asyncio does not set TCP_NODELAY on
# the connections it accepts, and every request on a kept-alive connection stalls ~40 ms on Nagle plus
# delayed ACK. That would swamp the direct baseline, so run the same CLI with a proper TCP socket.
FAKE_LAUNCHER = """\
import socket
import sys

sys.path.insert(0, {root!r})
from tests import fake_lmstudio


def bind_tcp(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


fake_lmstudio._bind = bind_tcp
fake_lmstudio.main()
"""

# A bare SDK server with one no-op tool: what any tool call costs before the bridge does anything.
FLOOR_SERVER = '''\
import sys

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.stdio import stdio_server

TOOL = types.Tool(name="noop", input_schema={"type": "object"})


async def list_tools(_ctx, _params):
    return types.ListToolsResult(tools=[TOOL])


async def call_tool(_ctx, _params):
    return types.CallToolResult(content=[types.TextContent(type="text", text="ok")])


server = Server("floor", on_list_tools=list_tools, on_call_tool=call_tool)


async def main() -> None:
    if len(sys.argv) > 1:
        import uvicorn

        app = server.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
        config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
        await uvicorn.Server(config).serve()
    else:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


anyio.run(main)
'''


# -- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: list[float]) -> float:
    return percentile(values, 50)


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = [s * 1000 for s in seconds]
        return cls(round(percentile(ms, 50), 3), round(percentile(ms, 99), 3), round(sum(ms) / len(ms), 3), len(ms))


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
    return env | extra


def child_pids() -> set[int]:
    """Direct children of this process, from /proc (psutil is not a dependency)."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name sits in parentheses and may contain spaces: fields resume after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me:
            found.add(int(entry.name))
    return found


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def spawned(cmd: list[str], *, env: dict[str, str], log: TextIO,
                  capture_stdout: bool = False) -> AsyncIterator[anyio.abc.Process]:
    process = await anyio.open_process(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=log,
    )
    try:
        yield process
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
            await process.aclose()


async def wait_http(url: str, *, ok: Callable[[httpx2.Response], bool], timeout: float = 30) -> None:
    async with httpx2.AsyncClient(timeout=2) as http:
        with anyio.fail_after(timeout):
            while True:
                try:
                    if ok(await http.get(url)):
                        return
                except httpx2.TransportError:
                    pass
                await anyio.sleep(0.05)


@asynccontextmanager
async def fake_lmstudio(launcher: Path, chunks: int, log: TextIO) -> AsyncIterator[str]:
    cmd = [sys.executable, str(launcher), "--port", "0", "--models", MODEL, "--chunks", str(chunks)]
    async with spawned(cmd, env=clean_env(), log=log, capture_stdout=True) as process:
        assert process.stdout is not None
        first = b""
        with anyio.fail_after(30):
            while b"\n" not in first:
                first += await process.stdout.receive()
        match = re.search(rb"http://[\w.:\[\]]+", first)
        if match is None:
            raise RuntimeError(f"fake LM Studio printed no URL: {first!r}")
        url = match.group().decode()
        await wait_http(f"{url}/v1/models", ok=lambda r: r.status_code == 200)
        yield url


@asynccontextmanager
async def http_server(cmd: list[str], port: int, *, ready_path: str, env: dict[str, str], log: TextIO,
                      ready: Callable[[httpx2.Response], bool] = lambda r: r.status_code == 200,
                      ) -> AsyncIterator[tuple[str, int]]:
    """A server subprocess listening on `port`; yields (base URL, pid) once `ready_path` answers as `ready` wants."""
    async with spawned(cmd, env=env, log=log) as process:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + ready_path, ok=ready)
        yield base, process.pid


@asynccontextmanager
async def stdio_session(params: StdioServerParameters, log: TextIO) -> AsyncIterator[tuple[Client, int]]:
    """An SDK client on a spawned stdio server, with the server's pid found among our children."""
    before = child_pids()
    async with Client(stdio_client(params, errlog=log), mode="legacy") as client:
        new = child_pids() - before
        if len(new) != 1:
            raise RuntimeError(f"expected one new child process for {params.command}, found {sorted(new)}")
        yield client, new.pop()


async def wait_for_tool(client: Client, name: str, timeout: float = 30) -> None:
    """The bridge discovers models in the background after the handshake."""
    with anyio.fail_after(timeout):
        while name not in {t.name for t in (await client.list_tools()).tools}:
            await anyio.sleep(0.05)


# -- measurements --------------------------------------------------------------------------

TimedCall = Callable[[], Awaitable[None]]


def chat_body() -> dict[str, Any]:
    # What the bridge sends for {"prompt": PROMPT}, so both paths ask the fake for the same thing.
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


def bridge_call(client: Client) -> TimedCall:
    expected = "".join(f"{PIECE}{i} " for i in range(SHORT_CHUNKS))

    async def call() -> None:
        result = await client.call_tool(CHAT_TOOL, {"prompt": PROMPT})
        if result.is_error or text_of(result) != expected:
            raise RuntimeError(f"unexpected bridge answer: {text_of(result)!r}")

    return call


def floor_call(client: Client) -> TimedCall:
    async def call() -> None:
        result = await client.call_tool("noop", {})
        if result.is_error:
            raise RuntimeError(f"floor tool failed: {text_of(result)!r}")

    return call


def direct_call(http: httpx2.AsyncClient, url: str) -> TimedCall:
    async def call() -> None:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=chat_body()) as response:
            response.raise_for_status()
            await response.aread()

    return call


def direct_call_new_connection(http: httpx2.AsyncClient, url: str) -> TimedCall:
    """Like the bridge: stop at `[DONE]`, so the unfinished response takes its connection with it."""

    async def call() -> None:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=chat_body()) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    break

    return call


async def interleaved_latency(calls: dict[str, TimedCall], count: int, warmup: int) -> dict[str, Latency]:
    """Rounds of one call per target, rotating the order, so drift on a noisy machine hits all alike."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + count):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            await calls[name]()
            elapsed = time.perf_counter() - started
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: Latency.of(values) for name, values in samples.items()}


@dataclass
class StreamRun:
    pieces: int
    seconds: float  # request start to the last text piece received
    messages: int  # progress notifications (or SSE content chunks) that carried text

    @property
    def rate(self) -> float:
        return self.pieces / self.seconds


async def direct_stream(http: httpx2.AsyncClient, url: str) -> StreamRun:
    pieces = messages = 0
    started = last = time.perf_counter()
    async with http.stream("POST", f"{url}/v1/chat/completions", json=chat_body()) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    pieces += content.count(PIECE)
                    messages += 1
                    last = time.perf_counter()
    return StreamRun(pieces, last - started, messages)


async def bridge_stream(client: Client) -> StreamRun:
    pieces = messages = 0
    started = last = time.perf_counter()

    async def on_progress(_progress: float, _total: float | None, message: str | None) -> None:
        nonlocal pieces, messages, last
        count = message.count(PIECE) if message else 0
        if count:
            pieces += count
            messages += 1
            last = time.perf_counter()

    result = await client.call_tool(CHAT_TOOL, {"prompt": PROMPT}, progress_callback=on_progress)
    if result.is_error or text_of(result).count(PIECE) != STREAM_CHUNKS:
        raise RuntimeError(f"unexpected streamed answer ({len(text_of(result))} chars, error={result.is_error})")
    return StreamRun(pieces, last - started, messages)


async def churn_sessions(url: str, count: int) -> None:
    for _ in range(count):
        async with Client(url, mode="legacy"):
            pass


async def cold_start_bridge(env: dict[str, str], log: TextIO) -> float:
    started = time.perf_counter()
    async with Client(stdio_client(StdioServerParameters(command=LLM_HUB, env=env), errlog=log), mode="legacy"):
        return time.perf_counter() - started


async def cold_start_import() -> float:
    started = time.perf_counter()
    await anyio.run_process([sys.executable, "-c", "import mcp.server"], check=True)
    return time.perf_counter() - started


# -- the run -------------------------------------------------------------------------------


def note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"  ... {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet: bool = args.json
    floor_script = workdir / "floor_server.py"
    floor_script.write_text(FLOOR_SERVER)
    fake_launcher = workdir / "fake_lmstudio_tcp.py"
    fake_launcher.write_text(FAKE_LAUNCHER.format(root=str(ROOT)))
    result: dict[str, Any] = {
        "config": {"calls": args.calls, "warmup": args.warmup, "runs": args.runs, "stream_runs": args.stream_runs,
                   "sessions": args.sessions, "short_chunks": SHORT_CHUNKS, "stream_chunks": STREAM_CHUNKS},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "python": sys.version.split()[0]},
    }

    async with AsyncExitStack() as stack:
        def log(name: str) -> TextIO:
            return stack.enter_context(open(workdir / f"{name}.log", "w"))  # noqa: SIM115 - closed by the stack

        note("starting fake LM Studio, bridges and SDK floor servers", quiet)
        short_url = await stack.enter_async_context(fake_lmstudio(fake_launcher, SHORT_CHUNKS, log("fake-short")))
        long_url = await stack.enter_async_context(fake_lmstudio(fake_launcher, STREAM_CHUNKS, log("fake-long")))
        http = await stack.enter_async_context(httpx2.AsyncClient(timeout=60))
        # Its own pool, or it would take and discard the connection `http` keeps alive.
        http_no_reuse = await stack.enter_async_context(httpx2.AsyncClient(timeout=60))

        bridges: dict[str, tuple[Client, int]] = {}
        bridge_urls: dict[str, str] = {}
        for label, url in (("short", short_url), ("long", long_url)):
            params = StdioServerParameters(command=LLM_HUB, env={"LMSTUDIO_URL": url})
            bridges[f"stdio-{label}"] = await stack.enter_async_context(stdio_session(params, log(f"bridge-stdio-{label}")))
            port = free_port()
            base, pid = await stack.enter_async_context(http_server(
                [LLM_HUB, "serve", "--port", str(port)], port, ready_path="/health",
                env=clean_env(LMSTUDIO_URL=url), log=log(f"bridge-http-{label}"),
            ))
            client = await stack.enter_async_context(Client(f"{base}/mcp", mode="legacy"))
            bridges[f"http-{label}"] = (client, pid)
            bridge_urls[f"http-{label}"] = base
        for client, _ in bridges.values():
            await wait_for_tool(client, CHAT_TOOL)

        floor_stdio = await stack.enter_async_context(
            stdio_session(StdioServerParameters(command=sys.executable, args=[str(floor_script)]), log("floor-stdio"))
        )
        port = free_port()
        # GET /mcp without a session is refused, but any answer means the server is up.
        floor_base, floor_http_pid = await stack.enter_async_context(http_server(
            [sys.executable, str(floor_script), str(port)], port, ready_path="/mcp", env=clean_env(),
            log=log("floor-http"), ready=lambda r: r.status_code < 500,
        ))
        floor_http_client = await stack.enter_async_context(Client(f"{floor_base}/mcp", mode="legacy"))
        for client in (floor_stdio[0], floor_http_client):
            await wait_for_tool(client, "noop")

        # 1 + 2. latency
        note(f"latency: {args.warmup} warm-up + {args.calls} interleaved rounds", quiet)
        servers = {
            "bridge_stdio": bridges["stdio-short"][1],
            "bridge_http": bridges["http-short"][1],
            "floor_stdio": floor_stdio[1],
            "floor_http": floor_http_pid,
        }
        cpu_before = {name: cpu_seconds(pid) for name, pid in servers.items()}
        latency = await interleaved_latency(
            {
                "direct": direct_call(http, short_url),
                "direct_new_connection": direct_call_new_connection(http_no_reuse, short_url),
                "floor_stdio": floor_call(floor_stdio[0]),
                "floor_http": floor_call(floor_http_client),
                "bridge_stdio": bridge_call(bridges["stdio-short"][0]),
                "bridge_http": bridge_call(bridges["http-short"][0]),
            },
            args.calls, args.warmup,
        )
        rounds = args.warmup + args.calls
        result["latency_ms"] = {name: vars(value) for name, value in latency.items()}
        # Each server only serves its own calls here, so its CPU time divides cleanly (clock ticks: ~10 ms grain).
        result["server_cpu_ms_per_call"] = {
            name: round((cpu_seconds(pid) - cpu_before[name]) / rounds * 1000, 3) for name, pid in servers.items()
        }
        result["added_latency"] = {
            transport: added_latency(latency, transport) for transport in ("stdio", "http")
        }

        # 3. streaming
        note(f"streaming: {STREAM_CHUNKS} chunks, 1 warm-up + {args.stream_runs} runs per path", quiet)
        stream_paths: dict[str, Callable[[], Awaitable[StreamRun]]] = {
            "direct": lambda: direct_stream(http, long_url),
            "bridge_stdio": lambda: bridge_stream(bridges["stdio-long"][0]),
            "bridge_http": lambda: bridge_stream(bridges["http-long"][0]),
        }
        stream_runs: dict[str, list[StreamRun]] = {name: [] for name in stream_paths}
        # A lost piece is a bug wherever it happens, so the warm-up run counts for exactness.
        delivered: dict[str, list[int]] = {name: [] for name in stream_paths}
        for i in range(1 + args.stream_runs):
            for name, measure in stream_paths.items():
                done = await measure()
                delivered[name].append(done.pieces)
                if i:
                    stream_runs[name].append(done)
        result["streaming"] = streaming_summary(stream_runs, delivered)

        # 5. memory, while every process is still up
        await anyio.sleep(0.5)
        result["memory_mb"] = {
            "bridge_stdio": memory_mb(bridges["stdio-short"][1]),
            "bridge_http": memory_mb(bridges["http-short"][1]),
            "bridge_stdio_after_streaming": memory_mb(bridges["stdio-long"][1]),
            "bridge_http_after_streaming": memory_mb(bridges["http-long"][1]),
            "floor_stdio": memory_mb(floor_stdio[1]),
            "floor_http": memory_mb(floor_http_pid),
        }
        if args.sessions:
            # Not a target: a server that keeps closed sessions grows with every client that comes and goes.
            note(f"memory: {args.sessions} HTTP sessions opened and closed on the bridge and on the floor", quiet)
            churned = {
                "bridge_http": (bridge_urls["http-short"], bridges["http-short"][1]),
                "floor_http": (floor_base, floor_http_pid),
            }
            growth: dict[str, float] = {}
            for name, (base, pid) in churned.items():
                before = memory_mb(pid)["VmRSS"]
                await churn_sessions(f"{base}/mcp", args.sessions)
                growth[name] = round(memory_mb(pid)["VmRSS"] - before, 1)
            result["session_churn"] = {"sessions": args.sessions, "rss_growth_mb": growth}

        # 4. cold start, with the other servers idle
        note(f"cold start: 1 warm-up + {args.runs} runs each", quiet)
        cold_env = {"LMSTUDIO_URL": short_url}
        bridge_cold: list[float] = []
        import_cold: list[float] = []
        for i in range(1 + args.runs):
            imported = await cold_start_import()
            bridged = await cold_start_bridge(cold_env, log("bridge-cold"))
            if i:
                import_cold.append(imported)
                bridge_cold.append(bridged)
        result["cold_start_s"] = {
            "bridge_median": round(median(bridge_cold), 3),
            "import_mcp_server_median": round(median(import_cold), 3),
            "bridge_runs": [round(x, 3) for x in bridge_cold],
            "import_runs": [round(x, 3) for x in import_cold],
            "ratio": round(median(bridge_cold) / median(import_cold), 3),
        }

    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = targets(result)
    return result


def added_latency(latency: dict[str, Latency], transport: str) -> dict[str, float]:
    bridge = latency[f"bridge_{transport}"].p50_ms
    direct = latency["direct"].p50_ms
    floor = latency[f"floor_{transport}"].p50_ms
    return {
        "added_p50_ms": round(bridge - direct, 3),
        "floor_p50_ms": floor,
        "beyond_floor_and_direct_p50_ms": round(bridge - floor - direct, 3),
    }


def streaming_summary(runs: dict[str, list[StreamRun]], delivered: dict[str, list[int]]) -> dict[str, Any]:
    direct_rate = median([r.rate for r in runs["direct"]])
    summary: dict[str, Any] = {}
    for name, done in runs.items():
        rate = median([r.rate for r in done])
        summary[name] = {
            "chunks_per_s_median": round(rate),
            "chunks_per_s_runs": [round(r.rate) for r in done],
            "seconds_median": round(median([r.seconds for r in done]), 3),
            "pieces_all_runs": delivered[name],
            "exact": all(pieces == STREAM_CHUNKS for pieces in delivered[name]),
            "messages_per_call_median": median([float(r.messages) for r in done]),
            "ratio_to_direct": round(rate / direct_rate, 3),
        }
    return summary


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, op: str, target: float, unit: str) -> None:
        ok = {"<=": value <= target, "<": value < target, ">=": value >= target, "==": value == target}[op]
        checks.append({"name": name, "value": value, "target": f"{op} {target:g}", "unit": unit, "pass": ok,
                       "miss_by": 0.0 if ok else round(abs(value - target), 3)})

    for transport in ("stdio", "http"):
        beyond = result["added_latency"][transport]["beyond_floor_and_direct_p50_ms"]
        check(f"latency {transport}: bridge p50 - (floor p50 + direct p50)", beyond, "<=", TARGET_ADDED_MS, "ms")
    for transport in ("stdio", "http"):
        stream = result["streaming"][f"bridge_{transport}"]
        check(f"streaming {transport}: chunks/s, ratio to direct SSE", stream["ratio_to_direct"], ">=",
              TARGET_STREAM_RATIO, "x")
        worst = max(stream["pieces_all_runs"], key=lambda pieces: abs(pieces - STREAM_CHUNKS))
        check(f"streaming {transport}: pieces delivered as progress, worst run", worst, "==", STREAM_CHUNKS,
              "pieces")
    check("cold start: bridge / import mcp.server (medians)", result["cold_start_s"]["ratio"], "<=",
          TARGET_COLD_RATIO, "x")
    for transport in ("stdio", "http"):
        check(f"idle RSS, bridge over {transport}", result["memory_mb"][f"bridge_{transport}"]["VmRSS"], "<",
              TARGET_RSS_MB, "MB")
    return checks


LATENCY_LABELS = {
    "direct": "direct httpx2 POST to the fake, SSE read to the end",
    "direct_new_connection": "  same, new connection per call (as the bridge does)",
    "floor_stdio": "SDK floor: no-op tool, stdio",
    "floor_http": "SDK floor: no-op tool, HTTP",
    "bridge_stdio": "bridge chat tool, stdio",
    "bridge_http": "bridge chat tool, HTTP",
}
IMPORT_BASELINE = "python -c 'import mcp.server'"
STREAM_LABELS = {
    "direct": "direct httpx2 read of the fake's SSE",
    "bridge_stdio": "bridge, progress over stdio",
    "bridge_http": "bridge, progress over HTTP",
}


def render(result: dict[str, Any]) -> str:
    cfg, machine = result["config"], result["machine"]
    lines = [
        f"llm-hub bridge benchmark: {cfg['calls']} rounds (+{cfg['warmup']} warm-up), {cfg['stream_runs']} stream "
        f"runs, {cfg['runs']} cold starts; {machine['cpus']} CPUs, load {machine['loadavg_at_start']} -> "
        f"{machine['loadavg_at_end']}",
        "",
        f"1-2. Latency per call, ms (chat reply of {cfg['short_chunks']} chunks){'p50':>12}{'p99':>9}{'mean':>9}"
        f"{'server CPU':>12}",
    ]
    cpu = result["server_cpu_ms_per_call"]
    for name, label in LATENCY_LABELS.items():
        row = result["latency_ms"][name]
        used = f"{cpu[name]:>12.2f}" if name in cpu else ""
        lines.append(f"  {label:<56}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['mean_ms']:>9.3f}{used}")
    for transport, added in result["added_latency"].items():
        lines.append(
            f"  {transport}: added p50 (bridge - direct) {added['added_p50_ms']:.3f} ms vs floor p50 "
            f"{added['floor_p50_ms']:.3f} ms: {added['beyond_floor_and_direct_p50_ms']:+.3f} ms beyond floor + direct"
        )
    lines += ["", f"3. Streaming {cfg['stream_chunks']} chunks{'chunks/s p50':>40}{'ratio':>8}{'msgs/call':>11}  pieces per run"]
    for name, label in STREAM_LABELS.items():
        row = result["streaming"][name]
        lines.append(f"  {label:<56}{row['chunks_per_s_median']:>9}{row['ratio_to_direct']:>8.3f}"
                     f"{row['messages_per_call_median']:>11.0f}  {row['pieces_all_runs']}")
    cold = result["cold_start_s"]
    lines += [
        "",
        "4. Cold start, s (median of runs)",
        f"  {'llm-hub over stdio: spawn -> initialize result':<56}{cold['bridge_median']:>9.3f}  {cold['bridge_runs']}",
        f"  {IMPORT_BASELINE:<56}{cold['import_mcp_server_median']:>9.3f}  {cold['import_runs']}",
        f"  {'ratio':<56}{cold['ratio']:>9.3f}",
        "",
        f"5. Resident memory, MB{'VmRSS':>43}{'VmHWM':>9}",
    ]
    for name, mem in result["memory_mb"].items():
        lines.append(f"  {name:<56}{mem['VmRSS']:>9.1f}{mem['VmHWM']:>9.1f}")
    if churn := result.get("session_churn"):
        for name, grown in churn["rss_growth_mb"].items():
            lines.append(f"  {name + ': RSS growth over ' + str(churn['sessions']) + ' more HTTP sessions':<56}{grown:>+9.1f}")
    lines += ["", "Targets"]
    for t in result["targets"]:
        verdict = "PASS" if t["pass"] else f"MISS by {t['miss_by']:g} {t['unit']}"
        lines.append(f"  {verdict:<22}{t['name']}: {t['value']:g} {t['unit']} (target {t['target']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="measured latency rounds (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured latency rounds first (default 30)")
    parser.add_argument("--stream-runs", type=int, default=9, help=f"{STREAM_CHUNKS}-chunk streams per path (default 9)")
    parser.add_argument("--runs", type=int, default=5, help="cold starts of each kind (default 5)")
    parser.add_argument("--sessions", type=int, default=100,
                        help="HTTP sessions opened and closed to watch memory growth; 0 skips (default 100)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    if min(args.calls, args.stream_runs, args.runs) < 1 or min(args.warmup, args.sessions) < 0:
        parser.error("counts must be positive")

    workdir = Path(tempfile.mkdtemp(prefix="llm-hub-bench-"))
    try:
        result = anyio.run(run, args, workdir)
    except BaseException:
        print(f"benchmark failed; server logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    if not args.json:
        print(render(result))
        print()
    print(json.dumps(result, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
