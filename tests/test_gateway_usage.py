"""Model access, token budgets and the usage history, in one process (no bridges): the settings'
messages, what `Accounting` admits and charges, and the per-minute ring."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.settings import GatewaySettings
from gateway.usage import Accounting, Forbidden, OverBudget, tokens_used
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

KEYS = ["ci:ci-key-0123456789", "admin:admin-key-0123456789"]


def accounting(**settings: Any) -> tuple[Accounting, Metrics]:
    values = GatewaySettings(api_keys=KEYS, **settings)
    metrics = Metrics()
    return Accounting(values, RateLimiter(values), metrics), metrics


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"key_models": ["ci=google/*||qwen/*"]}, "'ci=google/*||qwen/*' has an empty model glob"),
        ({"key_models": ["ci"]}, "'ci' must look like NAME=GLOB|GLOB, e.g. ci=google/gemma-*|qwen/*"),
        ({"key_models": ["bot=qwen/*"]}, "'bot=qwen/*' gives models to a key named 'bot', which LLM_HUB_API_KEYS"),
        ({"key_token_limits": ["ci=lots"]}, "'lots' is not a rate limit such as '60/minute'"),
        ({"key_token_limits": ["ci=0/minute"]}, "'0/minute' would refuse everything"),
        ({"key_token_limits": ["bot=5/minute"]}, "'bot=5/minute' limits a key named 'bot'"),
        ({"token_limit": "1000/fortnight"}, "'1000/fortnight' is not a rate limit"),
    ],
)
def test_settings_say_what_is_wrong(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        GatewaySettings(api_keys=KEYS, **settings)


def test_settings_per_key_with_defaults() -> None:
    settings = GatewaySettings(
        api_keys=KEYS,
        token_limit="100/minute;1000/day",
        key_token_limits=["ci=10/minute"],
        key_models=["ci=google/gemma-*|qwen/*"],
    )
    assert settings.token_limit_for("ci") == "10/minute" and settings.token_limit_for("admin") == "100/minute;1000/day"
    assert settings.models_for("ci") == ["google/gemma-*", "qwen/*"] and settings.models_for("admin") is None
    assert GatewaySettings(api_keys=KEYS).token_limit_for("ci") is None


async def test_model_access_by_glob() -> None:
    acc, metrics = accounting(key_models=["ci=google/gemma-*|qwen/*"])
    assert acc.may_use("ci", "google/gemma-3-270m") and acc.may_use("ci", "qwen/qwen3-4b")
    assert not acc.may_use("ci", "mistralai/ministral-3b") and not acc.may_use("ci", "Qwen/x")  # case counts
    assert acc.may_use("admin", "mistralai/ministral-3b") and acc.may_use(None, "anything")
    assert acc.may_use_tool("admin", None) and not acc.may_use_tool("ci", None)  # list_models names every model
    with pytest.raises(Forbidden, match="Key 'ci' may not use model 'mistralai/ministral-3b'") as caught:
        await acc.admit("ci", "mistralai/ministral-3b")
    assert caught.value.status == 403 and caught.value.headers() == {}
    with pytest.raises(Forbidden, match="Key 'ci' may not use list_models"):
        await acc.admit_tool("ci", "list_models", None)
    await acc.admit_tool("admin", "list_models", None)
    assert metrics.snapshot()["usage_refused"] == {"budget": 0, "model": 2}


async def test_a_call_is_admitted_while_budget_is_left_and_charged_when_it_ends() -> None:
    acc, metrics = accounting(key_token_limits=["ci=100/minute"])
    await acc.admit("ci", "m")
    await acc.charge("ci", "m", 40, 50)  # 90 of 100
    await acc.admit("ci", "m")  # 10 left: admitted, whatever its size
    await acc.charge("ci", "m", 30, 30)  # 150: the last call overshot
    with pytest.raises(
        OverBudget, match=r"Token budget spent for key 'ci': 100 tokens per minute\. Retry in \d+ s\."
    ) as caught:
        await acc.admit("ci", "m")
    assert caught.value.status == 429 and 1 <= caught.value.retry_after <= 60
    assert caught.value.headers() == {"Retry-After": str(caught.value.retry_after)}
    await acc.admit("admin", "m")  # no budget of its own, and no default
    assert metrics.snapshot()["usage"] == [
        {"key": "ci", "model": "m", "calls": 2, "prompt_tokens": 70, "completion_tokens": 80},
    ]


async def test_the_tightest_window_says_when_to_retry() -> None:
    acc, _ = accounting(token_limit="1000/minute;50/day")
    await acc.charge("admin", "m", 60, 0)
    with pytest.raises(OverBudget, match="50 tokens per day") as caught:
        await acc.admit("admin", "m")
    assert caught.value.retry_after > 60


@pytest.mark.parametrize("fail_open", [True, False])
async def test_budgets_follow_the_store_outage_policy(fail_open: bool) -> None:
    # Nothing listens there: every store call fails at once.
    acc, metrics = accounting(
        token_limit="10/minute", redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_fail_open=fail_open
    )
    await acc.charge("ci", "m", 5, 5)  # lost, never raised; the usage is still counted here
    assert metrics.snapshot()["usage"][0]["calls"] == 1
    if fail_open:
        await acc.admit("ci", "m")
    else:
        with pytest.raises(OverBudget, match="Token budgets cannot be checked") as caught:
            await acc.admit("ci", "m")
        assert caught.value.status == 503 and caught.value.retry_after == 1
    await acc.limiter.aclose()


def test_tokens_used_reads_only_counts() -> None:
    assert tokens_used({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}) == (3, 4)
    assert tokens_used({"usage": {"prompt_tokens": 3}}) == (3, 0)  # an embedding
    for junk in (
        None,
        [],
        {"usage": None},
        {"usage": {"prompt_tokens": "3", "completion_tokens": True}},
        {"usage": {"prompt_tokens": -1, "completion_tokens": 2.5}},
    ):
        assert tokens_used(junk) == (0, 0), junk


def test_tokens_per_minute_keeps_the_last_hour() -> None:
    now = [10_000 * 60.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.record_usage("ci", "m", 5, 7)
    now[0] += 30
    metrics.record_usage("ci", "m", 1, 1)  # the same minute
    now[0] += 60
    metrics.record_usage("admin", "m", 2, 0)
    series = metrics.snapshot()["tokens_per_minute"]
    assert series["prompt"][-2:] == [6, 2] and series["completion"][-2:] == [8, 0] and sum(series["prompt"]) == 8
    now[0] += 59 * 60  # the first minute is now 60 minutes old: out of the window
    series = metrics.snapshot()["tokens_per_minute"]
    assert len(series["prompt"]) == 60 and sum(series["prompt"]) == 2 and series["prompt"][0] == 2
    now[0] += 120 * 60  # its slot is reused later without adding up old counts
    metrics.record_usage("ci", "m", 1, 1)
    assert sum(metrics.snapshot()["tokens_per_minute"]["prompt"]) == 1
