"""Prometheus metrics for the gateway, and a small JSON summary of them for a dashboard.

Every `Metrics` owns its own `CollectorRegistry`, so several gateways (or test apps) can live in
one process without their series colliding in the global default registry.
"""

from __future__ import annotations

import math
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ToolOutcome = Literal["ok", "error", "rejected", "cancelled"]
LimitKind = Literal["tool", "other"]
RefusalReason = Literal["budget", "model"]

TOOL_OUTCOMES: tuple[str, ...] = get_args(ToolOutcome)
LIMIT_KINDS: tuple[str, ...] = get_args(LimitKind)
REFUSAL_REASONS: tuple[str, ...] = get_args(RefusalReason)

ROUTES = (
    "/mcp", "/health", "/metrics", "/v1/tools", "/v1/tools/{name}", "/v1/bridges", "/v1/models", "/v1/stats",
    "/openapi.json", "/", "/v1/dashboard/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
)
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# 1 ms .. 120 s: health checks and list calls at the bottom, a long generation at the top.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A tool call is an embedding (milliseconds) up to a generation as long as the call timeout allows.
TOOL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RECENT_LATENCIES = 1000
RATE_WINDOW_SECONDS = 60
# Tool names come from the bridges, but a caller can ask for any name; past this many distinct
# names the rest share one label, so a client cannot grow the series without bound.
MAX_TOOL_LABELS = 500
# The tokens-per-minute history the dashboard charts: one slot per minute.
USAGE_HISTORY_MINUTES = 60


def route_template(path: str) -> str:
    """The route a path belongs to, from a fixed set, so the `route` label stays bounded."""
    if path != "/":
        path = path.rstrip("/")
    if path in ROUTES:
        return path
    prefix = "/v1/tools/"
    if path.startswith(prefix) and "/" not in path[len(prefix) :]:
        return "/v1/tools/{name}"
    return OTHER


class _RecentRate:
    """Events per second over the last window, in a fixed ring of one-second slots."""

    def __init__(self, window: int, clock: Callable[[], float]) -> None:
        self.window = window
        self.clock = clock
        self.counts = [0] * window
        self.seconds = [-window] * window

    def add(self) -> None:
        second = int(self.clock())
        slot = second % self.window
        if self.seconds[slot] != second:
            self.seconds[slot] = second
            self.counts[slot] = 0
        self.counts[slot] += 1

    def total(self) -> int:
        now = int(self.clock())
        return sum(count for count, second in zip(self.counts, self.seconds, strict=True) if now - second < self.window)


class _PerMinute:
    """Prompt and completion tokens per minute over the last `minutes`, in a fixed ring of slots."""

    def __init__(self, minutes: int, clock: Callable[[], float]) -> None:
        self.minutes = minutes
        self.clock = clock
        self.slots = [(-minutes, 0, 0)] * minutes  # (minute, prompt, completion)

    def add(self, prompt: int, completion: int) -> None:
        minute = int(self.clock() // 60)
        slot = minute % self.minutes
        at, prompt_before, completion_before = self.slots[slot]
        if at != minute:
            prompt_before = completion_before = 0
        self.slots[slot] = (minute, prompt_before + prompt, completion_before + completion)

    def series(self) -> dict[str, list[int]]:
        """Oldest minute first; the last entry is the current minute."""
        now = int(self.clock() // 60)
        prompt, completion = [], []
        for minute in range(now - self.minutes + 1, now + 1):
            at, p, c = self.slots[minute % self.minutes]
            fresh = at == minute
            prompt.append(p if fresh else 0)
            completion.append(c if fresh else 0)
        return {"prompt": prompt, "completion": completion}


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Metrics:
    """The gateway's counters, histograms and gauges, plus the recent history `snapshot()` reports."""

    def __init__(self, *, namespace: str = "llm_hub", clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            namespace=namespace,
            registry=self.registry,
        )
        self.latency = Histogram(
            "request_duration_seconds",
            "HTTP request duration to the end of the response body (whole stream).",
            ["route"],
            namespace=namespace,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "requests_in_flight", "HTTP requests being handled.", namespace=namespace, registry=self.registry
        )
        self.tool_calls = Counter(
            "tool_calls",
            "Tool calls by tool, bridge and outcome.",
            ["tool", "bridge", "outcome"],
            namespace=namespace,
            registry=self.registry,
        )
        self.tool_latency = Histogram(
            "tool_call_duration_seconds",
            "Tool call duration.",
            ["tool"],
            namespace=namespace,
            buckets=TOOL_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "rate_limited",
            "Requests refused by a rate limit, by kind.",
            ["kind"],
            namespace=namespace,
            registry=self.registry,
        )
        self.bridge_in_flight = Gauge(
            "bridge_calls_in_flight",
            "Tool calls this gateway has in flight, by bridge and model.",
            ["bridge", "model"],
            namespace=namespace,
            registry=self.registry,
        )
        self.bridge_routed = Counter(
            "bridge_calls_routed",
            "Tool calls sent to a bridge, by bridge and model.",
            ["bridge", "model"],
            namespace=namespace,
            registry=self.registry,
        )
        self.jit_loads = Counter(
            "bridge_jit_loads",
            "Calls this gateway sent to a bridge that did not have the model loaded (LM Studio loads it).",
            ["bridge", "model"],
            namespace=namespace,
            registry=self.registry,
        )
        self.bridge_up = Gauge(
            "bridge_up",
            "1 when the bridge passed its last health check.",
            ["bridge"],
            namespace=namespace,
            registry=self.registry,
        )
        self.usage_calls = Counter(
            "usage_calls",
            "Calls that reached a model, by key name and model.",
            ["key", "model"],
            namespace=namespace,
            registry=self.registry,
        )
        self.usage_prompt_tokens = Counter(
            "usage_prompt_tokens",
            "Prompt tokens LM Studio reported, by key name and model.",
            ["key", "model"],
            namespace=namespace,
            registry=self.registry,
        )
        self.usage_completion_tokens = Counter(
            "usage_completion_tokens",
            "Completion tokens LM Studio reported, by key name and model.",
            ["key", "model"],
            namespace=namespace,
            registry=self.registry,
        )
        self.usage_refused = Counter(
            "usage_refused",
            "Calls refused before routing, by key name and reason (budget: token budget spent; model: not allowed).",
            ["key", "reason"],
            namespace=namespace,
            registry=self.registry,
        )

        self._total = 0
        self._errors = 0
        self._active = 0
        self._recent_rate = _RecentRate(RATE_WINDOW_SECONDS, clock)
        self._recent_latencies: deque[float] = deque(maxlen=RECENT_LATENCIES)
        self._rejections: Tally[str] = Tally()
        self._outcomes: Tally[str] = Tally()
        self._tool_labels: set[str] = set()
        self._model_labels: set[str] = set()
        self._usage: dict[tuple[str, str], list[int]] = {}  # (key, model) -> [calls, prompt, completion]
        self._refused: Tally[str] = Tally()
        self._per_minute = _PerMinute(USAGE_HISTORY_MINUTES, clock)
        self._children: dict[tuple[Any, ...], Any] = {}

    # -- recording ----------------------------------------------------------------------------

    def request_started(self) -> None:
        self.in_flight.inc()
        self._active += 1

    def request_finished(self, route: str, method: str, status: int, seconds: float) -> None:
        self.in_flight.dec()
        self._active -= 1
        self._child(self.requests, route, method, status).inc()
        self._child(self.latency, route).observe(seconds)
        self._total += 1
        # /health answers 503 by design while no bridge is healthy: a state, not a failed request.
        if status >= 500 and route != "/health":
            self._errors += 1
        self._recent_rate.add()
        self._recent_latencies.append(seconds)

    def observe_tool_call(self, tool: str, bridge: str, outcome: ToolOutcome, seconds: float) -> None:
        if outcome not in TOOL_OUTCOMES:
            raise ValueError(f"outcome must be one of {TOOL_OUTCOMES}, not {outcome!r}")
        tool = self._tool_label(tool)
        self._child(self.tool_calls, tool, bridge, outcome).inc()
        # A refused call never ran; its near-zero time would only drag the latency down.
        if outcome != "rejected":
            self._child(self.tool_latency, tool).observe(seconds)
        self._outcomes[outcome] += 1

    def rate_limit_rejected(self, kind: LimitKind) -> None:
        if kind not in LIMIT_KINDS:
            raise ValueError(f"kind must be one of {LIMIT_KINDS}, not {kind!r}")
        self.rate_limited.labels(kind).inc()
        self._rejections[kind] += 1

    def call_routed(self, bridge: str, model: str, *, jit_load: bool) -> None:
        self._child(self.bridge_in_flight, bridge, model).inc()
        self._child(self.bridge_routed, bridge, model).inc()
        if jit_load:
            self.jit_loads.labels(bridge, model).inc()

    def call_done(self, bridge: str, model: str) -> None:
        self._child(self.bridge_in_flight, bridge, model).dec()

    def set_bridge_up(self, bridge: str, up: bool) -> None:
        self.bridge_up.labels(bridge).set(1 if up else 0)

    def record_usage(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """One call by the key named `key` (never the key itself) to `model`, and the tokens it used."""
        model = _bounded(self._model_labels, model)
        self._child(self.usage_calls, key, model).inc()
        self._child(self.usage_prompt_tokens, key, model).inc(prompt_tokens)
        self._child(self.usage_completion_tokens, key, model).inc(completion_tokens)
        totals = self._usage.setdefault((key, model), [0, 0, 0])
        totals[0] += 1
        totals[1] += prompt_tokens
        totals[2] += completion_tokens
        self._per_minute.add(prompt_tokens, completion_tokens)

    def usage_refusal(self, key: str, reason: RefusalReason) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"reason must be one of {REFUSAL_REASONS}, not {reason!r}")
        self.usage_refused.labels(key, reason).inc()
        self._refused[reason] += 1

    def _child(self, metric: Any, *labels: Any) -> Any:
        """`metric.labels(*labels)`, looked up once: `labels()` checks and converts its values and takes a lock
        on every call, and the ten calls on an OpenAI call's path came to about a percent of the gateway's CPU.
        Every label set here is bounded (routes, statuses, bridges, bounded tools and models, key names), as the
        metric's own children are, and none is ever removed."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*(str(label) for label in labels))
        return child

    def _tool_label(self, tool: str) -> str:
        return _bounded(self._tool_labels, tool)

    # -- reading ------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def endpoint(self, request: Request) -> Response:
        """`GET /metrics`."""
        payload, content_type = self.render()
        return Response(payload, media_type=content_type)

    def snapshot(self) -> dict[str, Any]:
        """A small summary for a dashboard: totals since start, rate and latency over recent requests."""
        ordered = sorted(self._recent_latencies)
        last_minute = self._recent_rate.total()
        return {
            "requests_total": self._total,
            "requests_last_minute": last_minute,
            "requests_per_second": round(last_minute / RATE_WINDOW_SECONDS, 3),
            "in_flight": self._active,
            "errors_5xx": self._errors,
            "latency_ms": {
                name: None if (value := _percentile(ordered, q)) is None else round(value * 1000, 3)
                for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
            },
            "latency_samples": len(ordered),
            "rate_limited": {kind: self._rejections[kind] for kind in LIMIT_KINDS},
            "tool_calls": {outcome: self._outcomes[outcome] for outcome in TOOL_OUTCOMES},
            "usage": [
                {"key": key, "model": model, "calls": calls, "prompt_tokens": prompt, "completion_tokens": completion}
                for (key, model), (calls, prompt, completion) in sorted(self._usage.items())
            ],
            "usage_refused": {reason: self._refused[reason] for reason in REFUSAL_REASONS},
            "tokens_per_minute": self._per_minute.series(),
        }


def _bounded(seen: set[str], label: str) -> str:
    """`label`, or OTHER once MAX_TOOL_LABELS distinct ones are in use: callers can name anything."""
    if label in seen:
        return label
    if len(seen) >= MAX_TOOL_LABELS:
        return OTHER
    seen.add(label)
    return label


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        route = route_template(scope["path"])
        method = scope["method"] if scope["method"] in METHODS else OTHER
        status = 500  # stays so when the app raises before it starts a response

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.request_started()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_counting)
        finally:
            # Also runs on cancellation (client gone mid-stream), so the in-flight gauge cannot leak.
            self.metrics.request_finished(route, method, status, time.perf_counter() - started)
