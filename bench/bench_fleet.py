"""Benchmark of routing over a fleet: where the gateway sends calls when boxes differ in what they have loaded.

Three boxes, each a fleet fake LM Studio (tests/fake_lmstudio.py) with its own bridge (`llm-hub serve`),
every process on its own on loopback:

    box 1: fleet/model-a loaded        box 2: fleet/model-a loaded        box 3: fleet/model-b loaded
    every box has model-a, -b and -c downloaded; model-c is loaded nowhere at the start.
    A just-in-time load takes --load-delay seconds (one at a time per box) and evicts the model
    loaded just in time before it (LM Studio's auto-evict); each loaded model runs --parallel
    predictions at once (the rest wait); each of --chunks pieces takes --token-delay seconds.

The same fixed mix of calls (a repeating pattern of models, --mix) is made by --callers concurrent SDK clients
(one session each, --mode era), each taking the next call of the list when its last one ends, along three paths,
each on a fresh fleet (the same start state every time):

    round-robin  through the gateway with LLM_HUB_ROUTING=round-robin
    loaded       through the gateway with LLM_HUB_ROUTING=loaded (the default)
    oracle       straight to a bridge, no gateway: for each call the box that has the model loaded with the
                 fewest of the oracle's calls in flight; a model loaded nowhere goes to the box with the fewest
                 calls in flight, which then counts as having it (the oracle never loads a model twice)

It prints per path the call time (p50, p95), the makespan (first call sent to last answer), the failed calls,
and per box the just-in-time loads and evictions the fake counted, then the targets: JIT loads no more than the
number of models loaded nowhere at the start (1), and p95 within 1.2x the oracle's.

Usage: .venv/bin/python bench/bench_fleet.py [--calls 96] [--callers 16] [--mix ABAC] [--load-delay 2]
       [--token-delay 0.02] [--chunks 20] [--parallel 4] [--spill-ratio 2] [--paths round-robin,loaded,oracle]
       [--mode auto|legacy] [--keep-logs] [--json]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import _common as common
import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

LLM_HUB_GATEWAY = str(Path(sys.executable).with_name("llm-hub-gateway"))
MODELS = {"A": "fleet/model-a", "B": "fleet/model-b", "C": "fleet/model-c"}
TOOLS = {letter: "chat_" + model.replace("/", "_") for letter, model in MODELS.items()}
LOADED_AT_START = [{"A"}, {"A"}, {"B"}]  # per box, by hand: never evicted
PATHS = ("round-robin", "loaded", "oracle")

TARGET_P95_RATIO = 1.2


def loaded_nowhere() -> int:
    return len(set(MODELS) - set().union(*LOADED_AT_START))


# -- processes -----------------------------------------------------------------------------


@dataclass
class Box:
    index: int
    fake_url: str
    bridge_url: str


def fleet_fake(args: argparse.Namespace, box: int, log: TextIO) -> AbstractAsyncContextManager[tuple[str, int]]:
    loaded = ",".join(MODELS[letter] for letter in sorted(LOADED_AT_START[box]))
    return common.fake_lmstudio(
        args.chunks, log, "--models", ",".join(MODELS.values()), "--loaded", loaded,
        "--parallel", str(args.parallel), "--load-delay", str(args.load_delay), "--token-delay", str(args.token_delay),
    )


def bridge(lmstudio_url: str, log: TextIO) -> AbstractAsyncContextManager[tuple[str, int]]:
    port = common.free_port()
    env = common.clean_env(LMSTUDIO_URL=lmstudio_url, LLM_HUB_LOG_LEVEL="WARNING")
    cmd = [common.LLM_HUB, "serve", "--port", str(port)]
    return common.http_server(cmd, port, ready_path="/health", env=env, log=log, what="bridge")


def gateway(bridge_urls: list[str], routing: str, key: str, args: argparse.Namespace,
            log: TextIO) -> AbstractAsyncContextManager[tuple[str, int]]:
    port = common.free_port()
    env = common.clean_env(
        LLM_HUB_API_KEYS=f"bench:{key}",
        LLM_HUB_BRIDGES=",".join(bridge_urls),
        LLM_HUB_ROUTING=routing,
        LLM_HUB_SPILL_RATIO=str(args.spill_ratio),
        LLM_HUB_RATE_LIMIT="1000000/minute",
        LLM_HUB_REQUEST_LIMIT="1000000/minute",
        LLM_HUB_LOG_LEVEL="WARNING",
    )
    cmd = [LLM_HUB_GATEWAY, "--port", str(port)]
    # Ready once every bridge is admitted with its tools (3 chat tools and list_models).
    return common.http_server(
        cmd, port, ready_path="/health", env=env, log=log, what="gateway",
        ready=lambda r: r.status_code == 200 and r.json()["bridges"]["healthy"] == len(bridge_urls)
        and r.json()["tools"] >= len(TOOLS) + 1,
    )


@asynccontextmanager
async def session(url: str, key: str | None, mode: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=300) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        for tool in TOOLS.values():
            await common.wait_for_tool(client, tool)
        yield client


@asynccontextmanager
async def fleet(args: argparse.Namespace, log: Callable[[str], TextIO], name: str) -> AsyncIterator[list[Box]]:
    """Three boxes (fake + bridge each) in their start state, stopped when the path is done."""
    async with AsyncExitStack() as boxes_stack:
        boxes = []
        for i in range(len(LOADED_AT_START)):
            fake_url, _ = await boxes_stack.enter_async_context(fleet_fake(args, i, log(f"{name}-fake-{i + 1}")))
            bridge_url, _ = await boxes_stack.enter_async_context(bridge(fake_url, log(f"{name}-bridge-{i + 1}")))
            boxes.append(Box(i, fake_url, bridge_url))
        yield boxes


async def box_stats(boxes: list[Box]) -> list[dict[str, Any]]:
    async with httpx2.AsyncClient(timeout=10) as http:
        return [(await http.get(f"{box.fake_url}/fake/stats")).json() for box in boxes]


# -- the run -------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    makespan: float = 0.0


Call = Callable[[int, str], Awaitable[None]]  # (caller, model letter)


async def drive(calls: list[str], callers: int, call: Call) -> Tally:
    """`callers` workers take the next call of the list as each finishes its last; every call timed."""
    tally = Tally()
    queue = iter(calls)

    async def worker(caller: int) -> None:
        for letter in queue:
            started = time.perf_counter()
            try:
                await call(caller, letter)
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                tally.failures.append(f"{letter}: {type(exc).__name__}: {exc}"[:300])
            tally.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for caller in range(callers):
            tg.start_soon(worker, caller)
    tally.makespan = time.perf_counter() - started
    return tally


def checked(result: Any, answer: str, letter: str) -> None:
    text = common.text_of(result)
    if result.is_error or text != answer:
        raise RuntimeError(f"unexpected answer for {letter} (is_error={result.is_error}): {text[:200]!r}")


class Oracle:
    """Sends each call to the best box, knowing exactly what is loaded where and what is in flight."""

    def __init__(self, boxes: int) -> None:
        self.loaded = [set(models) for models in LOADED_AT_START[:boxes]]
        self.in_flight = [Counter[str]() for _ in range(boxes)]

    def pick(self, letter: str) -> int:
        boxes = range(len(self.loaded))
        having = [b for b in boxes if letter in self.loaded[b]]
        if not having:
            best = min(boxes, key=lambda b: sum(self.in_flight[b].values()))
            self.loaded[best].add(letter)
            return best
        return min(having, key=lambda b: self.in_flight[b][letter])


async def run_path(path: str, args: argparse.Namespace, calls: list[str], key: str,
                   log: Callable[[str], TextIO], quiet: bool) -> dict[str, Any]:
    answer = common.fake_reply(args.chunks)
    note(f"{path}: starting three boxes" + ("" if path == "oracle" else " and a gateway"), quiet)
    async with fleet(args, log, path) as boxes, AsyncExitStack() as sessions:
        if path == "oracle":
            clients = [[await sessions.enter_async_context(session(f"{box.bridge_url}/mcp", None, args.mode))
                        for box in boxes] for _ in range(args.callers)]
            oracle = Oracle(len(boxes))

            async def call(caller: int, letter: str) -> None:
                box = oracle.pick(letter)
                oracle.in_flight[box][letter] += 1
                try:
                    checked(await clients[caller][box].call_tool(TOOLS[letter], {"prompt": "hi"}), answer, letter)
                finally:
                    oracle.in_flight[box][letter] -= 1
        else:
            gateway_url, _ = await sessions.enter_async_context(
                gateway([box.bridge_url for box in boxes], path, key, args, log(f"{path}-gateway")))
            through = [await sessions.enter_async_context(session(f"{gateway_url}/mcp", key, args.mode))
                       for _ in range(args.callers)]

            async def call(caller: int, letter: str) -> None:
                checked(await through[caller].call_tool(TOOLS[letter], {"prompt": "hi"}), answer, letter)

        note(f"{path}: {len(calls)} calls by {args.callers} callers", quiet)
        tally = await drive(calls, args.callers, call)
        stats = await box_stats(boxes)
    return summarise(tally, stats)


def summarise(tally: Tally, stats: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = tally.latencies
    per_box = [{"loads": sum(s["loads"].values()), "evictions": sum(s["evictions"].values()),
                "loads_by_model": s["loads"], "evictions_by_model": s["evictions"], "requests": s["requests"],
                "loaded_at_end": s["loaded"]} for s in stats]
    return {
        "p50_s": round(common.percentile(seconds, 50), 3),
        "p95_s": round(common.percentile(seconds, 95), 3),
        "max_s": round(max(seconds), 3),
        "makespan_s": round(tally.makespan, 3),
        "calls": len(seconds),
        "failed": len(tally.failures),
        "failures": tally.failures[:5],
        "jit_loads": sum(box["loads"] for box in per_box),
        "evictions": sum(box["evictions"] for box in per_box),
        "boxes": per_box,
    }


_STARTED = time.perf_counter()


def note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"  [{time.perf_counter() - _STARTED:5.1f} s] {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet: bool = args.json
    calls = [args.mix[i % len(args.mix)] for i in range(args.calls)]
    result: dict[str, Any] = {
        "config": {
            "calls": args.calls, "callers": args.callers, "mix": args.mix, "mode": args.mode,
            "load_delay_s": args.load_delay, "token_delay_s": args.token_delay, "chunks": args.chunks,
            "parallel": args.parallel, "spill_ratio": args.spill_ratio,
            "loaded_at_start": [sorted(MODELS[m] for m in box) for box in LOADED_AT_START],
            "calls_per_model": dict(sorted(Counter(MODELS[c] for c in calls).items())),
        },
        "machine": common.machine_info(),
        "paths": {},
    }
    key = secrets.token_urlsafe(24)
    async with AsyncExitStack() as stack:
        log = common.log_files(stack, workdir)
        for path in args.paths:
            result["paths"][path] = await run_path(path, args, calls, key, log, quiet)
    note("done", quiet)
    result["machine"]["loadavg_at_end"] = common.loadavg()
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    paths = result["paths"]
    oracle = paths.get("oracle")
    for path in ("loaded", "round-robin"):
        if path not in paths:
            continue
        row, judged = paths[path], path == "loaded"
        checks.append({"name": f"{path}: JIT loads", "value": row["jit_loads"], "target": f"<= {loaded_nowhere()}",
                       "unit": "", "pass": row["jit_loads"] <= loaded_nowhere(), "judged": judged})
        if oracle:
            ratio = round(row["p95_s"] / oracle["p95_s"], 3)
            checks.append({"name": f"{path}: p95 / oracle p95", "value": ratio, "target": f"<= {TARGET_P95_RATIO:g}",
                           "unit": "x", "pass": ratio <= TARGET_P95_RATIO, "judged": judged})
        checks.append({"name": f"{path}: failed calls", "value": row["failed"], "target": "== 0", "unit": "",
                       "pass": row["failed"] == 0, "judged": judged})
    return checks


def render(result: dict[str, Any]) -> str:
    cfg, machine = result["config"], result["machine"]
    per_model = ", ".join(f"{m} x{n}" for m, n in cfg["calls_per_model"].items())
    at_start = "; ".join(f"{i + 1}: " + (", ".join(models) or "nothing")
                         for i, models in enumerate(cfg["loaded_at_start"]))
    lines = [
        (f"llm-hub fleet benchmark: {cfg['calls']} calls ({per_model}) "
         f"by {cfg['callers']} callers ({cfg['mode']} era), mix {cfg['mix']!r}; {machine['cpus']} CPUs, "
         f"load {machine['loadavg_at_start']} -> {machine['loadavg_at_end']}"),
        (f"boxes: {at_start} "
         f"loaded, every model downloaded; JIT load {cfg['load_delay_s']:g} s, {cfg['chunks']} pieces x "
         f"{cfg['token_delay_s']:g} s, {cfg['parallel']} slots per loaded model; spill ratio {cfg['spill_ratio']:g}"),
        "",
        f"  {'path':<13}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'makespan s':>12}{'failed':>8}{'JIT loads':>11}"
        f"{'evictions':>11}   loads / evictions per box",
    ]
    for path, row in result["paths"].items():
        boxes = "  ".join(f"{i + 1}: {box['loads']}/{box['evictions']}" for i, box in enumerate(row["boxes"]))
        lines.append(f"  {path:<13}{row['p50_s']:>8.2f}{row['p95_s']:>8.2f}{row['max_s']:>8.2f}"
                     f"{row['makespan_s']:>12.2f}{row['failed']:>8}{row['jit_loads']:>11}{row['evictions']:>11}"
                     f"   {boxes}")
    for path, row in result["paths"].items():
        for failure in row["failures"]:
            lines.append(f"  {path} failure: {failure}")
    if machine["loadavg_at_start"][0] > machine["cpus"]:
        lines += ["", (f"Note: load {machine['loadavg_at_start'][0]:g} on {machine['cpus']} CPUs at the start: other "
                       "work shared the machine; the call times are mostly the fakes' (simulated) delays.")]
    lines += ["", "Targets"]
    for t in result["targets"]:
        verdict = ("PASS" if t["pass"] else "MISS") + ("" if t["judged"] else " (info)")
        lines.append(f"  {verdict:<12}{t['name']}: {t['value']:g}{t['unit']} (target {t['target']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=96, help="calls per path (default 96)")
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers, one session each (default 16)")
    parser.add_argument("--mix", default="ABAC", help="the repeating pattern of models called (default ABAC)")
    parser.add_argument("--load-delay", type=float, default=2.0, help="seconds a JIT load takes (default 2)")
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds per streamed piece (default 0.02)")
    parser.add_argument("--chunks", type=int, default=20, help="pieces per answer (default 20)")
    parser.add_argument("--parallel", type=int, default=4, help="slots per loaded model (default 4)")
    parser.add_argument("--spill-ratio", type=float, default=2.0, help="the gateway's LLM_HUB_SPILL_RATIO (2)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--mode", choices=["auto", "legacy"], default="auto",
                        help="client era: auto (2026-07-28, the gateway's fast path) or legacy (handshake)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and say where")
    parser.add_argument("--json", action="store_true", help="print only the JSON result (else the table, then it)")
    args = parser.parse_args()
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown := set(args.paths) - set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if unknown := set(args.mix) - set(MODELS):
        parser.error(f"--mix may use only {', '.join(MODELS)}, not {', '.join(sorted(unknown))}")
    if min(args.calls, args.callers, args.chunks, args.parallel) < 1 or not args.mix:
        parser.error("counts must be positive and --mix not empty")

    common.run_and_print("llm-hub-bench-fleet-", args, run, render)


if __name__ == "__main__":
    main()
