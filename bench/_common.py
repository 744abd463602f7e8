"""What the benchmarks beside this file share: the fake LM Studio, server processes, /proc readers, statistics.

The scripts run as `python bench/<script>.py`, which puts this folder first on sys.path, so they import it
as `_common`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp import Client

FAKE_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "fake_lmstudio.py"
LLM_HUB = str(Path(sys.executable).with_name("llm-hub"))
MODEL = "google/gemma-3-270m"
CHAT_TOOL = "chat_google_gemma-3-270m"
PIECE = "tok"  # the fake's --chunks pieces are "tok{i} "


def fake_reply(chunks: int) -> str:
    """The whole text the fake streams when started with `--chunks chunks`."""
    return "".join(f"{PIECE}{i} " for i in range(chunks))


# -- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "max_ms": round(max(ms), 3),
        "n": len(ms),
    }


# -- the machine and /proc -----------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg_at_start": loadavg(), "python": sys.version.split()[0]}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (in clock ticks, usually of 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "LM_API"))}
    return env | extra


@contextmanager
def server_logs(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A folder for the servers' logs: kept, and named, when the run fails; else removed unless `keep`."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield workdir
    except KeyboardInterrupt:
        print(f"interrupted; server logs kept in {workdir}", file=sys.stderr)
        raise
    except BaseException:
        print(f"benchmark failed; server logs kept in {workdir}", file=sys.stderr)
        raise
    if keep:
        print(f"server logs in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def log_files(stack: AsyncExitStack, workdir: Path) -> Callable[[str], TextIO]:
    """`log(name)` opens `workdir/name.log` for a server's output, closed with `stack`."""

    def log(name: str) -> TextIO:
        return stack.enter_context(open(workdir / f"{name}.log", "a"))

    return log


@asynccontextmanager
async def spawned(cmd: list[str], *, env: dict[str, str], log: TextIO,
                  capture_stdout: bool = False) -> AsyncIterator[anyio.abc.Process]:
    process = await anyio.open_process(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture_stdout else log, stderr=log,
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


async def wait_http(url: str, ok: Callable[[httpx2.Response], bool], process: anyio.abc.Process, what: str,
                    timeout: float = 30) -> None:
    async with httpx2.AsyncClient(timeout=2) as http:
        with anyio.fail_after(timeout):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
                try:
                    if ok(await http.get(url)):
                        return
                except httpx2.TransportError:
                    pass
                await anyio.sleep(0.05)


@asynccontextmanager
async def fake_lmstudio(chunks: int, log: TextIO, *extra: str) -> AsyncIterator[tuple[str, int]]:
    """The fake on a port of its choosing; yields (base URL, pid) once it answers. `extra` options come last,
    so they override (`"--models", "a/b,c/d"`) or add fleet behaviour (`"--load-delay", "2"`)."""
    cmd = [sys.executable, str(FAKE_SCRIPT), "--port", "0", "--models", MODEL, "--chunks", str(chunks), *extra]
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
        await wait_http(f"{url}/v1/models", lambda r: r.status_code == 200, process, "fake LM Studio")
        yield url, process.pid


@asynccontextmanager
async def http_server(cmd: list[str], port: int, *, ready_path: str, env: dict[str, str], log: TextIO, what: str,
                      ready: Callable[[httpx2.Response], bool] = lambda r: r.status_code == 200,
                      ) -> AsyncIterator[tuple[str, int]]:
    """A server subprocess listening on `port`; yields (base URL, pid) once `ready_path` answers as `ready` wants."""
    async with spawned(cmd, env=env, log=log) as process:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + ready_path, ready, process, what)
        yield base, process.pid


LLM_HUB_GATEWAY = str(Path(sys.executable).with_name("llm-hub-gateway"))


def bridge(lmstudio_url: str, log: TextIO) -> AbstractAsyncContextManager[tuple[str, int]]:
    """`llm-hub serve` in front of `lmstudio_url`, logging warnings only; ready once it has built its tools."""
    port = free_port()
    env = clean_env(LMSTUDIO_URL=lmstudio_url, LLM_HUB_LOG_LEVEL="WARNING")
    cmd = [LLM_HUB, "serve", "--port", str(port)]
    # 200 once the bridge has polled LM Studio and built its tools.
    return http_server(cmd, port, ready_path="/health", env=env, log=log, what="bridge")


def gateway(bridge_url: str, key: str, log: TextIO) -> AbstractAsyncContextManager[tuple[str, int]]:
    """`llm-hub-gateway` in front of one bridge, the key `bench:<key>`, rate limits out of the way."""
    port = free_port()
    env = clean_env(
        LLM_HUB_API_KEYS=f"bench:{key}",
        LLM_HUB_RATE_LIMIT="1000000/minute",
        LLM_HUB_REQUEST_LIMIT="1000000/minute",
        LLM_HUB_LOG_LEVEL="WARNING",
    )
    cmd = [LLM_HUB_GATEWAY, "--bridge", bridge_url, "--port", str(port)]
    # 200 once a bridge is admitted; its tools are loaded before it is.
    return http_server(cmd, port, ready_path="/health", env=env, log=log, what="gateway",
                       ready=lambda r: r.status_code == 200 and r.json()["tools"] > 1)


# -- MCP clients ---------------------------------------------------------------------------


async def wait_for_tool(client: Client, name: str, timeout: float = 30) -> None:
    """The bridge discovers models in the background after the handshake."""
    with anyio.fail_after(timeout):
        while name not in {t.name for t in (await client.list_tools()).tools}:
            await anyio.sleep(0.05)


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


# -- output --------------------------------------------------------------------------------

_STARTED = time.perf_counter()


def note(text: str, quiet: bool) -> None:
    """A progress line on stderr, with the seconds since the run started; nothing when `quiet`."""
    if not quiet:
        print(f"  [{time.perf_counter() - _STARTED:5.1f} s] {text}", file=sys.stderr, flush=True)



def print_result(result: dict[str, Any], render: Callable[[dict[str, Any]], str], json_only: bool) -> None:
    """The table, a blank line, then the JSON indented; or the JSON alone on one line."""
    if not json_only:
        print(render(result))
        print()
    print(json.dumps(result, indent=None if json_only else 1))


def run_and_print(
    prefix: str, args: Any, run: Callable[[Any, Path], Awaitable[dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
) -> None:
    """Run a benchmark (`args.keep_logs`, `args.json`), print its result; exit 1 on failure, 130 on Ctrl-C."""
    try:
        with server_logs(prefix, keep=args.keep_logs) as workdir:
            result = anyio.run(run, args, workdir)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - reported, then a non-zero exit
        # Many sessions nest their task groups: show the errors themselves, not levels of groups.
        for error in leaf_errors(exc):
            traceback.print_exception(error, file=sys.stderr)
        raise SystemExit(1) from None
    print_result(result, render, args.json)


def leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_errors(inner)]
    return [exc]
