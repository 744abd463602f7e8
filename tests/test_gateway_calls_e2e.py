"""The gateway's call path under faults, with real processes: a gateway in front of two bridges, each on a
fake LM Studio, driven by the SDK's Client in both eras and by plain HTTP.

Calls are held mid-answer by the fakes' gate (they stop before their last piece), so "in flight" is a
fact the test waits for, not a guess about timing; outcomes are counted, never timed.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import bridge_process, fake_process, free_port, gateway_process
from tests.fake_lmstudio import DEFAULT_CHUNKS, FakeLMStudio, FakeModel, marker
from tests.test_gateway_e2e import (
    ALPHA,
    AUTH,
    BETA,
    KEY,
    SHARED,
    Topology,
    _text,
    gateway_client,
    topology,
)

pytestmark = pytest.mark.anyio

ANSWER = "".join(DEFAULT_CHUNKS)
# Out of the way of these tests; the limits have their own (test_gateway_limits_e2e.py).
LIMITS = {"LLM_HUB_RATE_LIMIT": "100000/minute", "LLM_HUB_REQUEST_LIMIT": "100000/minute"}
# Held streams send nothing for a while: keep the bridge's LM Studio deadline well beyond that.
BRIDGE_ENV = {"LLM_HUB_REQUEST_TIMEOUT": "120"}


@asynccontextmanager
async def fleet(tmp_path: Path, *, fakes: dict[str, FakeLMStudio] | None = None, tools: set[str] | None = None,
                **gateway_env: str) -> AsyncIterator[Topology]:
    async with topology(tmp_path, {**LIMITS, **gateway_env}, BRIDGE_ENV, fakes=fakes, tools=tools) as top:
        yield top


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30) -> None:
    """Wait for `condition` (polled), failing with `what` after `timeout` seconds."""
    try:
        with anyio.fail_after(timeout):
            while True:
                result = condition()
                if result if isinstance(result, bool) else await result:
                    return
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def hold(top: Topology) -> None:
    for fake in top.fakes.values():
        fake.gate = anyio.Event()


def release(top: Topology) -> None:
    for fake in top.fakes.values():
        if fake.gate is not None:
            fake.gate.set()


def held(top: Topology, model: str) -> int:
    """Streams the fakes are running for `model` right now (held at the gate, once it is closed)."""
    return sum(fake.slots(model).active for fake in top.fakes.values())


def _log_problems(log: Path) -> list[str]:
    """The gateway's warnings and errors, for a failure message that explains itself."""
    lines = log.read_text(errors="replace").splitlines()
    return [line[:400] for line in lines if '"WARNING"' in line or '"ERROR"' in line or "Traceback" in line][-40:]


def prompts_seen(fake: FakeLMStudio) -> list[str]:
    return [r["json"]["messages"][-1]["content"] for r in fake.requests if r["path"] == "/v1/chat/completions"]


async def bridge_states(top_or_url: Topology | str) -> dict[str, dict[str, Any]]:
    gateway = top_or_url if isinstance(top_or_url, str) else top_or_url.gateway
    async with httpx2.AsyncClient(headers=AUTH) as http:
        return {b["url"]: b for b in (await http.get(f"{gateway}/v1/bridges")).json()["bridges"]}


async def tool_states(gateway: str) -> dict[str, dict[str, Any]]:
    async with httpx2.AsyncClient(headers=AUTH) as http:
        return {t["name"]: t for t in (await http.get(f"{gateway}/v1/tools")).json()["tools"]}


def ejections(top: Topology) -> list[str]:
    return [line for line in (top.logs / "gateway.log").read_text().splitlines() if "ejected" in line]


# -- calls that record what their caller saw ------------------------------------------------------


@dataclass
class Outcome:
    ok: bool = False
    done: bool = False
    progress: int = 0  # progress messages with text the caller received
    detail: str = ""


class Calls:
    """Calls started in the background, each under a label; `outcomes[label]` says how it went."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        self.outcomes: dict[str, Outcome] = {}

    def mcp(self, label: str, client: Client, tool: str, *, progress: bool = True) -> None:
        outcome = self.outcomes[label] = Outcome()

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            outcome.progress += bool(message)

        async def call() -> None:
            try:
                callback = on_progress if progress else None
                result = await client.call_tool(tool, {"prompt": label}, progress_callback=callback)
                outcome.ok, outcome.detail = not result.is_error and _text(result) == ANSWER, _text(result)
            except Exception as exc:  # noqa: BLE001 - recorded; the test judges
                outcome.detail = f"{type(exc).__name__}: {exc}"
            outcome.done = True

        self.tg.start_soon(call)

    def rest(self, label: str, http: httpx2.AsyncClient, tool: str, *, stream: bool = False) -> None:
        outcome = self.outcomes[label] = Outcome()

        async def call() -> None:
            try:
                if stream:
                    result = await self._rest_stream(http, tool, label, outcome)
                else:
                    response = await http.post(f"/v1/tools/{tool}", json={"prompt": label})
                    outcome.detail = f"{response.status_code} {response.text[:300]}"
                    result = response.json() if response.status_code == 200 else None
                if result is not None:
                    outcome.ok = not result.get("isError") and result["structuredContent"]["text"] == ANSWER
                    outcome.detail = json.dumps(result)[:300]
            except Exception as exc:  # noqa: BLE001 - recorded; the test judges
                outcome.detail = f"{type(exc).__name__}: {exc}"
            outcome.done = True

        self.tg.start_soon(call)

    @staticmethod
    async def _rest_stream(http: httpx2.AsyncClient, tool: str, label: str, outcome: Outcome) -> dict[str, Any] | None:
        event = None
        async with http.stream("POST", f"/v1/tools/{tool}", json={"prompt": label},
                               headers={"Accept": "text/event-stream"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "progress":
                    outcome.progress += bool(json.loads(line[5:])["message"])
                elif line.startswith("data:") and event == "result":
                    return json.loads(line[5:])
        return None

    def labels(self, *, ok: bool) -> set[str]:
        return {label for label, outcome in self.outcomes.items() if outcome.ok is ok}

    def failures(self) -> dict[str, str]:
        return {label: o.detail for label, o in self.outcomes.items() if not o.ok}

    def all_done(self) -> bool:
        return all(o.done for o in self.outcomes.values())


def rest_client(top: Topology) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url=top.gateway, headers=AUTH, timeout=60)


async def held_fleet(stack: AsyncExitStack, tmp_path: Path) -> tuple[Topology, dict[str, Client], httpx2.AsyncClient]:
    """A fleet, an SDK client per era and a REST client, opened on `stack`, with the fakes' gate closed."""
    top = await stack.enter_async_context(fleet(tmp_path))
    clients = {mode: await stack.enter_async_context(gateway_client(top, mode)) for mode in ("legacy", "auto")}
    http = await stack.enter_async_context(rest_client(top))
    hold(top)
    return top, clients, http


# -- poison: input no JSON encoder writes back ---------------------------------------------------

PLACEHOLDER = "__poison__"
# name -> (the arguments, the raw JSON put where the placeholder is, the argument the error must name)
POISONS = {
    "lone surrogate": ({"prompt": PLACEHOLDER}, '"\\ud800"', "prompt"),
    "300-deep nesting": ({"prompt": "hi", "stop": PLACEHOLDER}, "[" * 300 + "]" * 300, "stop"),
    "NaN": ({"prompt": "hi", "temperature": PLACEHOLDER}, "NaN", "temperature"),
}


def poisoned_body(arguments: dict[str, Any], raw: str) -> bytes:
    return json.dumps(arguments).replace(f'"{PLACEHOLDER}"', raw).encode()


class Poisoning(httpx2.AsyncBaseTransport):
    """Puts raw JSON where the placeholder string is in a request body: the SDK's client itself would
    refuse to encode a lone surrogate, NaN or 300 levels of nesting, but another client may send them."""

    def __init__(self, raw: str) -> None:
        self.raw = raw.encode()
        self.inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        placeholder = f'"{PLACEHOLDER}"'.encode()
        if placeholder in body:
            headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
            request = httpx2.Request(request.method, request.url, headers=headers,
                                     content=body.replace(placeholder, self.raw), extensions=request.extensions)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def poisoning_client(top: Topology, mode: str, raw: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers=AUTH, timeout=60, transport=Poisoning(raw)) as http:
        async with Client(streamable_http_client(f"{top.gateway}/mcp", http_client=http), mode=mode) as client:
            yield client


async def test_poison_calls_are_refused_at_the_edge_and_harm_no_call_in_flight(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        top = await stack.enter_async_context(fleet(tmp_path))
        sessions = {mode: [await stack.enter_async_context(gateway_client(top, mode)) for _ in range(2)]
                    for mode in ("legacy", "auto")}
        http = await stack.enter_async_context(rest_client(top))
        hold(top)
        async with anyio.create_task_group() as tg:
            calls = Calls(tg)
            for i in range(40):
                kind = ("legacy", "auto", "sse")[i % 3]
                if kind == "sse":
                    calls.rest(f"stream {i}", http, SHARED, stream=True)
                else:
                    calls.mcp(f"stream {i}", sessions[kind][i % 2], SHARED)
            await until(lambda: held(top, "shared/model") == 40 and all(o.progress for o in calls.outcomes.values()),
                        "40 streams in flight, each with text at its caller")

            wrong: list[str] = []  # every path is tried before the test judges, so one run shows them all
            for name, (arguments, raw, argument) in POISONS.items():
                response = await http.post(f"/v1/tools/{SHARED}", content=poisoned_body(arguments, raw),
                                           headers={"Content-Type": "application/json"})
                error = response.json().get("error") if response.status_code == 400 else None
                if not (isinstance(error, str) and argument in error):
                    wrong.append(f"REST, {name}: {response.status_code} {response.text[:200]}")
                for mode in ("legacy", "auto"):
                    async with poisoning_client(top, mode, raw) as poisoned:
                        try:
                            result = await poisoned.call_tool(SHARED, arguments)
                            text = _text(result)[:200]
                            wrong.append(f"MCP {mode}, {name}: a result (is_error={result.is_error}) {text}")
                        except MCPError as exc:
                            if exc.code != types.INVALID_PARAMS or argument not in exc.message:
                                wrong.append(f"MCP {mode}, {name}: error {exc.code} {exc.message[:200]}")

            assert sum(len(fake.requests) for fake in top.fakes.values()) == 40  # no poison reached LM Studio
            assert all(b["healthy"] and not b["last_error"] for b in (await bridge_states(top)).values())
            assert not ejections(top)
            assert all(t["available"] for t in (await tool_states(top.gateway)).values())
            release(top)
        assert not calls.failures(), calls.failures()
        assert len(calls.outcomes) == 40
    assert not ejections(top)
    assert not wrong, "\n".join(wrong)


async def test_a_malformed_chunk_fails_that_call_alone(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        top, clients, http = await held_fleet(stack, tmp_path)
        async with anyio.create_task_group() as tg:
            calls = Calls(tg)
            for i in range(20):  # ALPHA lives behind bridge a only
                if i % 3 == 2:
                    calls.rest(f"call {i}", http, ALPHA)
                else:
                    calls.mcp(f"call {i}", clients[("legacy", "auto")[i % 3]], ALPHA)
            await until(lambda: held(top, "alpha/only") == 20, "20 calls held on bridge a")

            for mode, client in clients.items():
                broken = await client.call_tool(ALPHA, {"prompt": f"break {marker('malformed_midstream')}"})
                assert broken.is_error, (mode, _text(broken))
                assert "not valid JSON" in _text(broken), (mode, _text(broken))
            await until(lambda: held(top, "alpha/only") == 20, "the broken calls' streams closed")
            assert not any(o.done for o in calls.outcomes.values())
            assert all(b["healthy"] for b in (await bridge_states(top)).values())
            release(top)
        assert not calls.failures(), calls.failures()
        assert top.served_by("a") == 22 and top.served_by("b") == 0
        assert not ejections(top)


async def test_a_bridge_killed_under_load_fails_only_calls_already_streaming_to_their_caller(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        top, clients, http = await held_fleet(stack, tmp_path)
        async with anyio.create_task_group() as tg:
            calls = Calls(tg)
            for i in range(12):  # text streams to these callers as it comes
                calls.mcp(f"streamed {i}", clients[("legacy", "auto")[i % 2]], SHARED)
            for i in range(4):  # MCP calls without a progress token: their callers receive nothing until the end
                calls.mcp(f"quiet {i}", clients[("legacy", "auto")[i % 2]], SHARED, progress=False)
            for i in range(8):  # REST JSON: nothing reaches the caller before the result
                calls.rest(f"json {i}", http, SHARED)
            streamed = {label for label in calls.outcomes if label.startswith("streamed")}
            await until(lambda: held(top, "shared/model") == 24
                        and all(calls.outcomes[label].progress for label in streamed),
                        "24 calls in flight over both bridges, text at every streamed caller")
            on_a = set(prompts_seen(top.fakes["a"]))
            on_b_streamed = set(prompts_seen(top.fakes["b"])) & streamed
            assert on_a & streamed and on_b_streamed, "routing put every streamed call on one bridge"

            await top.kill("a")
            for i in range(8):  # sent after the kill, before the gateway may know: retried or routed to b
                if i % 2:
                    calls.rest(f"late json {i}", http, SHARED)
                else:
                    calls.mcp(f"late {i}", clients[("legacy", "auto")[i % 4 // 2]], SHARED)
            # Every call either ended or waits on b (retried there, or sent there after the kill).
            await until(lambda: top.fakes["b"].slots("shared/model").active
                        + sum(o.done for o in calls.outcomes.values()) == len(calls.outcomes),
                        "every call ended or held on bridge b")
            release(top)
        failed = calls.labels(ok=False)
        details = calls.failures()
        unexpected = {label: details.get(label, "succeeded") for label in failed ^ (on_a & streamed)}
        assert failed == on_a & streamed, (unexpected, _log_problems(top.logs / "gateway.log"))
        assert all(calls.outcomes[label].detail for label in failed)  # the caller is told why


async def test_list_changed_on_ejection_by_a_failed_call_and_on_readmission(tmp_path: Path) -> None:
    heard = {"legacy": 0, "auto": 0}

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            heard["legacy"] += 1

    # Health checks far apart: only the failed call can tell the gateway that bridge a is gone.
    async with AsyncExitStack() as stack:
        top = await stack.enter_async_context(fleet(tmp_path, LLM_HUB_HEALTH_INTERVAL="60"))
        legacy = await stack.enter_async_context(gateway_client(top, "legacy", message_handler=on_message))
        auto = await stack.enter_async_context(gateway_client(top, "auto"))
        assert auto.protocol_version.startswith("2026") and not legacy.protocol_version.startswith("2026")
        await legacy.list_tools()
        subscription = await stack.enter_async_context(auto.listen(tools_list_changed=True))
        async with anyio.create_task_group() as tg:

            async def count_events() -> None:
                async for _event in subscription:
                    heard["auto"] += 1

            tg.start_soon(count_events)
            await top.kill("a")
            async with rest_client(top) as http:
                failed = await http.post(f"/v1/tools/{ALPHA}", json={"prompt": "hi"})
            assert failed.status_code != 200 or failed.json()["isError"], failed.text
            await until(lambda: heard["legacy"] >= 1 and heard["auto"] >= 1, "list_changed after the ejection", 15)
            assert (await bridge_states(top))[top.bridge_url("a")]["healthy"] is False
            assert ALPHA in {t.name for t in (await legacy.list_tools()).tools}  # listed, marked unavailable

            before = dict(heard)
            await top.restart("a")
            await until(lambda: heard["legacy"] > before["legacy"] and heard["auto"] > before["auto"],
                        "list_changed after the re-admission", 30)
            assert (await bridge_states(top))[top.bridge_url("a")]["healthy"] is True
            assert (await tool_states(top.gateway))[ALPHA]["available"] is True
            assert not (await auto.call_tool(ALPHA, {"prompt": "hi"})).is_error
            tg.cancel_scope.cancel()


async def test_a_tool_whose_only_lm_studio_is_down_stays_listed_and_says_why(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        alpha, alpha_url = await stack.enter_async_context(fake_process("--models", "alpha/only"))
        _, beta_url = await stack.enter_async_context(fake_process("--models", "beta/only"))
        ports = {"a": free_port(), "b": free_port()}
        for name, url in (("a", alpha_url), ("b", beta_url)):
            await stack.enter_async_context(bridge_process(url, ports[name], tmp_path / f"bridge-{name}.log"))
        gateway = f"http://127.0.0.1:{free_port()}"
        await stack.enter_async_context(gateway_process(
            [f"http://127.0.0.1:{port}" for port in ports.values()], int(gateway.rsplit(":", 1)[1]),
            tmp_path / "gateway.log", LLM_HUB_API_KEYS=f"tester:{KEY}", **LIMITS))
        await until(lambda: _listed(gateway, {ALPHA, BETA}), "both tools listed")

        alpha.kill()
        await alpha.wait()
        await until(lambda: _unavailable(gateway, ALPHA), f"{ALPHA} marked unavailable")
        bridge_a = f"127.0.0.1:{ports['a']}"
        tools = await tool_states(gateway)
        assert tools[ALPHA]["available"] is False and tools[BETA]["available"] is True
        assert bridge_a in tools[ALPHA]["bridges"]

        async with httpx2.AsyncClient(base_url=gateway, headers=AUTH, timeout=30) as http:
            refused = await http.post(f"/v1/tools/{ALPHA}", json={"prompt": "hi"})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert bridge_a in error and "LM Studio" in error, error
            assert (await http.post(f"/v1/tools/{BETA}", json={"prompt": "hi"})).json()["isError"] is False

        for mode in ("legacy", "auto"):
            async with httpx2.AsyncClient(headers=AUTH, timeout=60) as http, Client(
                    streamable_http_client(f"{gateway}/mcp", http_client=http), mode=mode) as client:
                assert ALPHA in {t.name for t in (await client.list_tools()).tools}
                result = await client.call_tool(ALPHA, {"prompt": "hi"})
                assert result.is_error, (mode, _text(result))
                assert bridge_a in _text(result) and "LM Studio" in _text(result), (mode, _text(result))


async def _listed(gateway: str, names: set[str]) -> bool:
    return names <= set(await tool_states(gateway))


async def _unavailable(gateway: str, name: str) -> bool:
    return (await tool_states(gateway)).get(name, {}).get("available") is False


# -- routing: to where the model is loaded ------------------------------------------------------

MODEL_A, TOOL_A = "fleet/model-a", "chat_fleet_model-a"


def metric(text: str, name: str, bridge_port: int, model: str) -> float:
    """The value of `name{bridge=..., model=...}`; the bridge label ends with the bridge's port."""
    for line in text.splitlines():
        found = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if found:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
            if labels.get("model") == model and labels.get("bridge", "").endswith(f":{bridge_port}"):
                return float(found.group(2))
    return 0.0


@pytest.mark.parametrize("routing", ["loaded", "round-robin"])
async def test_calls_go_where_the_model_is_loaded_until_it_is_saturated(tmp_path: Path, routing: str) -> None:
    fakes = {  # two slots each; "b" has the model downloaded but would have to load it
        "a": FakeLMStudio([FakeModel(MODEL_A, parallel=2)]),
        "b": FakeLMStudio([FakeModel(MODEL_A, loaded=False, parallel=2)]),
    }
    for fake in fakes.values():
        fake.load_delay = 0.3
    async with AsyncExitStack() as stack:
        top = await stack.enter_async_context(
            fleet(tmp_path, fakes=fakes, tools={TOOL_A}, LLM_HUB_ROUTING=routing))
        client = await stack.enter_async_context(gateway_client(top, "legacy"))
        http = await stack.enter_async_context(rest_client(top))
        bridges = await bridge_states(top)
        serving = {m["model"]: m for m in bridges[top.bridge_url("a")]["models"]}
        assert serving[MODEL_A]["loaded"] is True and serving[MODEL_A]["slots"] == 2
        assert {m["model"]: m for m in bridges[top.bridge_url("b")]["models"]}[MODEL_A]["loaded"] is False

        if routing == "round-robin":
            for i in range(4):
                assert not (await client.call_tool(TOOL_A, {"prompt": f"call {i}"})).is_error
            assert top.served_by("a") == 2 and top.served_by("b") == 2
            assert fakes["b"].loads == {MODEL_A: 1}
        else:
            hold(top)
            async with anyio.create_task_group() as tg:
                calls = Calls(tg)
                # SPILL_RATIO 2 x 2 slots: four calls in flight on a before b is worth loading the model.
                for i in range(4):
                    if i % 2:
                        calls.mcp(f"call {i}", client, TOOL_A)
                    else:
                        calls.rest(f"call {i}", http, TOOL_A)
                    await until(lambda n=i + 1: top.served_by("a") + top.served_by("b") == n, f"call {i} routed")
                assert top.served_by("a") == 4 and top.served_by("b") == 0 and not fakes["b"].loads
                calls.rest("call 4", http, TOOL_A)
                await until(lambda: top.served_by("a") + top.served_by("b") == 5, "call 4 routed")
                await until(lambda: bool(fakes["b"].loads) or top.served_by("b") == 0, "bridge b's load")
                assert top.served_by("b") == 1 and fakes["b"].loads == {MODEL_A: 1}
                release(top)
            assert not calls.failures(), calls.failures()

        assert not fakes["a"].loads and not fakes["a"].evictions
        metrics = (await http.get("/metrics")).text
        ports = top.bridge_ports
        # Loads the gateway caused, as it counts them, against the loads LM Studio made.
        jit_loads = metric(metrics, "llm_hub_bridge_jit_loads_total", ports["b"], MODEL_A)
        assert jit_loads == fakes["b"].loads[MODEL_A] == 1, (
            [line for line in metrics.splitlines() if line.startswith("llm_hub_bridge_")], fakes["b"].loads)
        assert metric(metrics, "llm_hub_bridge_jit_loads_total", ports["a"], MODEL_A) == 0
        routed = {name: metric(metrics, "llm_hub_bridge_calls_routed_total", port, MODEL_A)
                  for name, port in ports.items()}
        assert routed == ({"a": 2, "b": 2} if routing == "round-robin" else {"a": 4, "b": 1})
        assert metric(metrics, "llm_hub_bridge_calls_in_flight", ports["a"], MODEL_A) == 0
