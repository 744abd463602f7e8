"""The edge (deploy/haproxy/haproxy.cfg, run by Debian's haproxy) over TLS in front of two gateway
processes sharing a real Redis, each in front of two bridges on fake LM Studios.

Which replica served a request is read from the edge's own log (one line per request, with its
X-Request-ID and session ids) and from each gateway's /metrics; calls are held mid-answer by the
fakes' gate, so "in flight" is a fact the test waits for. Nothing is timed.

Needs /usr/sbin/haproxy (apt-get install -y haproxy); skipped without it, except where
LLM_HUB_REQUIRE_EDGE=1 (.ci/run). The TypeScript clients' test also needs `npm ci --prefix tests/ts`,
as tests/test_typescript_clients.py does (LLM_HUB_REQUIRE_TS=1).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import ssl
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import anyio
import anyio.abc
import httpx2
import pytest
import trustme
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import (
    CHAT_MODEL,
    CHAT_TOOL,
    bridge_process,
    clear_of_minute_boundary,
    free_port,
    gateway_process,
    redis_server,
    service,
)
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve
from tests.test_gateway_calls_e2e import ANSWER, BRIDGE_ENV, Calls, until
from tests.test_gateway_e2e import AUTH, KEY, _text
from tests.test_typescript_clients import Server, TSClient, start_client
from tests.test_typescript_clients import node as ts_node

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = "/usr/sbin/haproxy"
REPLICAS = ("gateway-1", "gateway-2")

LIMITED_KEY = "edge-limited-key-0123456789abcdef"
LIMITED_CALLS = 5
GATEWAY_ENV = {
    "LLM_HUB_API_KEYS": f"tester:{KEY},limited:{LIMITED_KEY}",
    "LLM_HUB_KEY_LIMITS": f"limited={LIMITED_CALLS}/minute",
    # Out of the way of every test but the one for the limited key.
    "LLM_HUB_RATE_LIMIT": "100000/minute",
    "LLM_HUB_REQUEST_LIMIT": "100000/minute",
}

# One line of the edge's log-format: the replica, the status, the request line, then
# {X-Request-ID|Mcp-Session-Id sent} {Mcp-Session-Id answered}.
LOG_LINE = re.compile(
    r"mcp-edge~ gateways/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+ \S+ \S+ "
    r'"[^"]*" \{(?P<request_id>[^|}]*)\|(?P<session_sent>[^}]*)\} '
    r"\{(?P<session_answered>[^}]*)\}"
)

# What the edge logs for a request it refused itself before reading it whole: no replica, 400.
REFUSED_BY_EDGE = "mcp-edge~ mcp-edge/<NOSRV> -1/-1/-1/-1/0 400 "


def haproxy() -> str:
    if shutil.which(HAPROXY):
        return HAPROXY
    missing = f"{HAPROXY} is missing: apt-get install -y haproxy (.ci/run does)"
    if os.environ.get("LLM_HUB_REQUIRE_EDGE") == "1":
        pytest.fail(missing)
    pytest.skip(missing)


@dataclass
class Served:
    """One request as the edge logged it."""

    server: str
    status: int
    request_id: str
    session_sent: str
    session_answered: str


@dataclass
class Edge:
    url: str
    monitor: str
    fakes: list[FakeLMStudio]
    bridges: list[str]
    ca: trustme.CA
    logs: Path
    stack: AsyncExitStack
    gateway_env: dict[str, str]
    gateways: dict[str, str] = field(default_factory=dict)
    processes: dict[str, anyio.abc.Process] = field(default_factory=dict)

    @cached_property
    def trust(self) -> ssl.SSLContext:
        return trusting(self.ca)

    async def start(self, replica: str, port: int) -> None:
        """A gateway replica on `port`, in front of every bridge."""
        self.processes[replica] = await self.stack.enter_async_context(
            gateway_process(self.bridges, port, self.logs / f"{replica}.log", **self.gateway_env)
        )
        self.gateways[replica] = f"http://127.0.0.1:{port}"

    async def restart(self, replica: str) -> None:
        """The replica dies and starts again on its address, without the sessions it held."""
        await self.kill(replica)
        await self.start(replica, int(self.gateways[replica].rsplit(":", 1)[1]))

    async def in_rotation(self) -> bool:
        """Every replica in the edge's rotation, each with both bridges healthy."""
        for url in self.gateways.values():
            async with httpx2.AsyncClient(headers=AUTH) as http:
                states = (await http.get(f"{url}/v1/bridges")).json()["bridges"]
            if not all(b["healthy"] for b in states):
                return False
        return await self.edge_metric("haproxy_backend_active_servers", 'proxy="gateways"') == len(REPLICAS)

    def client(self, key: str = KEY, **headers: str) -> httpx2.AsyncClient:
        """An HTTP client for the edge that trusts the test's CA."""
        return httpx2.AsyncClient(
            base_url=self.url, verify=self.trust, timeout=60, headers={"Authorization": f"Bearer {key}", **headers}
        )

    @asynccontextmanager
    async def mcp(self, mode: str, request_id: str) -> AsyncIterator[Client]:
        """An SDK client through the edge; every request it sends carries `request_id`."""
        async with (
            self.client(**{"X-Request-ID": request_id}) as http,
            Client(streamable_http_client(f"{self.url}/mcp", http_client=http), mode=mode) as client,
        ):
            yield client

    def log(self) -> str:
        return (self.logs / "edge.log").read_text()

    def served(self) -> list[Served]:
        found = (LOG_LINE.search(line) for line in self.log().splitlines())
        return [Served(**{**m.groupdict(), "status": int(m["status"])}) for m in found if m]

    def servers_of(self, prefix: str) -> set[str]:
        """The replicas that served requests whose X-Request-ID starts with `prefix`."""
        return {s.server for s in self.served() if s.request_id.startswith(prefix)}

    async def metrics(self, replica: str) -> str:
        async with httpx2.AsyncClient(headers=AUTH) as http:
            return (await http.get(f"{self.gateways[replica]}/metrics")).text

    async def edge_metric(self, name: str, labels: str) -> float:
        """One of the edge's Prometheus series, by its exact labels (e.g. `proxy="gateways"`)."""
        async with httpx2.AsyncClient() as http:
            text = (await http.get(f"{self.monitor}/metrics")).text
        found = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    async def kill(self, replica: str) -> None:
        self.processes[replica].kill()
        await self.processes[replica].wait()

    def held(self) -> int:
        return sum(fake.slots(CHAT_MODEL).active for fake in self.fakes)

    def hold(self) -> None:
        for fake in self.fakes:
            fake.gate = anyio.Event()

    def release(self) -> None:
        for fake in self.fakes:
            if fake.gate is not None:
                fake.gate.set()


def requests_served(metrics: str, route: str, status: str = "200") -> float:
    """`llm_hub_requests_total` for one route and status, over methods."""
    total = 0.0
    for labels, value in re.findall(r"^llm_hub_requests_total\{(.*)\} (\S+)$", metrics, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found["route"] == route and found["status"] == status:
            total += float(value)
    return total


def edge_environment(port: int, monitor_port: int, certificate: Path, gateways: dict[str, str]) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "EDGE_BIND": f"127.0.0.1:{port}",
        "EDGE_CERT": str(certificate),
        "EDGE_MONITOR_BIND": f"127.0.0.1:{monitor_port}",
        **{name.upper().replace("-", "_"): url.removeprefix("http://") for name, url in gateways.items()},
    }


def certificate(directory: Path) -> tuple[Path, trustme.CA]:
    """edge.pem in `directory`: a certificate for 127.0.0.1 from a fresh CA, with its key, in one PEM."""
    ca = trustme.CA()
    path = directory / "edge.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path, ca


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def edge(tmp_path: Path, **edge_env: str) -> AsyncIterator[Edge]:
    """The edge (with `edge_env` added to its environment) in front of two gateways (one Redis), each in
    front of both bridges; ready once every replica is in the edge's rotation and sees both bridges
    healthy."""
    binary = haproxy()
    pem, ca = certificate(tmp_path)
    fakes = [FakeLMStudio([FakeModel(CHAT_MODEL)]) for _ in range(2)]
    with redis_server() as (redis_url, _):
        async with AsyncExitStack() as stack:
            bridges = []
            for i, fake in enumerate(fakes):
                url, port = await stack.enter_async_context(serve(fake.app)), free_port()
                await stack.enter_async_context(bridge_process(url, port, tmp_path / f"bridge-{i}.log", **BRIDGE_ENV))
                bridges.append(f"http://127.0.0.1:{port}")
            port, monitor_port = free_port(), free_port()
            top = Edge(
                f"https://127.0.0.1:{port}",
                f"http://127.0.0.1:{monitor_port}",
                fakes,
                bridges,
                ca,
                tmp_path,
                stack,
                {"LLM_HUB_REDIS_URL": redis_url, **GATEWAY_ENV},
            )
            for name in REPLICAS:
                await top.start(name, free_port())
            await stack.enter_async_context(
                service(
                    [binary, "-W", "-db", "-f", str(CONFIG)],
                    {**edge_environment(port, monitor_port, pem, top.gateways), **edge_env},
                    f"http://127.0.0.1:{monitor_port}/health",
                    tmp_path / "edge.log",
                    ready=(200,),
                )
            )
            await until(top.in_rotation, "both replicas in the edge's rotation, each with both bridges healthy")
            yield top


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope, for `top`


@pytest.fixture(scope="module")
async def top(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    """One topology for the tests that leave it as they found it (a start costs seconds on 2 cores)."""
    # A header deadline the 1,100 half-sent connections cannot reach while a busy machine opens them;
    # the shipped 10 s is checked by the test with its own edge.
    async with edge(tmp_path_factory.mktemp("edge"), EDGE_HEADER_TIMEOUT="120s") as started:
        yield started


async def rest_call(top: Edge, request_id: str, key: str = KEY) -> httpx2.Response:
    async with top.client(key, **{"X-Request-ID": request_id}) as http:
        return await http.post(f"/v1/tools/{CHAT_TOOL}", json={"prompt": request_id})


def test_the_shipped_config_is_valid(tmp_path: Path) -> None:
    pem, _ = certificate(tmp_path)
    gateways = {name: f"http://127.0.0.1:{free_port()}" for name in REPLICAS}
    env = edge_environment(free_port(), free_port(), pem, gateways)
    result = subprocess.run(
        [haproxy(), "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr


async def test_both_eras_over_tls_a_handshake_session_stays_on_its_replica_and_the_rest_is_spread(top: Edge) -> None:
    async with top.mcp("legacy", "legacy-session") as legacy, top.mcp("auto", "auto-client") as auto:
        assert auto.protocol_version.startswith("2026") and not legacy.protocol_version.startswith("2026")
        assert CHAT_TOOL in {t.name for t in (await legacy.list_tools()).tools}
        streamed = 0

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            nonlocal streamed
            streamed += bool(message)

        for i in range(50):
            result = await legacy.call_tool(CHAT_TOOL, {"prompt": f"legacy {i}"}, progress_callback=on_progress)
            assert not result.is_error and _text(result) == ANSWER, _text(result)
            # The balancer's turns between the session's calls, in both orders, so each kind lands on both.
            kinds = ("auto", "rest") if i % 2 else ("rest", "auto")
            for kind in kinds:
                if kind == "auto":
                    result = await auto.call_tool(CHAT_TOOL, {"prompt": f"auto {i}"})
                    assert not result.is_error and _text(result) == ANSWER, _text(result)
                else:
                    answer = await rest_call(top, f"rest-{i}")
                    assert answer.status_code == 200 and answer.json()["structuredContent"]["text"] == ANSWER
        assert streamed >= 50  # progress came through the edge

        async with top.client() as http:  # no X-Request-ID from the client: the edge makes one
            answer = await http.post(f"/v1/tools/{CHAT_TOOL}", json={"prompt": "no id"})
        assert answer.status_code == 200 and "max-age" in answer.headers["strict-transport-security"]
        made = answer.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f-]{36}", made), made

    served = top.served()
    session = {s.session_answered for s in served if s.request_id == "legacy-session" and s.session_answered}
    assert len(session) == 1, session
    sticky = [s for s in served if s.session_sent in session]
    assert len(sticky) >= 51 and len({s.server for s in sticky}) == 1, Counter(s.server for s in sticky)
    assert all(s.status < 400 for s in sticky), [s for s in sticky if s.status >= 400]
    assert top.servers_of("auto-client") == set(REPLICAS)
    assert top.servers_of("rest-") == set(REPLICAS)
    # Each replica's own count agrees: both served REST calls and MCP requests.
    for replica in REPLICAS:
        metrics = await top.metrics(replica)
        assert requests_served(metrics, "/v1/tools/{name}") > 0, replica
        assert requests_served(metrics, "/mcp") > 0, replica
    # The edge's request id reached the gateway that served the call, and is in its log line.
    assert any(made in (top.logs / f"{replica}.log").read_text() for replica in REPLICAS)


async def test_an_oversized_header_is_refused_at_the_edge(top: Edge) -> None:
    # /v1/bridges, not /health: the edge's own health checks would move /health's count meanwhile.
    before = [requests_served(await top.metrics(r), "/v1/bridges") for r in REPLICAS]
    async with top.client() as http:
        try:
            answer = await http.get("/v1/bridges", headers={"X-Padding": "a" * (8 << 20)})
            assert answer.status_code == 400, answer.status_code
        except httpx2.TransportError:
            pass  # the edge may close the connection while the header is still being sent
        assert (await http.get("/v1/bridges")).status_code == 200  # the edge still serves
    await until(
        lambda: REFUSED_BY_EDGE in top.log(),
        "the edge's 400 for the oversized header in its log",
    )
    after = [requests_served(await top.metrics(r), "/v1/bridges") for r in REPLICAS]
    assert sum(after) - sum(before) == 1  # only the second request reached a replica


@asynccontextmanager
async def half_sent(top: Edge, count: int) -> AsyncIterator[list[anyio.abc.ByteStream]]:
    """`count` TLS connections to the edge, each with a request line and part of the headers but never
    the blank line that ends them; closed on exit."""
    host, port = top.url.removeprefix("https://").split(":")
    held: list[anyio.abc.ByteStream] = []
    limit = anyio.Semaphore(50)

    async def one(i: int) -> None:
        async with limit:
            stream = await anyio.connect_tcp(host, int(port), ssl_context=top.trust, tls_standard_compatible=False)
            held.append(stream)
            await stream.send(f"POST /mcp HTTP/1.1\r\nHost: edge\r\nX-Half-Sent: {i}\r\n".encode())

    try:
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
        yield held
    finally:
        for stream in held:
            await stream.aclose()


async def status_lines(streams: list[anyio.abc.ByteStream]) -> Counter[bytes]:
    """The status line each connection is answered with before the edge closes it."""
    answers: list[bytes] = []

    async def read(stream: anyio.abc.ByteStream) -> None:
        received = b""
        try:
            while b"\r\n" not in received:
                received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
            pass
        answers.append(received.split(b"\r\n", 1)[0])

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for stream in streams:
                tg.start_soon(read, stream)
    return Counter(answers)


async def test_half_sent_connections_held_against_the_edge_starve_no_client(top: Edge) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,100 sockets and the test's own
    try:
        async with half_sent(top, 1100):

            async def edge_holds_them() -> bool:
                return await top.edge_metric("haproxy_frontend_current_sessions", 'proxy="mcp-edge"') >= 1100

            await until(edge_holds_them, "the edge holding all 1,100 half-sent connections")
            answer = await rest_call(top, "while-held")
            assert answer.status_code == 200 and answer.json()["structuredContent"]["text"] == ANSWER
            for mode in ("legacy", "auto"):
                async with top.mcp(mode, f"{mode}-while-held") as client:
                    result = await client.call_tool(CHAT_TOOL, {"prompt": "held"})
                    assert not result.is_error and _text(result) == ANSWER, _text(result)
            assert await edge_holds_them()  # the answers came while every half-sent one was held
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_the_shared_rate_limit_holds_through_the_edge(top: Edge) -> None:
    await clear_of_minute_boundary()
    generations = sum(len(fake.requests) for fake in top.fakes)
    answers: list[httpx2.Response] = []

    async def one(i: int) -> None:
        answers.append(await rest_call(top, f"limited-{i}", LIMITED_KEY))

    async with anyio.create_task_group() as tg:
        for i in range(3 * LIMITED_CALLS):
            tg.start_soon(one, i)
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: LIMITED_CALLS, 429: 2 * LIMITED_CALLS}, statuses
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
    assert sum(len(fake.requests) for fake in top.fakes) - generations == LIMITED_CALLS
    await until(
        lambda: len([s for s in top.served() if s.request_id.startswith("limited-")]) == 3 * LIMITED_CALLS,
        "every limited call in the edge's log",
    )
    assert top.servers_of("limited-") == set(REPLICAS)  # both replicas counted against one budget
    # The key's other requests keep their own budget.
    async with top.client(LIMITED_KEY) as http:
        assert (await http.get("/v1/tools")).status_code == 200


node = ts_node  # the fixture: Node.js with the clients installed, or a skip (a failure under LLM_HUB_REQUIRE_TS=1)

# Handshake-era TypeScript clients and a 2026-07-28 one, as hosts build them (tests/ts/client.mjs).
TS_CLIENTS = {
    "mcp-remote": TSClient("v1", "legacy", "remote"),
    "sdk-v1": TSClient("v1", "legacy", "http"),
    "sdk-v2": TSClient("v2", "legacy", "http"),
    "sdk-v2-2026": TSClient("v2", "auto", "http"),
}


async def test_after_the_replicas_restart_mcp_remote_initializes_again_by_itself(
    top: Edge, node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the README says each TypeScript client does when its replica is gone: mcp-remote initializes
    again and carries on, SDK v1 and v2 report the 404, a 2026-07-28 client just continues."""
    ca = tmp_path / "ca.pem"
    top.ca.cert_pem.write_to_path(str(ca))
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(ca))  # Node's own trust store, for the edge's certificate
    async with AsyncExitStack() as stack:
        runs = {}
        for name, client in TS_CLIENTS.items():
            server = Server(f"{top.url}/mcp", (f"Authorization: Bearer {KEY}", f"X-Request-ID: ts-{name}"))
            runs[name] = await stack.enter_async_context(
                start_client(node, client, server, "", tmp_path / f"{name}.log", "again")
            )
        for name, run in runs.items():
            called = await run.until("called")
            assert called.get("text") == ANSWER, (name, called)
        for replica in REPLICAS:  # every session is gone, on whichever replica it was
            await top.restart(replica)
        await until(top.in_rotation, "both replicas back in the edge's rotation")
        again = {}
        for name, run in runs.items():
            await run.send_line()
            again[name] = await run.until("called_again")
    assert {name for name, outcome in again.items() if outcome.get("text") == ANSWER} == {
        "mcp-remote",
        "sdk-v2-2026",
    }, again
    for name in ("sdk-v1", "sdk-v2"):
        assert "Session not found" in again[name]["error"], (name, again[name])


async def test_a_gateway_killed_under_load_fails_only_its_calls_in_flight(tmp_path: Path) -> None:
    async with edge(tmp_path) as top, AsyncExitStack() as stack:
        # Meanwhile the shipped header deadline (timeout http-request, 10 s) runs out for these.
        slow = await stack.enter_async_context(half_sent(top, 20))
        legacy = {f"legacy-{i}": await stack.enter_async_context(top.mcp("legacy", f"legacy-{i}")) for i in range(4)}
        auto = {f"auto-{i}": await stack.enter_async_context(top.mcp("auto", f"auto-{i}")) for i in range(4)}
        rest = {
            f"rest-{i}": await stack.enter_async_context(top.client(**{"X-Request-ID": f"rest-{i}"})) for i in range(6)
        }
        await until(lambda: set(legacy) | set(auto) <= {s.request_id for s in top.served()}, "the connects logged")
        created_on = {s.request_id: s.server for s in top.served() if s.session_answered}
        assert set(created_on.values()) == set(REPLICAS), created_on  # sessions on both replicas
        connects = Counter(s.request_id for s in top.served())

        top.hold()
        async with anyio.create_task_group() as tg:
            calls = Calls(tg)
            for label, client in {**legacy, **auto}.items():
                calls.mcp(label, client, CHAT_TOOL)
            for label, http in rest.items():
                calls.rest(label, http, CHAT_TOOL)
            await until(
                lambda: (
                    top.held() == len(calls.outcomes)
                    and all(calls.outcomes[label].progress for label in {**legacy, **auto})
                ),
                "every call in flight, text at every MCP caller",
            )  # streamed through the edge, unbuffered
            await top.kill("gateway-1")
            await until(
                lambda: (
                    top.held() + sum(o.done for o in calls.outcomes.values()) == len(calls.outcomes)
                    and sum(o.done for o in calls.outcomes.values()) > 0
                ),
                "the killed replica's calls ended",
            )
            top.release()

        # A request id names a client (MCP) or one call (REST), so a call's line is the first its id
        # got after connecting; a handshake-era call went where its session was created.
        def lines(label: str) -> list[Served]:
            return [s for s in top.served() if s.request_id == label]

        await until(lambda: all(len(lines(label)) > connects[label] for label in calls.outcomes), "every call logged")
        served_by = {label: created_on.get(label) or lines(label)[connects[label]].server for label in calls.outcomes}
        on_killed = {label for label, server in served_by.items() if server == "gateway-1"}
        assert on_killed and on_killed != set(calls.outcomes), served_by
        assert calls.labels(ok=False) == on_killed, calls.failures()
        assert all(calls.outcomes[label].detail for label in on_killed)  # the caller is told why

        # New calls reach the other replica: REST and 2026-07-28 clients just continue.
        for i in range(4):
            answer = await rest_call(top, f"after-{i}")
            assert answer.status_code == 200 and answer.json()["structuredContent"]["text"] == ANSWER, answer.text
        for label, client in auto.items():
            result = await client.call_tool(CHAT_TOOL, {"prompt": "after"})
            assert not result.is_error and _text(result) == ANSWER, (label, _text(result))
        # A handshake-era session lived on its replica: the survivor does not know it, and says so.
        for label, client in legacy.items():
            if created_on[label] == "gateway-1":
                with pytest.raises(MCPError, match="Session not found"):
                    await client.call_tool(CHAT_TOOL, {"prompt": "after"})
            else:
                result = await client.call_tool(CHAT_TOOL, {"prompt": "after"})
                assert not result.is_error and _text(result) == ANSWER, (label, _text(result))
        async with top.mcp("legacy", "legacy-again") as again:  # initializing again is all it takes
            assert not (await again.call_tool(CHAT_TOOL, {"prompt": "again"})).is_error
        async with httpx2.AsyncClient() as http:
            assert (await http.get(f"{top.monitor}/health")).status_code == 200  # one replica is enough
        assert top.servers_of("after-") == {"gateway-2"}

        assert await status_lines(slow) == {b"HTTP/1.1 408 Request Time-out": len(slow)}
        timed_out = re.compile(r"mcp-edge~ mcp-edge/<NOSRV> \S+ 408 .* cR-- ")  # reaching no replica
        await until(lambda: len(timed_out.findall(top.log())) == len(slow), "the edge's lines for them")
