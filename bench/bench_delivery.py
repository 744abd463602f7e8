"""What getting every progress notification to TypeScript clients costs, against the bridge without it.

TypeScript SDK clients drop progress that arrives in the same read as the call's result
(mcp_server/delivery.py says why and what the bridge does). This runs the same streamed chat call
through real clients against bridges that differ only in `ProgressRelay.settle`:

  none      return the result at once (the bridge before the fix: the baseline)
  yield     one scheduler turn (anyio.sleep(0)) before the result
  pause     a pause (delivery.PAUSE, or --pause) before the result, whatever the era
  shipped   the bridge as it is: a ping in the handshake era, the pause over 2026-era stdio (of
            --pause seconds if given), nothing over 2026-era HTTP

and prints, per client path and variant, the calls whose progress did not add up to the result, the
per-call latency the client saw and the bridge's CPU per call, each against `none` from the same
rounds. Paths: the TypeScript SDK v1 over stdio, v2 over stdio in the 2026 era, mcp-remote (v1 behind
it) in front of an HTTP bridge in both eras, v1 over HTTP, and the Python SDK over HTTP.

Usage: .venv/bin/python bench/bench_delivery.py [--calls 100] [--rounds 3] [--variants none,shipped]
       [--pause SECONDS] [--paths stdio,remote] [--json]
(needs `npm ci --prefix tests/ts`; about 5 minutes with the defaults on a busy 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import _common as common
import anyio
from mcp import Client

from mcp_server import delivery

ROOT = Path(__file__).resolve().parents[1]
TS_DIR = ROOT / "tests" / "ts"
CHUNKS = 50
VARIANTS = ["none", "yield", "pause", "shipped"]

# A bridge whose `settle` is swapped for a variant before the usual command line runs.
LAUNCHER = '''\
import sys

import anyio

from mcp_server import delivery
from llm_hub.cli import main

variant = sys.argv.pop(1)
delivery.PAUSE = float(sys.argv.pop(1))
sys.argv[0] = "llm-hub"


async def settle(self):
    if self._reported:
        await anyio.sleep(0 if variant == "yield" else delivery.PAUSE)


async def skip(self):
    pass


if variant == "none":
    delivery.ProgressRelay.settle = skip
elif variant in ("yield", "pause"):
    delivery.ProgressRelay.settle = settle
main()
'''

# (name, TypeScript SDK, its negotiation mode, how it reaches the bridge)
PATHS = [
    ("ts-v1 stdio", "v1", "legacy", "stdio"),
    ("ts-v2 stdio 2026 era", "v2", "auto", "stdio"),
    ("mcp-remote http", "v1", "legacy", "remote"),
    ("mcp-remote http 2026 era", "v1", "auto", "remote"),
    ("ts-v1 http", "v1", "legacy", "url"),
    ("python sdk http", None, "legacy", "url"),
]


def bridge_command(variant: str, pause: float, *args: str) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, variant, repr(pause), *args]


@asynccontextmanager
async def http_bridge(variant: str, pause: float, lmstudio: str, log: Any) -> AsyncIterator[tuple[str, int]]:
    port = common.free_port()
    env = common.clean_env(LMSTUDIO_URL=lmstudio, LLM_HUB_PORT=str(port), LLM_HUB_LOG_LEVEL="WARNING")
    async with common.http_server(bridge_command(variant, pause, "serve"), port, ready_path="/health", env=env, log=log,
                                  what=f"bridge ({variant})") as served:
        yield served


async def ts_run(node: str, sdk: str, mode: str, via: str, variant: str, pause: float, lmstudio: str,
                 http: tuple[str, int], calls: int, log: Any, workdir: Path) -> dict[str, Any]:
    """One client process making `calls` calls; the bridge's CPU is read between its first and last line."""
    cmd = [node, str(TS_DIR / "client.mjs"), "--sdk", sdk, "--mode", mode]
    if via == "stdio":
        cmd += ["--stdio", sys.executable, *(f"--arg={a}" for a in bridge_command(variant, pause)[1:])]
    else:
        cmd += [f"--{via}", f"{http[0]}/mcp"]
    cmd += ["--tool", common.CHAT_TOOL, "--calls", str(calls), "stream"]
    env = common.clean_env(LMSTUDIO_URL=lmstudio, LLM_HUB_LOG_LEVEL="WARNING",
                           MCP_REMOTE_CONFIG_DIR=str(workdir / "mcp-remote"))
    async with common.spawned(cmd, env=env, log=log, capture_stdout=True) as process:
        assert process.stdout is not None
        buffered, records, cpu_before, pid = b"", [], 0.0, http[1]
        with anyio.fail_after(300):
            async for chunk in process.stdout:
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    records.append(record)
                    if record["event"] == "connected":
                        pid = record["childPid"] if via == "stdio" else http[1]
                        cpu_before = common.cpu_seconds(pid)
                    elif record["event"] == "done":
                        record["bridge_cpu_s"] = common.cpu_seconds(pid) - cpu_before
            await process.wait()
    outcome = records[-1] if records else {"event": "error", "error": "no output"}
    if outcome["event"] != "done":
        raise RuntimeError(f"{sdk} {via} ({variant}) failed: {outcome}")
    return outcome


async def python_run(variant: str, http: tuple[str, int], calls: int) -> dict[str, Any]:
    """The Python SDK client, handshake era, as the gateway calls a bridge."""
    ms, incomplete = [], 0
    async with Client(f"{http[0]}/mcp", mode="legacy") as client:
        await common.wait_for_tool(client, common.CHAT_TOOL)
        cpu_before = common.cpu_seconds(http[1])
        for i in range(calls):
            pieces: list[str] = []

            async def progress(_p: float, _t: float | None, message: str | None, pieces: list[str] = pieces) -> None:
                if message is not None:
                    pieces.append(message)

            started = time.perf_counter()
            result = await client.call_tool(common.CHAT_TOOL, {"prompt": f"call {i}"}, progress_callback=progress)
            ms.append((time.perf_counter() - started) * 1000)
            incomplete += result.is_error or "".join(pieces) != common.text_of(result)
        cpu = common.cpu_seconds(http[1]) - cpu_before
    return {"calls": calls, "complete": calls - incomplete, "unknownToken": 0, "ms": ms, "bridge_cpu_s": cpu}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [m for run in runs for m in run["ms"]]
    calls = sum(run["calls"] for run in runs)
    return {
        "calls": calls,
        "incomplete": calls - sum(run["complete"] for run in runs),
        "unknown_token_errors": sum(run["unknownToken"] for run in runs),
        "p50_ms": round(common.percentile(ms, 50), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "bridge_cpu_ms_per_call": round(1000 * sum(run["bridge_cpu_s"] for run in runs) / calls, 3),
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (TS_DIR / "node_modules").is_dir():
        raise SystemExit("needs node and the TypeScript clients: npm ci --prefix tests/ts")
    variants, pause = args.variants, args.pause
    paths = [p for p in PATHS if any(word in p[0] for word in args.paths)]
    machine = common.machine_info()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(p[0], v): [] for p in paths for v in variants}
    async with AsyncExitStack() as stack:
        log = common.log_files(stack, workdir)
        lmstudio, _ = await stack.enter_async_context(common.fake_lmstudio(CHUNKS, log("fake")))
        bridges = {
            v: await stack.enter_async_context(http_bridge(v, pause, lmstudio, log(f"bridge-{v}"))) for v in variants
        }
        client_logs = {v: log(f"client-{v}") for v in variants}
        for round_ in range(args.rounds):
            for name, sdk, mode, via in paths:
                # The order of variants turns every round, so load that comes and goes hits each alike.
                shift = round_ % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    if sdk is None:
                        outcome = await python_run(variant, bridges[variant], args.calls)
                    else:
                        outcome = await ts_run(node, sdk, mode, via, variant, pause, lmstudio, bridges[variant],
                                               args.calls, client_logs[variant], workdir)
                    runs[(name, variant)].append(outcome)
    rows = []
    for name, *_ in paths:
        base = summarise(runs[(name, variants[0])])
        for variant in variants:
            row = {"path": name, "variant": variant, **summarise(runs[(name, variant)])}
            row["added_p50_ms"] = round(row["p50_ms"] - base["p50_ms"], 3)
            row["added_mean_ms"] = round(row["mean_ms"] - base["mean_ms"], 3)
            row["added_cpu_ms"] = round(row["bridge_cpu_ms_per_call"] - base["bridge_cpu_ms_per_call"], 3)
            rows.append(row)
    return {
        "machine": machine,
        "loadavg_at_end": common.loadavg(),
        "chunks": CHUNKS,
        "pause_s": pause,
        "calls_per_run": args.calls,
        "rounds": args.rounds,
        "baseline": variants[0],
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        (
            f"{result['calls_per_run']} calls x {result['rounds']} rounds per path and variant, a "
            f"{result['chunks']}-chunk reply, a pause of {result['pause_s'] * 1000:g} ms; load "
            f"{result['machine']['loadavg_at_start']} -> {result['loadavg_at_end']}; added = against "
            f"`{result['baseline']}` in the same rounds"
        ),
        "",
        (
            f"  {'path':<26}{'variant':<9}{'lost':>10}{'p50 ms':>9}{'added':>8}{'mean ms':>9}{'added':>8}"
            f"{'CPU ms':>8}{'added':>8}"
        ),
    ]
    for r in result["rows"]:
        lost = f"{r['incomplete']}/{r['calls']}"
        lines.append(
            f"  {r['path']:<26}{r['variant']:<9}{lost:>10}{r['p50_ms']:>9.2f}{r['added_p50_ms']:>+8.2f}"
            f"{r['mean_ms']:>9.2f}{r['added_mean_ms']:>+8.2f}"
            f"{r['bridge_cpu_ms_per_call']:>8.2f}{r['added_cpu_ms']:>+8.2f}"
        )
    lines += ["", "lost: calls whose progress messages did not concatenate to the result (the client dropped some)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per client run (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every path and variant (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, the first is the baseline (default {','.join(VARIANTS)})")
    parser.add_argument("--pause", type=float, default=delivery.PAUSE,
                        help=f"seconds of the pause variants (default delivery.PAUSE, {delivery.PAUSE:g})")
    parser.add_argument("--paths", default="", help="comma-separated words; only paths whose name holds one")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.paths = [w.strip() for w in args.paths.split(",")]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if min(args.calls, args.rounds) < 1 or not args.variants or args.pause < 0:
        parser.error("counts must be positive, the pause not negative, and at least one variant given")

    with common.server_logs("llm-hub-bench-delivery-") as workdir:
        result = anyio.run(run, args, workdir)
    common.print_result(result, render, args.json)


if __name__ == "__main__":
    main()
