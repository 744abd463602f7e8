"""Benchmark of the llm-hub gateway: the same chat tool call made to a bridge directly and through the gateway,
by clients of both protocol eras.

Every process runs on its own on loopback, as in a deployment on one host:

    fake LM Studio (tests/fake_lmstudio.py, 5 short pieces, no delay)
      <- one bridge (`llm-hub serve`)
           <- the gateway (`llm-hub-gateway`, API key, rate limits set out of the way)

The client is the MCP SDK `Client` over streamable HTTP, calling `chat_google_gemma-3-270m` with
{"prompt": "hi"}, either at the bridge's /mcp (the baseline) or at the gateway's /mcp, in two eras:
  - handshake era: `Client(..., mode="legacy")` (initialize, a session; the gateway's SDK server serves the call);
  - 2026-07-28:    `Client(..., mode="auto")` (negotiates 2026-07-28 by server/discover; stateless requests,
                   whose `tools/call` takes the gateway's fast path).
That makes four paths (era x direct/gateway). Measured in one run, for each:
  1. per-call latency at concurrency 1 (p50, p99) and calls/s at concurrency 1;
  2. calls/s with 32 calls in flight, on 32 client sessions (judged) and on one client session (info).
The four paths run in alternating blocks; each era's direct and gateway blocks run back to back, the
order of the eras flipping every round and the order within an era every second round, so the noise of
a shared 2-core machine falls on all alike. CPU time used by each process is read from /proc around
every block.

Usage: .venv/bin/python bench/bench_gateway.py [--calls 400] [--block 25] [--tp-calls 160] [--tp-rounds 6]
       [--concurrency 32] [--sessions one|many|both] [--eras legacy,auto] [--warmup 50] [--keep-logs] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_MODERN_VERSION

ARGUMENTS = {"prompt": "hi"}
CHUNKS = 5
EXPECTED = common.fake_reply(CHUNKS)


@dataclass(frozen=True)
class Era:
    mode: str  # the SDK Client's mode=
    label: str
    added_p50_ms: float  # target: gateway p50 - direct p50 <= this, at concurrency 1
    throughput_ratio: float  # target: gateway calls/s / direct calls/s >= this, with 32 calls in flight


# Targets from issue 7 ("How it will be checked").
ERAS = {
    "legacy": Era("legacy", 'handshake era (mode="legacy")', 3.0, 0.70),
    "auto": Era("auto", '2026-07-28 (mode="auto")', 1.5, 0.85),
}
ROUTES = ("direct", "gateway")
PROCESSES = ("client", "gateway", "bridge", "fake")


def path_of(era: str, route: str) -> str:
    return f"{era}/{route}"


# -- clients -------------------------------------------------------------------------------


@asynccontextmanager
async def session(url: str, key: str, era: str) -> AsyncIterator[Client]:
    """One SDK client (its own HTTP connection pool) in the era's mode; checks the version it negotiated."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode=ERAS[era].mode) as client,
    ):
        version = client.protocol_version
        wanted_modern = era == "auto"
        if (version == LATEST_MODERN_VERSION) != wanted_modern or (
                not wanted_modern and version not in HANDSHAKE_PROTOCOL_VERSIONS):
            raise RuntimeError(f"{url} with mode={ERAS[era].mode!r} negotiated {version!r}")
        await common.wait_for_tool(client, common.CHAT_TOOL)
        yield client


# -- measurements --------------------------------------------------------------------------


async def call(client: Client) -> None:
    result = await client.call_tool(common.CHAT_TOOL, ARGUMENTS)
    text = common.text_of(result)
    if result.is_error or text != EXPECTED:
        raise RuntimeError(f"unexpected answer (is_error={result.is_error}): {text[:300]!r}")


@dataclass
class Lab:
    pids: dict[str, int]
    eras: list[str]
    one: dict[str, Client]  # path -> one session
    many: dict[str, list[Client]] = field(default_factory=dict)  # path -> N sessions

    def cpu(self) -> dict[str, float]:
        return {name: common.cpu_seconds(pid) for name, pid in self.pids.items()}

    def order(self, i: int) -> list[str]:
        """Round i's order of the paths: eras flip every round, direct/gateway within an era every second round."""
        eras = self.eras if i % 2 == 0 else self.eras[::-1]
        routes = ROUTES if (i // 2) % 2 == 0 else ROUTES[::-1]
        return [path_of(era, route) for era in eras for route in routes]


@dataclass
class Tally:
    """What the blocks of one path in one phase added up to."""

    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    block_rates: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROCESSES, 0.0))

    def rate(self) -> float:
        return self.calls / self.seconds

    def cpu_ms_per_call(self) -> dict[str, float]:
        return {name: round(used / self.calls * 1000, 3) for name, used in self.cpu.items()}


Block = Callable[[str], Awaitable[tuple[int, float, list[float]]]]


def sequential(lab: Lab, calls: int) -> Block:
    """`calls` calls one after the other on the path's session; each one timed."""

    async def block(path: str) -> tuple[int, float, list[float]]:
        client = lab.one[path]
        latencies = []
        started = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            await call(client)
            latencies.append(time.perf_counter() - t0)
        return calls, time.perf_counter() - started, latencies

    return block


def concurrent(lab: Lab, calls: int, concurrency: int, sessions: str) -> Block:
    """`calls` calls with `concurrency` always in flight, on one session or on one session per worker."""

    async def block(path: str) -> tuple[int, float, list[float]]:
        clients = lab.many[path] if sessions == "many" else [lab.one[path]] * concurrency
        left = calls

        async def worker(client: Client) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(client)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(worker, client)
        return calls, time.perf_counter() - started, []

    return block


async def interleaved(lab: Lab, block: Block, rounds: int) -> dict[str, Tally]:
    """`rounds` rounds of one block per path (see `Lab.order`); CPU time charged per block."""
    tallies = {path: Tally() for path in lab.order(0)}
    for i in range(rounds):
        for path in lab.order(i):
            before = lab.cpu()
            calls, seconds, latencies = await block(path)
            after = lab.cpu()
            tally = tallies[path]
            tally.calls += calls
            tally.seconds += seconds
            tally.latencies += latencies
            tally.block_rates.append(round(calls / seconds, 1))
            for name in PROCESSES:
                tally.cpu[name] += after[name] - before[name]
    return tallies


def throughput(direct_t: Tally, gateway_t: Tally) -> dict[str, Any]:
    direct, through = direct_t.rate(), gateway_t.rate()
    cpu = {route: sum(t.cpu.values()) / t.calls for route, t in (("direct", direct_t), ("gateway", gateway_t))}
    return {
        "direct_calls_per_s": round(direct, 1),
        "gateway_calls_per_s": round(through, 1),
        "ratio": round(through / direct, 3),
        # Each round's gateway block ran next to its direct block: the median of those pairs' ratios shrugs off a
        # block that other work on the machine slowed down.
        "paired_ratio": round(statistics.median(
            g / d for d, g in zip(direct_t.block_rates, gateway_t.block_rates, strict=True)), 3),
        # What the ratio would be if the machine's CPUs were the only limit: all four processes share 2 cores.
        "cpu_ratio": round(cpu["direct"] / cpu["gateway"], 3),
        "block_rates": {"direct": direct_t.block_rates, "gateway": gateway_t.block_rates},
        "cpu_ms_per_call": {"direct": direct_t.cpu_ms_per_call(), "gateway": gateway_t.cpu_ms_per_call()},
        "calls": {"direct": direct_t.calls, "gateway": gateway_t.calls},
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet: bool = args.json
    rounds = max(1, -(-args.calls // args.block))
    eras: list[str] = args.eras
    result: dict[str, Any] = {
        "config": {
            "calls_c1": rounds * args.block, "block": args.block, "rounds_c1": rounds, "warmup": args.warmup,
            "tp_calls": args.tp_calls, "tp_rounds": args.tp_rounds, "concurrency": args.concurrency,
            "chunks": CHUNKS, "tool": common.CHAT_TOOL, "eras": eras,
        },
        "machine": common.machine_info(),
        "eras": {era: {"label": ERAS[era].label} for era in eras},
    }
    key = secrets.token_urlsafe(24)
    async with AsyncExitStack() as stack:
        log = common.log_files(stack, workdir)
        common.note("starting fake LM Studio, a bridge and a gateway", quiet)
        fake_url, fake_pid = await stack.enter_async_context(common.fake_lmstudio(CHUNKS, log("fake")))
        bridge_url, bridge_pid = await stack.enter_async_context(common.bridge(fake_url, log("bridge")))
        gateway_url, gateway_pid = await stack.enter_async_context(common.gateway(bridge_url, key, log("gateway")))
        urls = {"direct": f"{bridge_url}/mcp", "gateway": f"{gateway_url}/mcp"}
        paths = {path_of(era, route): (era, url) for era in eras for route, url in urls.items()}
        lab = Lab({"client": os.getpid(), "gateway": gateway_pid, "bridge": bridge_pid, "fake": fake_pid}, eras,
                  {path: await stack.enter_async_context(session(url, key, era)) for path, (era, url) in paths.items()})
        if args.sessions_mode in ("many", "both"):
            common.note(f"opening {args.concurrency} more sessions on each of {len(paths)} paths", quiet)
            lab.many = {path: [await stack.enter_async_context(session(url, key, era))
                               for _ in range(args.concurrency)]
                        for path, (era, url) in paths.items()}

        common.note(f"warm-up: {args.warmup} calls per path at concurrency 1, one concurrent block per phase", quiet)
        if args.warmup:
            await interleaved(lab, sequential(lab, args.warmup), 1)
        modes = ["many", "one"] if args.sessions_mode == "both" else [args.sessions_mode]
        for mode in modes:  # every session and connection used once before anything counts
            await interleaved(lab, concurrent(lab, args.concurrency, args.concurrency, mode), 1)

        common.note(f"concurrency 1: {rounds} rounds of {args.block} calls per path, interleaved", quiet)
        c1 = await interleaved(lab, sequential(lab, args.block), rounds)
        phases: dict[str, dict[str, Tally]] = {"c1": c1}
        for mode in modes:
            label = "one session" if mode == "one" else f"{args.concurrency} sessions"
            common.note(f"concurrency {args.concurrency} on {label}: {args.tp_rounds} rounds of {args.tp_calls} calls "
                 "per path, interleaved", quiet)
            phases[f"c{args.concurrency}_{mode}"] = await interleaved(
                lab, concurrent(lab, args.tp_calls, args.concurrency, mode), args.tp_rounds)
        for era in eras:
            direct, through = path_of(era, "direct"), path_of(era, "gateway")
            latency: dict[str, Any] = {route: common.summary_ms(c1[path_of(era, route)].latencies) for route in ROUTES}
            latency["added_p50_ms"] = round(latency["gateway"]["p50_ms"] - latency["direct"]["p50_ms"], 3)
            latency["added_p99_ms"] = round(latency["gateway"]["p99_ms"] - latency["direct"]["p99_ms"], 3)
            result["eras"][era]["latency_c1"] = latency
            result["eras"][era]["throughput"] = {
                phase: throughput(tallies[direct], tallies[through]) for phase, tallies in phases.items()}
        result["memory_mb_after"] = {name: common.memory_mb(pid)["VmRSS"] for name, pid in lab.pids.items()}
        common.note("done; stopping the servers", quiet)
    result["machine"]["loadavg_at_end"] = common.loadavg()
    result["targets"] = targets(result, args.concurrency)
    return result


def representative(throughputs: dict[str, Any], concurrency: int) -> str:
    """The concurrent phase the target is judged on: separate sessions when measured (a gateway's clients are
    many programs, each with its own session), else the single session."""
    many = f"c{concurrency}_many"
    return many if many in throughputs else f"c{concurrency}_one"


def targets(result: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, op: str, target: float, unit: str, judged: bool = True) -> None:
        ok = value <= target if op == "<=" else value >= target
        checks.append({"name": name, "value": value, "target": f"{op} {target:g}", "unit": unit, "pass": ok,
                       "judged": judged})

    for era, measured in result["eras"].items():
        spec = ERAS[era]
        short = "2026-07-28" if era == "auto" else "handshake era"
        check(f"{short}: added latency p50, concurrency 1 (gateway p50 - direct p50)",
              measured["latency_c1"]["added_p50_ms"], "<=", spec.added_p50_ms, "ms")
        main = representative(measured["throughput"], concurrency)
        for phase, row in measured["throughput"].items():
            check(f"{short}: throughput {phase_label(phase)}, gateway / direct", row["ratio"], ">=",
                  spec.throughput_ratio, "x", judged=phase == main)
    return checks


def phase_label(phase: str) -> str:
    if phase == "c1":
        return "concurrency 1"
    level, mode = phase[1:].split("_")
    return f"concurrency {level}, {'one session' if mode == 'one' else level + ' sessions'}"


def render(result: dict[str, Any]) -> str:
    cfg, machine = result["config"], result["machine"]
    lines = [
        (f"llm-hub gateway benchmark: {common.CHAT_TOOL} {json.dumps(ARGUMENTS)}, fake LM Studio replying "
         f"{cfg['chunks']} pieces; {machine['cpus']} CPUs, load {machine['loadavg_at_start']} -> "
         f"{machine['loadavg_at_end']}"),
        "direct = SDK client -> bridge /mcp;  gateway = SDK client -> gateway /mcp -> bridge /mcp",
        "",
        f"Latency per call, concurrency 1, ms ({cfg['calls_c1']} calls per path, blocks of {cfg['block']})",
        f"  {'':<12}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}{'max':>9}",
    ]
    for measured in result["eras"].values():
        latency = measured["latency_c1"]
        lines.append(f"  {measured['label']}")
        for route in ROUTES:
            row = latency[route]
            lines.append(f"    {route:<10}{row['p50_ms']:>9.2f}{row['p90_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                         f"{row['mean_ms']:>9.2f}{row['max_ms']:>9.2f}")
        lines.append(f"    {'added':<10}{latency['added_p50_ms']:>+9.2f}{'':>9}{latency['added_p99_ms']:>+9.2f}")
    lines += [
        "",
        (f"Throughput, calls/s{'direct':>28}{'gateway':>9}{'ratio':>9}{'paired':>8}{'CPU ratio':>11}"
         "   CPU ms per call (client/gateway/bridge/fake)"),
    ]
    for measured in result["eras"].values():
        lines.append(f"  {measured['label']}")
        main = representative(measured["throughput"], cfg["concurrency"])
        for phase, row in measured["throughput"].items():
            mark = " *" if phase == main else ""
            cpu = row["cpu_ms_per_call"]
            detail = "  ".join(f"{route[0]}: " + "/".join(f"{cpu[route][p]:.2f}" for p in PROCESSES)
                               for route in ROUTES)
            lines.append(f"    {phase_label(phase) + mark:<36}{row['direct_calls_per_s']:>8.1f}"
                         f"{row['gateway_calls_per_s']:>9.1f}{row['ratio']:>9.3f}{row['paired_ratio']:>8.3f}"
                         f"{row['cpu_ratio']:>11.3f}"
                         f"   {detail}")
    lines.append(f"  * the concurrent phase judged against the target (calls per block: {cfg['tp_calls']}, "
                 f"{cfg['tp_rounds']} blocks per path)")
    lines.append("  CPU ms per call: d = direct blocks, g = gateway blocks (from /proc, summed over the blocks);")
    lines.append("  ratio = gateway calls/s / direct calls/s over all blocks (judged); paired = median of each round's ratio")
    lines.append("  CPU ratio = direct / gateway CPU per call, all four processes: the ratio with the cores full")
    if machine["loadavg_at_start"][0] > machine["cpus"]:
        lines += ["", (f"Note: load {machine['loadavg_at_start'][0]:g} on {machine['cpus']} CPUs at the start: "
                       "other work shared the machine; the paths were interleaved, so trust ratios more than "
                       "absolute figures.")]
    mem = result["memory_mb_after"]
    lines += ["", "RSS after the run, MB: " + ", ".join(f"{name} {mb:.1f}" for name, mb in mem.items())]
    lines += ["", "Targets (issue 7)"]
    for t in result["targets"]:
        verdict = ("PASS" if t["pass"] else "MISS") + ("" if t["judged"] else " (info)")
        lines.append(f"  {verdict:<12}{t['name']}: {t['value']:g} {t['unit']} (target {t['target']})")
    return "\n".join(lines)


def eras_arg(text: str) -> list[str]:
    eras = [part.strip() for part in text.split(",") if part.strip()]
    if not eras or any(era not in ERAS for era in eras) or len(set(eras)) != len(eras):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(ERAS)}")
    return eras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400,
                        help="calls per path at concurrency 1, rounded up to whole blocks (default 400)")
    parser.add_argument("--block", type=int, default=25, help="calls per block at concurrency 1 (default 25)")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per path first (default 50)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in the concurrent phases (32)")
    parser.add_argument("--tp-calls", type=int, default=160, help="calls per concurrent block (default 160)")
    parser.add_argument("--tp-rounds", type=int, default=6, help="concurrent blocks per path and phase (default 6)")
    parser.add_argument("--sessions", dest="sessions_mode", choices=["one", "many", "both"], default="both",
                        help="concurrent calls on one client session, on one session each, or both (default)")
    parser.add_argument("--eras", type=eras_arg, default=list(ERAS),
                        help="client modes to measure: legacy (handshake era), auto (2026-07-28); default both")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and say where")
    parser.add_argument("--json", action="store_true", help="print only the JSON result (else the table, then it)")
    args = parser.parse_args()
    if min(args.calls, args.block, args.concurrency, args.tp_calls, args.tp_rounds) < 1 or args.warmup < 0:
        parser.error("counts must be positive")

    common.run_and_print("llm-hub-bench-gateway-", args, run, render)


if __name__ == "__main__":
    main()
