"""Benchmark of many concurrent streams through one llm-hub gateway, and through the edge in front of it.

Every process runs on its own on loopback:

    2 fake LM Studios (tests/fake_lmstudio.py, long answers: --chunks pieces, --token-delay apart)
      <- 2 bridges (`llm-hub serve`)
           <- one gateway (`llm-hub-gateway`)
                <- the edge (HAProxy with deploy/haproxy/haproxy.cfg, TLS), when `haproxy` is installed

A stream is a 2026-07-28 `tools/call` of `chat_google_gemma-3-270m` with a progress token (the gateway's
fast path), sent raw over HTTP on a connection of its own and read as SSE to its result: an SDK `Client`
per stream would spend the client's CPU, which shares the machine's 2 cores with the servers. At each
level (by default 100, 500 and 1,000 streams, all sent at once, after a single stream as the baseline):
  - time to first event (any progress: a heartbeat or text) and to the first text, from sending;
  - the gateway's resident memory (VmRSS) and open descriptors once every stream has its first text (all
    of them open at once), against just before the level: the cost of one stream;
  - errors: streams whose answer is not the whole text (or that ended early, or were refused).
The edge path sends the same streams to the edge (both of its replica slots point at the one gateway).

Usage: .venv/bin/python bench/bench_load.py [--levels 100,500,1000] [--chunks 150] [--token-delay 0.2]
       [--paths gateway,edge] [--keep-logs] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import _common as common
import anyio
import httpx2
from mcp_types.version import LATEST_MODERN_VERSION

ROOT = Path(__file__).resolve().parents[1]
EDGE_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
ACCEPT = "application/json, text/event-stream"
SETTLE_SECONDS = 5.0  # after a level, for the servers' connections to the bridges to drop back to the pool


@dataclass
class Stream:
    sent: float = 0.0
    first_event: float | None = None
    first_text: float | None = None
    text: str = ""
    error: str = ""
    done: bool = False


def raise_own_limit() -> None:
    """This client holds one connection per stream: its soft descriptor limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1_048_576, hard))


def open_file_limit(pid: int) -> str:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line.split()[3] for line in limits if line.startswith("Max open files"))


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the servers ------------------------------------------------------------------------------------


def bridge(lmstudio_url: str, log: TextIO) -> Any:
    """A bridge whose LM Studio pool takes every stream at once, so they all stream (none waits for a slot)."""
    port = common.free_port()
    env = common.clean_env(
        LMSTUDIO_URL=lmstudio_url,
        LLM_HUB_LOG_LEVEL="WARNING",
        LLM_HUB_REQUEST_TIMEOUT="600",
        LLM_HUB_LMSTUDIO_CONNECTIONS="2000",
    )
    return common.http_server(
        [common.LLM_HUB, "serve", "--port", str(port)], port, ready_path="/health", env=env, log=log, what="bridge"
    )


def gateway(bridge_urls: list[str], key: str, connections: int, log: TextIO) -> Any:
    port = common.free_port()
    env = common.clean_env(
        LLM_HUB_API_KEYS=f"bench:{key}",
        LLM_HUB_RATE_LIMIT="1000000/minute",
        LLM_HUB_REQUEST_LIMIT="1000000/minute",
        LLM_HUB_BRIDGE_CONNECTIONS=str(connections),
        LLM_HUB_LOG_LEVEL="WARNING",
    )
    cmd = [common.LLM_HUB_GATEWAY, *(f"--bridge={url}" for url in bridge_urls), "--port", str(port)]
    return common.http_server(
        cmd,
        port,
        ready_path="/health",
        env=env,
        log=log,
        what="gateway",
        ready=lambda r: r.status_code == 200 and r.json()["bridges"]["healthy"] == 2,
    )


@asynccontextmanager
async def edge(gateway_url: str, workdir: Path, log: TextIO) -> AsyncIterator[tuple[str, Path]]:
    """HAProxy with the shipped configuration, a certificate made here, both replica slots on one gateway."""
    key, cert, pem = workdir / "edge.key", workdir / "edge.crt", workdir / "edge.pem"
    await anyio.run_process(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
    )
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    port, monitor = common.free_port(), common.free_port()
    replica = gateway_url.removeprefix("http://")
    env = common.clean_env(
        EDGE_BIND=f"127.0.0.1:{port}",
        EDGE_CERT=str(pem),
        EDGE_MONITOR_BIND=f"127.0.0.1:{monitor}",
        GATEWAY_1=replica,
        GATEWAY_2=replica,
    )
    assert HAPROXY is not None
    async with common.spawned([HAPROXY, "-db", "-f", str(EDGE_CONFIG)], env=env, log=log) as process:
        url = f"https://127.0.0.1:{port}"
        async with httpx2.AsyncClient(verify=str(cert), timeout=2) as http:
            with anyio.fail_after(30):
                while True:
                    if process.returncode is not None:
                        raise RuntimeError(f"haproxy exited with {process.returncode}; see its log")
                    try:
                        if (await http.get(f"{url}/health")).status_code == 200:
                            break
                    except httpx2.TransportError:
                        pass
                    await anyio.sleep(0.1)
        yield url, cert


# -- streams ----------------------------------------------------------------------------------------


def call_body(prompt: str) -> bytes:
    meta = {
        "io.modelcontextprotocol/protocolVersion": LATEST_MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        "progressToken": 1,
    }
    params = {"name": common.CHAT_TOOL, "arguments": {"prompt": prompt}, "_meta": meta}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).encode()


async def one_stream(http: httpx2.AsyncClient, key: str, prompt: str, stream: Stream) -> None:
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": LATEST_MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": common.CHAT_TOOL,
    }
    stream.sent = time.perf_counter()
    try:
        async with http.stream("POST", "/mcp", content=call_body(prompt), headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                stream.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("method") == "notifications/progress":
                    now = time.perf_counter()
                    stream.first_event = stream.first_event or now
                    if message["params"].get("message"):
                        stream.first_text = stream.first_text or now
                elif "result" in message:
                    result = message["result"]
                    stream.text = "".join(c.get("text", "") for c in result.get("content", []))
                    if result.get("isError"):
                        stream.error = stream.text[:200]
                    return
                elif "error" in message:
                    stream.error = message["error"].get("message", "")[:200]
                    return
            stream.error = stream.error or "the stream ended without a result"
    except Exception as exc:  # noqa: BLE001 - counted as an error, the run goes on
        stream.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        stream.done = True


def snapshot(pid: int) -> dict[str, Any]:
    return {"rss_mb": common.memory_mb(pid)["VmRSS"], "fds": descriptors(pid)}


async def level(url: str, verify: Any, key: str, n: int, gateway_pid: int, answer: str, quiet: bool) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    timeout = httpx2.Timeout(600, connect=60, pool=600)
    async with httpx2.AsyncClient(base_url=url, verify=verify, limits=limits, timeout=timeout) as http:
        await anyio.sleep(SETTLE_SECONDS)
        before = snapshot(gateway_pid)
        streams = [Stream() for _ in range(n)]
        peak: dict[str, Any] = {}
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, stream in enumerate(streams):
                tg.start_soon(one_stream, http, key, f"stream {i}", stream)
            while not all(s.first_text or s.done for s in streams):
                await anyio.sleep(0.05)
            all_open = time.perf_counter() - started
            peak = snapshot(gateway_pid)
            open_at_peak = sum(not s.done for s in streams)
            common.note(
                f"  {n} streams: all streaming after {all_open:.1f} s ({open_at_peak} open); "
                f"gateway {peak['rss_mb']} MB, {peak['fds']} descriptors",
                quiet,
            )
    errors = [s.error or "wrong text" for s in streams if s.error or s.text != answer]
    first_events = [s.first_event - s.sent for s in streams if s.first_event]
    first_texts = [s.first_text - s.sent for s in streams if s.first_text]
    return {
        "streams": n,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "open_at_peak": open_at_peak,
        "seconds_until_all_streaming": round(all_open, 2),
        "first_event": common.summary_ms(first_events) if first_events else None,
        "first_text": common.summary_ms(first_texts) if first_texts else None,
        "gateway_before": before,
        "gateway_peak": peak,
    }


def per_stream(row: dict[str, Any], idle: dict[str, Any], memory: bool) -> None:
    """What one open stream costs, against the gateway idle at the start: connections a level leaves in the
    pool are reused by the next, so the level's own "before" would undercount. Memory is compared on the
    first path only: the allocator keeps what earlier streams freed, and later levels reuse it."""
    streams = max(1, row["open_at_peak"])
    row["fds_per_stream"] = round((row["gateway_peak"]["fds"] - idle["fds"]) / streams, 2)
    rss = (row["gateway_peak"]["rss_mb"] - idle["rss_mb"]) * 1024 / streams
    row["kb_per_stream"] = round(rss, 1) if memory else None


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet: bool = args.json
    raise_own_limit()
    paths: list[str] = args.paths
    skipped = None
    if "edge" in paths and (HAPROXY is None or not EDGE_CONFIG.exists() or shutil.which("openssl") is None):
        skipped = "haproxy, openssl or deploy/haproxy/haproxy.cfg missing: gateway only"
        paths = [p for p in paths if p != "edge"]
    answer = common.fake_reply(args.chunks)
    biggest = max(args.levels)
    result: dict[str, Any] = {
        "config": {
            "levels": args.levels,
            "chunks": args.chunks,
            "token_delay_s": args.token_delay,
            "bridge_connections": biggest + 8,
            "paths": paths,
            "edge_skipped": skipped,
        },
        "machine": common.machine_info(),
        "paths": {},
    }
    key = secrets.token_urlsafe(24)
    async with AsyncExitStack() as stack:
        log = common.log_files(stack, workdir)
        common.note("starting two fake LM Studios, two bridges and a gateway", quiet)
        fakes = [
            await stack.enter_async_context(
                common.fake_lmstudio(args.chunks, log(f"fake-{i}"), "--token-delay", str(args.token_delay))
            )
            for i in range(2)
        ]
        bridges = [await stack.enter_async_context(bridge(url, log(f"bridge-{i}"))) for i, (url, _) in enumerate(fakes)]
        # Connections per bridge enough for every stream, so none waits at the gateway for a connection.
        gateway_url, gateway_pid = await stack.enter_async_context(
            gateway([url for url, _ in bridges], key, biggest + 8, log("gateway"))
        )
        result["gateway_open_file_limit"] = open_file_limit(gateway_pid)
        targets: dict[str, tuple[str, Any]] = {"gateway": (gateway_url, True)}
        if "edge" in paths:
            common.note("starting the edge (haproxy)", quiet)
            edge_url, cert = await stack.enter_async_context(edge(gateway_url, workdir, log("edge")))
            targets["edge"] = (edge_url, str(cert))
        idle = result["gateway_idle"] = snapshot(gateway_pid)
        for path in paths:
            url, verify = targets[path]
            common.note(f"{path}: 1 stream, then {', '.join(map(str, args.levels))} at once", quiet)
            levels = [await level(url, verify, key, n, gateway_pid, answer, quiet) for n in [1, *args.levels]]
            for row in levels:
                per_stream(row, idle, memory=path == paths[0])
            result["paths"][path] = levels
    return result


def render(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [
        (
            f"concurrent streams, each {config['chunks']} pieces {config['token_delay_s']} s apart; gateway open-file "
            f"limit {result['gateway_open_file_limit']}; LLM_HUB_BRIDGE_CONNECTIONS={config['bridge_connections']}"
        ),
    ]
    if config["edge_skipped"]:
        lines.append(f"edge: skipped ({config['edge_skipped']})")
    idle = result["gateway_idle"]
    lines.append(
        f"gateway idle: {idle['rss_mb']} MB, {idle['fds']} descriptors; per stream: against idle "
        "(memory on the first path only)"
    )
    lines.append(
        "path     streams  errors  first event p50/p90/max ms     first text p50/p90/max ms      "
        "gateway RSS before/peak MB  fds before/peak  KB/stream  fds/stream"
    )
    for path, levels in result["paths"].items():
        for row in levels:
            fe, ft = row["first_event"] or {}, row["first_text"] or {}
            lines.append(
                f"{path:8} {row['streams']:7} {row['errors']:7}  "
                f"{fe.get('p50_ms', 0):8.1f}/{fe.get('p90_ms', 0):8.1f}/{fe.get('max_ms', 0):8.1f}  "
                f"{ft.get('p50_ms', 0):8.1f}/{ft.get('p90_ms', 0):8.1f}/{ft.get('max_ms', 0):8.1f}  "
                f"{row['gateway_before']['rss_mb']:8.1f}/{row['gateway_peak']['rss_mb']:8.1f}  "
                f"{row['gateway_before']['fds']:6}/{row['gateway_peak']['fds']:6}  "
                f"{'-' if row['kb_per_stream'] is None else row['kb_per_stream']:>9}  {row['fds_per_stream']:10.2f}"
            )
    lines.append(f"machine: {result['machine']['cpus']} CPUs, load at start {result['machine']['loadavg_at_start']}")
    return "\n".join(lines)


def levels_arg(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of stream counts, e.g. 100,500,1000") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("each level must be at least 1 stream")
    return values


def paths_arg(text: str) -> list[str]:
    paths = [part.strip() for part in text.split(",") if part.strip()]
    if not paths or set(paths) - {"gateway", "edge"}:
        raise argparse.ArgumentTypeError("a comma-separated list of gateway, edge")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--levels",
        type=levels_arg,
        default=[100, 500, 1000],
        help="streams sent at once, per level (default 100,500,1000)",
    )
    parser.add_argument("--chunks", type=int, default=150, help="pieces per answer (default 150)")
    parser.add_argument("--token-delay", type=float, default=0.2, help="seconds between pieces (default 0.2)")
    parser.add_argument(
        "--paths",
        type=paths_arg,
        default=["gateway", "edge"],
        help="gateway (direct), edge (through haproxy, when installed); default both",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and say where")
    parser.add_argument("--json", action="store_true", help="print only the JSON result (else the table, then it)")
    args = parser.parse_args()
    common.run_and_print("llm-hub-bench-load-", args, run, render)


if __name__ == "__main__":
    main()
