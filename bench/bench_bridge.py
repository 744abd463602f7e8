"""Benchmark of the llm-hub bridge, always against baselines measured in the same run.

Measures, with the fake LM Studio (tests/fake_lmstudio.py) in processes of its own:
  1. per-call latency of a chat tool call over stdio and HTTP vs a direct HTTP call to the fake;
  2. the SDK floor: a no-op tool on a bare low-level `mcp.server.Server`, over stdio and HTTP;
  3. streaming pass-through: text pieces/s delivered as progress vs reading the fake's SSE directly;
  4. cold start: spawn to initialize result vs `python -c "import mcp.server"`;
  5. resident memory of the bridge processes after use.

Usage: .venv/bin/python bench/bench_bridge.py [--calls 300] [--runs 5] [--stream-runs 11] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import _common as common
import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

PROMPT = "Say hello."
SHORT_CHUNKS = 5
STREAM_CHUNKS = 3000

TARGET_ADDED_MS = 1.0
TARGET_STREAM_RATIO = 0.9
TARGET_COLD_RATIO = 1.3
TARGET_RSS_MB = 100.0

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


def median(values: list[float]) -> float:
    return common.percentile(values, 50)


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int
    client_cpu_ms: float  # mean CPU this process spent per call

    @classmethod
    def of(cls, seconds: list[float], cpu_seconds: float) -> Latency:
        ms = common.summary_ms(seconds)
        return cls(ms["p50_ms"], ms["p99_ms"], ms["mean_ms"], len(seconds),
                   round(cpu_seconds / len(seconds) * 1000, 3))


# -- processes -----------------------------------------------------------------------------


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


@asynccontextmanager
async def stdio_session(params: StdioServerParameters, log: TextIO) -> AsyncIterator[tuple[Client, int]]:
    """An SDK client on a spawned stdio server, with the server's pid found among our children."""
    before = child_pids()
    async with Client(stdio_client(params, errlog=log), mode="legacy") as client:
        new = child_pids() - before
        if len(new) != 1:
            raise RuntimeError(f"expected one new child process for {params.command}, found {sorted(new)}")
        yield client, new.pop()


# -- measurements --------------------------------------------------------------------------

TimedCall = Callable[[], Awaitable[None]]


def chat_body() -> dict[str, Any]:
    # What the bridge sends for {"prompt": PROMPT}, so both paths ask the fake for the same thing.
    return {
        "model": common.MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def bridge_call(client: Client) -> TimedCall:
    expected = common.fake_reply(SHORT_CHUNKS)

    async def call() -> None:
        result = await client.call_tool(common.CHAT_TOOL, {"prompt": PROMPT})
        if result.is_error or common.text_of(result) != expected:
            raise RuntimeError(f"unexpected bridge answer: {common.text_of(result)!r}")

    return call


def floor_call(client: Client) -> TimedCall:
    async def call() -> None:
        result = await client.call_tool("noop", {})
        if result.is_error:
            raise RuntimeError(f"floor tool failed: {common.text_of(result)!r}")

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


async def interleaved_latency(calls: dict[str, TimedCall], rounds: int) -> dict[str, Latency]:
    """Rounds of one call per target, rotating the order, so drift on a noisy machine hits all alike."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_started = time.process_time()
            started = time.perf_counter()
            await calls[name]()
            samples[name].append(time.perf_counter() - started)
            cpu[name] += time.process_time() - cpu_started
    return {name: Latency.of(values, cpu[name]) for name, values in samples.items()}


@dataclass
class StreamRun:
    pieces: int
    seconds: float  # request start to the last text piece received
    messages: int  # progress notifications (or SSE content chunks) that carried text
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0  # the bridge's, when there is one

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
                    pieces += content.count(common.PIECE)
                    messages += 1
                    last = time.perf_counter()
    return StreamRun(pieces, last - started, messages)


async def bridge_stream(client: Client) -> StreamRun:
    pieces = messages = 0
    started = last = time.perf_counter()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        nonlocal pieces, messages, last
        count = message.count(common.PIECE) if message else 0
        if count:
            pieces += count
            messages += 1
            last = time.perf_counter()

    result = await client.call_tool(common.CHAT_TOOL, {"prompt": PROMPT}, progress_callback=on_progress)
    if result.is_error or common.text_of(result).count(common.PIECE) != STREAM_CHUNKS:
        raise RuntimeError(f"unexpected streamed answer ({len(common.text_of(result))} chars, error={result.is_error})")
    return StreamRun(pieces, last - started, messages)


async def cold_start_bridge(params: StdioServerParameters, log: TextIO) -> float:
    """Spawn to initialize result; shutting the bridge down again is not counted."""
    started = time.perf_counter()
    async with Client(stdio_client(params, errlog=log), mode="legacy"):
        return time.perf_counter() - started


async def cold_start_import() -> tuple[float, float]:
    """`import mcp.server` in a fresh interpreter: seconds until imported, and until the process is gone."""
    code = "import mcp.server; import sys; sys.stdout.write('.'); sys.stdout.flush()"
    started = time.perf_counter()
    async with await anyio.open_process([sys.executable, "-c", code], stderr=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        await process.stdout.receive()
        imported = time.perf_counter() - started
        if await process.wait():
            raise RuntimeError("python -c 'import mcp.server' failed")
    return imported, time.perf_counter() - started


# -- the run -------------------------------------------------------------------------------


@dataclass
class Served:
    """A server process the run talks to through an SDK client."""

    client: Client
    pid: int
    url: str = ""  # base URL, HTTP servers only


@dataclass
class Lab:
    """Every process the run measures or measures against, started once."""

    short_url: str  # fake LM Studio answering SHORT_CHUNKS pieces
    long_url: str  # fake LM Studio streaming STREAM_CHUNKS pieces
    http: httpx2.AsyncClient
    http_no_reuse: httpx2.AsyncClient  # its own pool, or it would take and discard the one `http` keeps alive
    bridge: dict[str, Served]  # by transport, on the short fake
    stream_bridge: dict[str, Served]  # by transport, on the long fake
    floor: dict[str, Served]  # by transport
    log: Callable[[str], TextIO]


async def start_bridges(stack: AsyncExitStack, lmstudio_url: str, log: Callable[[str], TextIO],
                        label: str) -> dict[str, Served]:
    params = StdioServerParameters(command=common.LLM_HUB, env={"LMSTUDIO_URL": lmstudio_url})
    client, pid = await stack.enter_async_context(stdio_session(params, log(f"bridge-stdio-{label}")))
    stdio = Served(client, pid)
    port = common.free_port()
    base, pid = await stack.enter_async_context(common.http_server(
        [common.LLM_HUB, "serve", "--port", str(port)], port, ready_path="/health",
        env=common.clean_env(LMSTUDIO_URL=lmstudio_url), log=log(f"bridge-http-{label}"), what="bridge",
    ))
    http = Served(await stack.enter_async_context(Client(f"{base}/mcp", mode="legacy")), pid, base)
    for served in (stdio, http):
        await common.wait_for_tool(served.client, common.CHAT_TOOL)
    return {"stdio": stdio, "http": http}


async def start_floor(stack: AsyncExitStack, script: Path, log: Callable[[str], TextIO]) -> dict[str, Served]:
    params = StdioServerParameters(command=sys.executable, args=[str(script)])
    stdio = Served(*await stack.enter_async_context(stdio_session(params, log("floor-stdio"))))
    port = common.free_port()
    # GET /mcp without a session is refused, but any answer means the server is up.
    base, pid = await stack.enter_async_context(common.http_server(
        [sys.executable, str(script), str(port)], port, ready_path="/mcp", env=common.clean_env(),
        log=log("floor-http"), what="SDK floor server", ready=lambda r: r.status_code < 500,
    ))
    http = Served(await stack.enter_async_context(Client(f"{base}/mcp", mode="legacy")), pid, base)
    for served in (stdio, http):
        await common.wait_for_tool(served.client, "noop")
    return {"stdio": stdio, "http": http}


async def start_lab(stack: AsyncExitStack, workdir: Path) -> Lab:
    log = common.log_files(stack, workdir)
    floor_script = workdir / "floor_server.py"
    floor_script.write_text(FLOOR_SERVER)
    short_url, _ = await stack.enter_async_context(common.fake_lmstudio(SHORT_CHUNKS, log("fake-short")))
    long_url, _ = await stack.enter_async_context(common.fake_lmstudio(STREAM_CHUNKS, log("fake-long")))
    return Lab(
        short_url=short_url,
        long_url=long_url,
        http=await stack.enter_async_context(httpx2.AsyncClient(timeout=60)),
        http_no_reuse=await stack.enter_async_context(httpx2.AsyncClient(timeout=60)),
        bridge=await start_bridges(stack, short_url, log, "short"),
        stream_bridge=await start_bridges(stack, long_url, log, "long"),
        floor=await start_floor(stack, floor_script, log),
        log=log,
    )


async def measure_latency(lab: Lab, count: int, warmup: int) -> dict[str, Any]:
    calls = {
        "direct": direct_call(lab.http, lab.short_url),
        "direct_new_connection": direct_call_new_connection(lab.http_no_reuse, lab.short_url),
        "floor_stdio": floor_call(lab.floor["stdio"].client),
        "floor_http": floor_call(lab.floor["http"].client),
        "bridge_stdio": bridge_call(lab.bridge["stdio"].client),
        "bridge_http": bridge_call(lab.bridge["http"].client),
    }
    if warmup:
        await interleaved_latency(calls, warmup)
    servers = {f"{kind}_{transport}": served.pid
               for kind, group in (("bridge", lab.bridge), ("floor", lab.floor))
               for transport, served in group.items()}
    cpu_before = {name: common.cpu_seconds(pid) for name, pid in servers.items()}
    latency = await interleaved_latency(calls, count)
    # Each server serves only its own calls here, so its CPU time divides cleanly (in clock ticks of ~10 ms).
    cpu = {name: round((common.cpu_seconds(pid) - cpu_before[name]) / count * 1000, 3) for name, pid in servers.items()}
    return {
        "latency_ms": {name: vars(value) for name, value in latency.items()},
        "server_cpu_ms_per_call": cpu,
        "added_latency": {transport: added_latency(latency, cpu, transport) for transport in ("stdio", "http")},
    }


async def measure_streaming(lab: Lab, runs: int) -> dict[str, Any]:
    paths: dict[str, tuple[Callable[[], Awaitable[StreamRun]], int | None]] = {
        "direct": (lambda: direct_stream(lab.http, lab.long_url), None),
        "bridge_stdio": (lambda: bridge_stream(lab.stream_bridge["stdio"].client), lab.stream_bridge["stdio"].pid),
        "bridge_http": (lambda: bridge_stream(lab.stream_bridge["http"].client), lab.stream_bridge["http"].pid),
    }
    measured: dict[str, list[StreamRun]] = {name: [] for name in paths}
    # A lost piece is a bug wherever it happens, so the warm-up run counts for exactness.
    delivered: dict[str, list[int]] = {name: [] for name in paths}
    for i in range(1 + runs):
        for name, (stream, pid) in paths.items():
            server_before = common.cpu_seconds(pid) if pid else 0.0
            client_before = time.process_time()
            done = await stream()
            done.client_cpu_s = time.process_time() - client_before
            done.server_cpu_s = common.cpu_seconds(pid) - server_before if pid else 0.0
            delivered[name].append(done.pieces)
            if i:
                measured[name].append(done)
    return streaming_summary(measured, delivered)


def measure_memory(lab: Lab) -> dict[str, dict[str, float]]:
    return {
        "bridge_stdio": common.memory_mb(lab.bridge["stdio"].pid),
        "bridge_http": common.memory_mb(lab.bridge["http"].pid),
        "bridge_stdio_after_streaming": common.memory_mb(lab.stream_bridge["stdio"].pid),
        "bridge_http_after_streaming": common.memory_mb(lab.stream_bridge["http"].pid),
        "floor_stdio": common.memory_mb(lab.floor["stdio"].pid),
        "floor_http": common.memory_mb(lab.floor["http"].pid),
    }


async def measure_session_churn(lab: Lab, sessions: int) -> dict[str, Any]:
    """Not a target: a server that keeps closed sessions grows with every client that comes and goes."""
    growth: dict[str, float] = {}
    for name, served in (("bridge_http", lab.bridge["http"]), ("floor_http", lab.floor["http"])):
        before = common.memory_mb(served.pid)["VmRSS"]
        for _ in range(sessions):
            async with Client(f"{served.url}/mcp", mode="legacy"):
                pass
        growth[name] = round(common.memory_mb(served.pid)["VmRSS"] - before, 1)
    return {"sessions": sessions, "rss_growth_mb": growth}


async def measure_cold_start(lab: Lab, runs: int) -> dict[str, Any]:
    params = StdioServerParameters(command=common.LLM_HUB, env={"LMSTUDIO_URL": lab.short_url})
    log = lab.log("bridge-cold")
    bridge: list[float] = []
    imported: list[float] = []
    exited: list[float] = []
    for i in range(1 + runs):
        import_times = await cold_start_import()
        bridge_time = await cold_start_bridge(params, log)
        if i:
            imported.append(import_times[0])
            exited.append(import_times[1])
            bridge.append(bridge_time)
    return {
        "bridge_median": round(median(bridge), 3),
        "import_mcp_server_median": round(median(exited), 3),
        # The bridge's figure stops at its handshake, before any teardown: this is the like-for-like baseline.
        "import_mcp_server_until_imported_median": round(median(imported), 3),
        "bridge_runs": [round(x, 3) for x in bridge],
        "import_runs": [round(x, 3) for x in exited],
        "ratio": round(median(bridge) / median(exited), 3),
        "ratio_to_until_imported": round(median(bridge) / median(imported), 3),
    }


def note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"  ... {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet: bool = args.json
    result: dict[str, Any] = {
        "config": {"calls": args.calls, "warmup": args.warmup, "runs": args.runs, "stream_runs": args.stream_runs,
                   "sessions": args.sessions, "short_chunks": SHORT_CHUNKS, "stream_chunks": STREAM_CHUNKS},
        "machine": common.machine_info(),
    }
    async with AsyncExitStack() as stack:
        note("starting two fake LM Studios, four bridges and two SDK floor servers", quiet)
        lab = await start_lab(stack, workdir)
        note(f"latency: {args.warmup} warm-up + {args.calls} interleaved rounds", quiet)
        result.update(await measure_latency(lab, args.calls, args.warmup))
        note(f"streaming: {STREAM_CHUNKS} chunks, 1 warm-up + {args.stream_runs} runs per path", quiet)
        result["streaming"] = await measure_streaming(lab, args.stream_runs)
        await anyio.sleep(0.5)  # let the last call's garbage settle
        result["memory_mb"] = measure_memory(lab)
        if args.sessions:
            note(f"memory: {args.sessions} HTTP sessions opened and closed, on the bridge and on the floor", quiet)
            result["session_churn"] = await measure_session_churn(lab, args.sessions)
        note(f"cold start: 1 warm-up + {args.runs} runs each", quiet)
        result["cold_start_s"] = await measure_cold_start(lab, args.runs)
    result["machine"]["loadavg_at_end"] = common.loadavg()
    result["targets"] = targets(result)
    return result


def added_latency(latency: dict[str, Latency], server_cpu: dict[str, float], transport: str) -> dict[str, float]:
    bridge, floor, direct = latency[f"bridge_{transport}"], latency[f"floor_{transport}"], latency["direct"]
    # CPU is steadier than wall time under load: what the bridge path burns, client and server side,
    # beyond what the floor and the direct call burn.
    cpu_beyond = (bridge.client_cpu_ms + server_cpu[f"bridge_{transport}"]
                  - floor.client_cpu_ms - server_cpu[f"floor_{transport}"] - direct.client_cpu_ms)
    return {
        "added_p50_ms": round(bridge.p50_ms - direct.p50_ms, 3),
        "floor_p50_ms": floor.p50_ms,
        "beyond_floor_and_direct_p50_ms": round(bridge.p50_ms - floor.p50_ms - direct.p50_ms, 3),
        "cpu_beyond_floor_and_direct_ms": round(cpu_beyond, 3),
    }


def streaming_summary(runs: dict[str, list[StreamRun]], delivered: dict[str, list[int]]) -> dict[str, Any]:
    direct = runs["direct"]
    summary: dict[str, Any] = {}
    for name, done in runs.items():
        # Each run is paired with the direct run just before it, so load that comes and goes hits both.
        ratios = [run.rate / base.rate for run, base in zip(done, direct, strict=True)]
        summary[name] = {
            "chunks_per_s_median": round(median([r.rate for r in done])),
            "chunks_per_s_runs": [round(r.rate) for r in done],
            "seconds_median": round(median([r.seconds for r in done]), 3),
            "messages_per_call_median": median([float(r.messages) for r in done]),
            "client_cpu_ms_median": round(median([r.client_cpu_s for r in done]) * 1000, 1),
            "server_cpu_ms_median": round(median([r.server_cpu_s for r in done]) * 1000, 1),
            "pieces_all_runs": delivered[name],
            "ratio_to_direct": round(median(ratios), 3),
            "ratio_p25_p75": [round(common.percentile(ratios, 25), 3), round(common.percentile(ratios, 75), 3)],
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
        (f"llm-hub bridge benchmark: {cfg['calls']} rounds (+{cfg['warmup']} warm-up), {cfg['stream_runs']} stream "
         f"runs, {cfg['runs']} cold starts; {machine['cpus']} CPUs, load {machine['loadavg_at_start']} -> "
         f"{machine['loadavg_at_end']}"),
        "",
        (f"1-2. Latency per call, ms (chat reply of {cfg['short_chunks']} chunks){'p50':>12}{'p99':>9}{'mean':>9}"
         f"{'CPU: client':>13}{'server':>8}"),
    ]
    server_cpu = result["server_cpu_ms_per_call"]
    for name, label in LATENCY_LABELS.items():
        row = result["latency_ms"][name]
        server = f"{server_cpu[name]:>8.2f}" if name in server_cpu else ""
        lines.append(f"  {label:<56}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['mean_ms']:>9.3f}"
                     f"{row['client_cpu_ms']:>13.2f}{server}")
    for transport, added in result["added_latency"].items():
        lines.append(
            f"  {transport}: added p50 (bridge - direct) {added['added_p50_ms']:.3f} ms vs floor p50 "
            f"{added['floor_p50_ms']:.3f} ms: {added['beyond_floor_and_direct_p50_ms']:+.3f} ms beyond floor + direct "
            f"(CPU: {added['cpu_beyond_floor_and_direct_ms']:+.2f} ms)"
        )
    lines += ["", (f"3. Streaming {cfg['stream_chunks']} chunks{'chunks/s p50':>40}{'ratio p50':>11}{'(p25-p75)':>13}"
                   f"{'msgs/call':>11}{'CPU ms: client':>16}{'server':>8}  pieces, each run")]
    for name, label in STREAM_LABELS.items():
        row = result["streaming"][name]
        spread = "({:.2f}-{:.2f})".format(*row["ratio_p25_p75"])
        distinct = sorted(set(row["pieces_all_runs"]))
        pieces = f"all {distinct[0]}" if len(distinct) == 1 else str(row["pieces_all_runs"])
        server = f"{row['server_cpu_ms_median']:>8.0f}" if name != "direct" else " " * 8
        lines.append(f"  {label:<56}{row['chunks_per_s_median']:>9}{row['ratio_to_direct']:>11.3f}{spread:>13}"
                     f"{row['messages_per_call_median']:>11.0f}{row['client_cpu_ms_median']:>16.0f}{server}  {pieces}")
    cold = result["cold_start_s"]
    lines += [
        "",
        "4. Cold start, s (median of runs)",
        f"  {'llm-hub over stdio: spawn -> initialize result':<56}{cold['bridge_median']:>9.3f}  {cold['bridge_runs']}",
        f"  {IMPORT_BASELINE + ', until exit':<56}{cold['import_mcp_server_median']:>9.3f}  {cold['import_runs']}",
        (f"  {'  same, until imported (no teardown, like the bridge)':<56}"
         f"{cold['import_mcp_server_until_imported_median']:>9.3f}"),
        f"  {'ratio (to exit; to imported)':<56}{cold['ratio']:>9.3f}{cold['ratio_to_until_imported']:>9.3f}",
        "",
        f"5. Resident memory, MB{'VmRSS':>43}{'VmHWM':>9}",
    ]
    for name, mem in result["memory_mb"].items():
        lines.append(f"  {name:<56}{mem['VmRSS']:>9.1f}{mem['VmHWM']:>9.1f}")
    if churn := result.get("session_churn"):
        for name, grown in churn["rss_growth_mb"].items():
            label = f"{name}: RSS growth over {churn['sessions']} more HTTP sessions"
            lines.append(f"  {label:<56}{grown:>+9.1f}")
    lines += ["", "Targets"]
    for t in result["targets"]:
        verdict = "PASS" if t["pass"] else f"MISS by {t['miss_by']:g} {t['unit']}"
        lines.append(f"  {verdict:<22}{t['name']}: {t['value']:g} {t['unit']} (target {t['target']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="measured latency rounds (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured latency rounds first (default 30)")
    parser.add_argument("--stream-runs", type=int, default=11,
                        help=f"{STREAM_CHUNKS}-chunk streams per path (default 11)")
    parser.add_argument("--runs", type=int, default=5, help="cold starts of each kind (default 5)")
    parser.add_argument("--sessions", type=int, default=100,
                        help="HTTP sessions opened and closed to watch memory growth; 0 skips (default 100)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    if min(args.calls, args.stream_runs, args.runs) < 1 or min(args.warmup, args.sessions) < 0:
        parser.error("counts must be positive")

    with common.server_logs("llm-hub-bench-") as workdir:
        result = anyio.run(run, args, workdir)
    common.print_result(result, render, args.json)


if __name__ == "__main__":
    main()
