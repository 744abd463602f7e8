"""What a key may call and how much it has used: model access, token budgets and usage per key.

A token budget is counted in the rate limiter's store (memory, or the Redis that several gateways
share) in fixed windows that start with a key's first charged call. A call's size is known only
when it ends, so a call is admitted while the key has tokens left in every window, and its tokens
are charged when it ends: the last call admitted may overshoot the budget by up to its own size.
"""

from __future__ import annotations

import hashlib
import math
import time
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

import anyio
from limits import RateLimitItem, parse_many
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError

from gateway.auth import ANONYMOUS
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.settings import GatewaySettings

_NAMESPACE = "tokens"


class UsageRefused(Exception):
    """A call refused before it is routed; `status` and `headers()` are the HTTP answer's."""

    status = 400

    def headers(self) -> dict[str, str]:
        return {}


class Forbidden(UsageRefused):
    """The key may not use the model (LLM_HUB_KEY_MODELS)."""

    status = 403


class OverBudget(UsageRefused):
    """The key has spent a token budget (429), or budgets cannot be checked and the gateway fails
    closed (503); `retry_after` is in seconds."""

    def __init__(self, message: str, retry_after: int, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Accounting:
    """Decides what a key may call (`may_use`, `admit`) and counts what it used (`charge`).

    `key_name` None means authentication is off: every model, no budget, usage counted as anonymous.
    """

    def __init__(self, settings: GatewaySettings, limiter: RateLimiter, metrics: Metrics) -> None:
        self.settings = settings
        self.limiter = limiter
        self.metrics = metrics
        # A fixed window counts every charge, even one past the budget (a moving or sliding window
        # refuses to count it), and is one atomic INCRBY in Redis.
        self.strategy = FixedWindowRateLimiter(limiter.storage)

    def may_use(self, key_name: str | None, model_id: str) -> bool:
        globs = None if key_name is None else self.settings.models_for(key_name)
        return globs is None or any(fnmatchcase(model_id, glob) for glob in globs)

    def may_use_tool(self, key_name: str | None, model_id: str | None) -> bool:
        """A tool of `model_id`; a tool of no model (`list_models`, which names them all) only for a
        key that may use every model."""
        if model_id is None:
            return key_name is None or self.settings.models_for(key_name) is None
        return self.may_use(key_name, model_id)

    async def admit(self, key_name: str | None, model_id: str) -> None:
        """Raises Forbidden or OverBudget when the key may not call the model now."""
        if not self.may_use(key_name, model_id):
            self.metrics.usage_refusal(key_name or ANONYMOUS, "model")
            allowed = "|".join(self.settings.models_for(key_name or "") or [])
            raise Forbidden(
                f"Key '{key_name}' may not use model '{model_id}': LLM_HUB_KEY_MODELS gives it only {allowed}."
            )
        items = self._budget(key_name)
        if not items:
            return
        assert key_name is not None
        try:
            spent = [
                (item, await self._reset_after(item, key_name))
                for item in items
                if not await self.strategy.test(item, _NAMESPACE, _identity(key_name))
            ]
        except StorageError as exc:
            if self.limiter.store_unreachable(exc):
                return
            raise OverBudget(
                "Token budgets cannot be checked (their Redis store cannot be reached) and this gateway refuses "
                "calls until it is back. Retry shortly.",
                1,
                status=503,
            ) from None
        if spent:
            item, seconds = max(spent, key=lambda pair: pair[1])
            self.metrics.usage_refusal(key_name, "budget")
            retry = max(1, math.ceil(seconds))
            raise OverBudget(f"Token budget spent for key '{key_name}': {_describe(item)}. Retry in {retry} s.", retry)

    async def admit_tool(self, key_name: str | None, tool: str, model_id: str | None) -> None:
        """`admit` for a tool call; a tool of no model costs no tokens, and only a key that may use
        every model may call it."""
        if model_id is not None:
            await self.admit(key_name, model_id)
        elif not self.may_use_tool(key_name, None):
            self.metrics.usage_refusal(key_name or ANONYMOUS, "model")
            raise Forbidden(
                f"Key '{key_name}' may not use {tool}: it names every model, and LLM_HUB_KEY_MODELS "
                "gives this key only some."
            )

    async def charge(self, key_name: str | None, model_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Counts one finished call and the tokens LM Studio reported for it. Never raises."""
        name = key_name or ANONYMOUS
        self.metrics.record_usage(name, model_id, prompt_tokens, completion_tokens)
        tokens = prompt_tokens + completion_tokens
        items = self._budget(key_name)
        if not tokens or not items:
            return
        # The call has ended (perhaps by cancellation): its tokens are spent whatever happens to the caller.
        with anyio.CancelScope(shield=True):
            try:
                for item in items:
                    await self.strategy.hit(item, _NAMESPACE, _identity(name), cost=tokens)
            except StorageError as exc:
                self.limiter.store_unreachable(exc)  # this charge is lost; the outage is logged

    def _budget(self, key_name: str | None) -> tuple[RateLimitItem, ...]:
        text = None if key_name is None else self.settings.token_limit_for(key_name)
        return () if text is None else _parse(text)

    async def _reset_after(self, item: RateLimitItem, key_name: str) -> float:
        stats = await self.strategy.get_window_stats(item, _NAMESPACE, _identity(key_name))
        return max(0.0, stats.reset_time - time.time())


def tokens_used(structured: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from a tool result's structured content; (0, 0) when it says none."""
    usage = structured.get("usage") if isinstance(structured, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    counts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    prompt, completion = (value if type(value) is int and value > 0 else 0 for value in counts)
    return prompt, completion


def _identity(key_name: str) -> str:
    # As in the rate limiter: any name becomes a safe, fixed-size store key.
    return hashlib.sha256(key_name.encode()).hexdigest()[:32]


@lru_cache(maxsize=64)
def _parse(text: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_many(text))


def _describe(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    period = unit if item.multiples == 1 else f"{item.multiples} {unit}s"
    return f"{item.amount} tokens per {period}"
