"""Gateway metrics and request ids on a real uvicorn: labels, in-flight accounting, X-Request-ID, log context."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx2
import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.metrics import Metrics, MetricsMiddleware, route_template
from gateway.request_id import RequestIdMiddleware, current_request_id
from tests.fake_lmstudio import serve

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def make_app(metrics: Metrics) -> RequestIdMiddleware:
    async def mcp(request: Request) -> Response:
        logger.info("handling mcp")
        return JSONResponse({"state": request.state.request_id, "context": current_request_id()})

    async def call_tool(request: Request) -> Response:
        chunks = int(request.query_params.get("chunks", "3"))
        delay = float(request.query_params.get("delay", "0.01"))

        async def body() -> AsyncIterator[bytes]:
            for i in range(chunks):
                await anyio.sleep(delay)
                yield f"{request.path_params['name']}:{i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(
        routes=[
            Route("/mcp", mcp, methods=["POST"]),
            Route("/v1/tools/{name}", call_tool, methods=["POST"]),
            Route("/health", health),
            Route("/boom", boom),
            Route("/metrics", metrics.endpoint),
        ]
    )
    return RequestIdMiddleware(MetricsMiddleware(app, metrics))


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def in_flight(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("llm_hub_requests_in_flight")


async def wait_idle(metrics: Metrics) -> None:
    # The server finishes a request a moment after the client has its last byte.
    with anyio.fail_after(5):
        while in_flight(metrics) != 0:
            await anyio.sleep(0.01)


@contextmanager
def captured_logs(serialize: bool = False) -> Iterator[list[Any]]:
    seen: list[Any] = []
    sink_id = logger.add(
        lambda message: seen.append(str(message) if serialize else message.record), level="DEBUG", serialize=serialize
    )
    try:
        yield seen
    finally:
        logger.remove(sink_id)


async def test_counts_by_route_template_method_and_status() -> None:
    metrics = Metrics()
    async with serve(make_app(metrics)) as base, httpx2.AsyncClient(base_url=base) as http:
        for _ in range(2):
            assert (await http.post("/mcp", json={})).status_code == 200
        for name in ("chat_a", "chat_b", "embed_c"):
            response = await http.post(f"/v1/tools/{name}")
            assert response.status_code == 200 and response.text == f"{name}:0\n{name}:1\n{name}:2\n"
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/health/")).status_code in (200, 307)
        assert (await http.get("/nowhere/1234")).status_code == 404
        assert (await http.get("/boom")).status_code == 500
        await wait_idle(metrics)

        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = parse(response.text)

    total = "llm_hub_requests_total"
    assert value(samples, total, route="/mcp", method="POST", status="200") == 2
    assert value(samples, total, route="/v1/tools/{name}", method="POST", status="200") == 3
    assert not any("chat_a" in dict(labels).get("route", "") for _, labels in samples)
    health_200 = value(samples, total, route="/health", method="GET", status="200")
    assert health_200 is not None and health_200 >= 1
    assert value(samples, total, route="other", method="GET", status="404") == 1
    assert value(samples, total, route="/boom", method="GET", status="500") is None
    assert value(samples, total, route="other", method="GET", status="500") == 1

    duration = "llm_hub_request_duration_seconds"
    assert value(samples, f"{duration}_count", route="/v1/tools/{name}") == 3
    assert value(samples, f"{duration}_count", route="/mcp") == 2
    assert value(samples, f"{duration}_bucket", route="/mcp", le="+Inf") == 2
    streamed = value(samples, f"{duration}_sum", route="/v1/tools/{name}")
    assert streamed is not None and streamed >= 3 * 3 * 0.01  # timed to the last chunk, not the headers
    # The scrape counts itself as in flight while it renders.
    assert value(samples, "llm_hub_requests_in_flight") == 1


async def test_in_flight_returns_to_zero_after_a_stream_and_a_disconnect_mid_stream() -> None:
    metrics = Metrics()
    async with serve(make_app(metrics)) as base, httpx2.AsyncClient(base_url=base) as http:
        async with http.stream("POST", "/v1/tools/chat_a", params={"chunks": 5}) as response:
            assert in_flight(metrics) == 1
            assert [line async for line in response.aiter_lines()] == [f"chat_a:{i}" for i in range(5)]
        await wait_idle(metrics)

        with anyio.fail_after(10):
            async with http.stream("POST", "/v1/tools/chat_b", params={"chunks": 10_000, "delay": 0.02}) as response:
                async for line in response.aiter_lines():
                    assert line == "chat_b:0"
                    break
                assert in_flight(metrics) == 1
            # Leaving the block unread closes the connection: the server sees the client go.
            await wait_idle(metrics)

    count = metrics.registry.get_sample_value("llm_hub_request_duration_seconds_count", {"route": "/v1/tools/{name}"})
    assert count == 2
    assert metrics.snapshot()["in_flight"] == 0


async def test_request_raising_before_responding_counts_as_500() -> None:
    metrics = Metrics()

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("before any response")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    scope = {"type": "http", "method": "POST", "path": "/v1/tools/x", "headers": []}
    with pytest.raises(RuntimeError):
        await MetricsMiddleware(raw_app, metrics)(scope, receive, send)
    labels = {"route": "/v1/tools/{name}", "method": "POST", "status": "500"}
    assert metrics.registry.get_sample_value("llm_hub_requests_total", labels) == 1
    assert in_flight(metrics) == 0
    assert metrics.snapshot()["errors_5xx"] == 1


async def test_request_id_is_echoed_when_sane_and_made_up_otherwise() -> None:
    metrics = Metrics()
    async with serve(make_app(metrics)) as base, httpx2.AsyncClient(base_url=base) as http:
        given = "req-42:a.b_C"
        response = await http.post("/mcp", json={}, headers={"X-Request-ID": given})
        assert response.headers["x-request-id"] == given
        assert response.json() == {"state": given, "context": given}

        response = await http.post("/mcp", json={})
        made = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert response.json() == {"state": made, "context": made}

        for insane in ("has space", "x" * 129, "semi;colon", "", "tab\there"):
            response = await http.get("/health", headers={"X-Request-ID": insane})
            echoed = response.headers["x-request-id"]
            assert echoed != insane and re.fullmatch(r"[0-9a-f]{32}", echoed), insane

        assert "x" * 128 == (await http.get("/health", headers={"X-Request-ID": "x" * 128})).headers["x-request-id"]
        # Errors and streams carry it too.
        assert (await http.get("/boom", headers={"X-Request-ID": "b1"})).headers["x-request-id"] == "b1"
        assert (await http.post("/v1/tools/t", headers={"X-Request-ID": "s1"})).headers["x-request-id"] == "s1"
        assert len((await http.get("/health")).headers.get_list("x-request-id")) == 1
    assert current_request_id() is None


async def test_log_lines_during_a_request_carry_its_id() -> None:
    metrics = Metrics()
    async with serve(make_app(metrics)) as base, httpx2.AsyncClient(base_url=base) as http:
        with captured_logs() as records, captured_logs(serialize=True) as lines:
            await http.post("/mcp", json={}, headers={"X-Request-ID": "trace-me"})
            await http.post("/mcp", json={})
            logger.info("outside any request")

    handled = [r for r in records if r["message"] == "handling mcp"]
    assert handled[0]["extra"]["request_id"] == "trace-me"
    assert re.fullmatch(r"[0-9a-f]{32}", handled[1]["extra"]["request_id"])
    outside = next(r for r in records if r["message"] == "outside any request")
    assert "request_id" not in outside["extra"]

    record = json.loads(next(line for line in lines if "handling mcp" in line))["record"]
    assert record["extra"]["request_id"] == "trace-me"


async def test_snapshot_summarises_recent_traffic() -> None:
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    empty = metrics.snapshot()
    assert empty["requests_total"] == 0 and empty["latency_ms"] == {"p50": None, "p95": None, "p99": None}

    for ms in range(1, 101):
        metrics.request_started()
        metrics.request_finished("/mcp", "POST", 200, ms / 1000)
    now[0] += 30
    for status in (500, 502, 404):
        metrics.request_started()
        metrics.request_finished("other", "GET", status, 0.001)
    metrics.rate_limit_rejected("tool")
    metrics.rate_limit_rejected("tool")
    metrics.rate_limit_rejected("other")
    metrics.observe_tool_call("chat_a", "http://b1", "ok", 1.5)
    metrics.observe_tool_call("chat_a", "http://b1", "error", 0.2)
    metrics.observe_tool_call("chat_a", "http://b1", "rejected", 0.0)
    metrics.observe_tool_call("chat_a", "http://b2", "cancelled", 3.0)
    metrics.set_bridge_up("http://b1", True)
    metrics.set_bridge_up("http://b2", False)

    snap = metrics.snapshot()
    assert snap["requests_total"] == 103 and snap["requests_last_minute"] == 103
    assert snap["requests_per_second"] == round(103 / 60, 3)
    assert snap["errors_5xx"] == 2 and snap["in_flight"] == 0
    assert snap["latency_samples"] == 103
    assert snap["latency_ms"] == {"p50": 49.0, "p95": 95.0, "p99": 99.0}
    assert snap["rate_limited"] == {"tool": 2, "other": 1}
    assert snap["tool_calls"] == {"ok": 1, "error": 1, "rejected": 1, "cancelled": 1}
    json.dumps(snap)

    now[0] += 45  # the first hundred are now more than a minute old
    later = metrics.snapshot()
    assert later["requests_last_minute"] == 3 and later["requests_total"] == 103
    now[0] += 3600
    assert metrics.snapshot()["requests_last_minute"] == 0

    get = metrics.registry.get_sample_value
    assert get("llm_hub_tool_calls_total", {"tool": "chat_a", "bridge": "http://b1", "outcome": "rejected"}) == 1
    assert get("llm_hub_tool_call_duration_seconds_count", {"tool": "chat_a"}) == 3  # rejected is not timed
    assert get("llm_hub_rate_limited_total", {"kind": "tool"}) == 2
    assert get("llm_hub_bridge_up", {"bridge": "http://b1"}) == 1
    assert get("llm_hub_bridge_up", {"bridge": "http://b2"}) == 0
    with pytest.raises(ValueError):
        metrics.observe_tool_call("chat_a", "http://b1", "weird", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        metrics.rate_limit_rejected("bogus")  # type: ignore[arg-type]


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.rate_limit_rejected("other")
    assert first.registry.get_sample_value("llm_hub_rate_limited_total", {"kind": "other"}) == 1
    assert second.registry.get_sample_value("llm_hub_rate_limited_total", {"kind": "other"}) is None
    payload, content_type = second.render()
    assert content_type.startswith("text/plain") and b"llm_hub_requests_in_flight 0.0" in payload


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/", "/"),
        ("/mcp", "/mcp"),
        ("/mcp/", "/mcp"),
        ("/health", "/health"),
        ("/metrics", "/metrics"),
        ("/v1/tools", "/v1/tools"),
        ("/v1/tools/", "/v1/tools"),
        ("/v1/tools/chat_google_gemma-3-270m", "/v1/tools/{name}"),
        ("/v1/tools/a/b", "other"),
        ("/v1/bridges", "/v1/bridges"),
        ("/openapi.json", "/openapi.json"),
        ("/v1/toolsX", "other"),
        ("/favicon.ico", "other"),
    ],
)
def test_route_template(path: str, route: str) -> None:
    assert route_template(path) == route
