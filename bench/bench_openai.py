"""Benchmark of the OpenAI API through llm-hub: `POST /v1/chat/completions` to the fake LM Studio directly,
and through the gateway and a bridge in front of it.

Every process runs on its own on loopback, as in a deployment on one host:

    fake LM Studio (tests/fake_lmstudio.py, 5 short pieces, no delay)
      <- one bridge (`llm-hub serve`, its OpenAI relay)
           <- the gateway (`llm-hub-gateway`, API key, rate limits set out of the way)

The client is one `httpx2.AsyncClient` per path sending the same chat request, either to the fake (the
baseline) or to the gateway: both hops are in the added figures. Measured in one run:
  1. latency at concurrency 1 of a whole (non-streamed) answer: p50, p99, and what the two hops add;
  2. calls/s with 32 calls in flight (non-streamed), gateway / direct;
  3. time to first token of a streamed answer (the first chunk with text), at concurrency 1.
The two paths run in alternating blocks, the order flipping every round, so the noise of a shared 2-core
machine falls on both alike. CPU time of each process is read from /proc around every block.

Usage: .venv/bin/python bench/bench_openai.py [--calls 400] [--block 25] [--tp-calls 320] [--tp-rounds 6]
       [--concurrency 32] [--warmup 50] [--keep-logs] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import anyio
import httpx2

CHUNKS = 5
EXPECTED = common.fake_reply(CHUNKS)
BODY = {"model": common.MODEL, "messages": [{"role": "user", "content": "hi"}]}
STREAMED = json.dumps({**BODY, "stream": True}).encode()
WHOLE = json.dumps(BODY).encode()
ROUTES = ("direct", "gateway")
PROCESSES = ("client", "gateway", "bridge", "fake")
# Targets from issue 10 ("How it will be checked").
ADDED_P50_MS = 3.0
ADDED_TTFT_MS = 3.0
THROUGHPUT_RATIO = 0.4


async def whole(http: httpx2.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", content=WHOLE)
    if response.status_code != 200 or response.json()["choices"][0]["message"]["content"] != EXPECTED:
        raise RuntimeError(f"unexpected answer {response.status_code}: {response.text[:300]}")


async def first_token(http: httpx2.AsyncClient) -> float:
    """Seconds to the first chunk with text; the stream is then read to its end, so its connection is reused."""
    started = time.perf_counter()
    ttft = None
    text = []
    async with http.stream("POST", "/v1/chat/completions", content=STREAMED) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choices = json.loads(line[5:])["choices"]
            piece = choices[0]["delta"].get("content") if choices else None
            if piece:
                ttft = ttft or time.perf_counter() - started
                text.append(piece)
    if ttft is None or "".join(text) != EXPECTED:
        raise RuntimeError(f"unexpected stream: {''.join(text)!r}")
    return ttft


@dataclass
class Tally:
    calls: int = 0
    seconds: float = 0.0
    samples: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROCESSES, 0.0))

    def cpu_ms_per_call(self) -> dict[str, float]:
        return {name: round(used / self.calls * 1000, 3) for name, used in self.cpu.items()}


Block = Callable[[httpx2.AsyncClient], Awaitable[tuple[int, float, list[float]]]]


def sequential(calls: int, measure: Callable[[httpx2.AsyncClient], Awaitable[float | None]]) -> Block:
    async def block(http: httpx2.AsyncClient) -> tuple[int, float, list[float]]:
        samples = []
        started = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            value = await measure(http)
            samples.append(time.perf_counter() - t0 if value is None else value)
        return calls, time.perf_counter() - started, samples

    return block


def concurrent(calls: int, concurrency: int) -> Block:
    async def block(http: httpx2.AsyncClient) -> tuple[int, float, list[float]]:
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await whole(http)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return calls, time.perf_counter() - started, []

    return block


async def interleaved(
    clients: dict[str, httpx2.AsyncClient], pids: dict[str, int], block: Block, rounds: int
) -> dict[str, Tally]:
    tallies = {route: Tally() for route in ROUTES}
    for i in range(rounds):
        for route in ROUTES if i % 2 == 0 else ROUTES[::-1]:
            before = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
            calls, seconds, samples = await block(clients[route])
            tally = tallies[route]
            tally.calls += calls
            tally.seconds += seconds
            tally.samples += samples
            for name, pid in pids.items():
                tally.cpu[name] += common.cpu_seconds(pid) - before[name]
    return tallies


def latency(tallies: dict[str, Tally]) -> dict[str, Any]:
    summary = {route: common.summary_ms(t.samples) for route, t in tallies.items()}
    return {
        **summary,
        "added_p50_ms": round(summary["gateway"]["p50_ms"] - summary["direct"]["p50_ms"], 3),
        "added_p99_ms": round(summary["gateway"]["p99_ms"] - summary["direct"]["p99_ms"], 3),
        "cpu_ms_per_call": {route: t.cpu_ms_per_call() for route, t in tallies.items()},
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet: bool = args.json
    rounds = max(1, -(-args.calls // args.block))
    key = secrets.token_urlsafe(24)
    result: dict[str, Any] = {
        "config": {
            "calls_c1": rounds * args.block,
            "block": args.block,
            "tp_calls": args.tp_calls,
            "tp_rounds": args.tp_rounds,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "chunks": CHUNKS,
            "model": common.MODEL,
        },
        "machine": common.machine_info(),
    }
    async with AsyncExitStack() as stack:
        log = common.log_files(stack, workdir)
        fake_url, fake_pid = await stack.enter_async_context(common.fake_lmstudio(CHUNKS, log("fake")))
        bridge_url, bridge_pid = await stack.enter_async_context(common.bridge(fake_url, log("bridge")))
        gateway_url, gateway_pid = await stack.enter_async_context(common.gateway(bridge_url, key, log("gateway")))
        pids = {"client": os.getpid(), "gateway": gateway_pid, "bridge": bridge_pid, "fake": fake_pid}
        limits = httpx2.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
        headers = {"Content-Type": "application/json"}
        clients = {
            "direct": await stack.enter_async_context(
                httpx2.AsyncClient(base_url=fake_url, headers=headers, limits=limits, timeout=60)
            ),
            "gateway": await stack.enter_async_context(
                httpx2.AsyncClient(
                    base_url=gateway_url,
                    headers={**headers, "Authorization": f"Bearer {key}"},
                    limits=limits,
                    timeout=60,
                )
            ),
        }
        common.note("warming up", quiet)
        for http in clients.values():
            for _ in range(args.warmup):
                await whole(http)
                await first_token(http)

        common.note(f"latency at concurrency 1: {rounds} rounds of {args.block} calls per path", quiet)
        result["latency_c1"] = latency(await interleaved(clients, pids, sequential(args.block, _timed), rounds))
        common.note(f"time to first token, streamed: {rounds} rounds of {args.block} calls per path", quiet)
        result["ttft"] = latency(await interleaved(clients, pids, sequential(args.block, first_token), rounds))
        common.note(
            f"throughput: {args.tp_rounds} rounds of {args.tp_calls} calls, {args.concurrency} in flight", quiet
        )
        tallies = await interleaved(clients, pids, concurrent(args.tp_calls, args.concurrency), args.tp_rounds)
        rates = {route: t.calls / t.seconds for route, t in tallies.items()}
        cpu = {route: sum(t.cpu.values()) / t.calls for route, t in tallies.items()}
        result["throughput"] = {
            "direct_calls_per_s": round(rates["direct"], 1),
            "gateway_calls_per_s": round(rates["gateway"], 1),
            "ratio": round(rates["gateway"] / rates["direct"], 3),
            "cpu_ratio": round(cpu["direct"] / cpu["gateway"], 3),
            "cpu_ms_per_call": {route: t.cpu_ms_per_call() for route, t in tallies.items()},
        }
    result["machine"]["loadavg_at_end"] = common.loadavg()
    result["targets"] = [
        _target("added p50 at concurrency 1", result["latency_c1"]["added_p50_ms"], "<=", ADDED_P50_MS, "ms"),
        _target("added time to first token (p50)", result["ttft"]["added_p50_ms"], "<=", ADDED_TTFT_MS, "ms"),
        _target(
            f"throughput ratio, {args.concurrency} in flight", result["throughput"]["ratio"], ">=", THROUGHPUT_RATIO, ""
        ),
    ]
    return result


async def _timed(http: httpx2.AsyncClient) -> None:
    await whole(http)


def _target(name: str, value: float, op: str, target: float, unit: str) -> dict[str, Any]:
    met = value <= target if op == "<=" else value >= target
    return {"name": name, "value": value, "target": f"{op} {target:g}{unit and ' ' + unit}", "met": met}


def render(result: dict[str, Any]) -> str:
    c1, ttft, tp = result["latency_c1"], result["ttft"], result["throughput"]
    lines = [
        f"machine: {result['machine']}",
        "",
        "| what | direct | gateway + bridge | added |",
        "| --- | --- | --- | --- |",
        (
            f"| whole answer, p50 / p99 (ms) | {c1['direct']['p50_ms']} / {c1['direct']['p99_ms']} | "
            f"{c1['gateway']['p50_ms']} / {c1['gateway']['p99_ms']} | {c1['added_p50_ms']:+} / {c1['added_p99_ms']:+} |"
        ),
        (
            f"| time to first token, p50 / p99 (ms) | {ttft['direct']['p50_ms']} / {ttft['direct']['p99_ms']} | "
            f"{ttft['gateway']['p50_ms']} / {ttft['gateway']['p99_ms']} | {ttft['added_p50_ms']:+} / "
            f"{ttft['added_p99_ms']:+} |"
        ),
        (
            f"| calls/s, {result['config']['concurrency']} in flight | {tp['direct_calls_per_s']} | "
            f"{tp['gateway_calls_per_s']} | ratio {tp['ratio']} (CPU ratio {tp['cpu_ratio']}) |"
        ),
        (
            f"| CPU ms per call, 32 in flight (client, gateway, bridge, fake) | "
            f"{_cpu(tp['cpu_ms_per_call']['direct'])} | {_cpu(tp['cpu_ms_per_call']['gateway'])} | |"
        ),
        "",
    ]
    for target in result["targets"]:
        lines.append(
            f"{target['name']}: {target['value']} (target {target['target']}): {'met' if target['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


def _cpu(per_process: dict[str, float]) -> str:
    return ", ".join(f"{per_process[name]:.2f}" for name in PROCESSES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per path at concurrency 1 (default 400)")
    parser.add_argument("--block", type=int, default=25, help="calls per block at concurrency 1 (default 25)")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per path first (default 50)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in the throughput phase (32)")
    parser.add_argument("--tp-calls", type=int, default=320, help="calls per throughput block (default 320)")
    parser.add_argument("--tp-rounds", type=int, default=6, help="throughput blocks per path (default 6)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and say where")
    parser.add_argument("--json", action="store_true", help="print only the JSON result (else the table, then it)")
    common.run_and_print("llm-hub-bench-openai-", parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
