"""The routing rule on its own: bridges in known states, no network."""

from __future__ import annotations

from typing import Any

import mcp_types as types
import pytest

from gateway.metrics import Metrics
from gateway.pool import BridgePool
from gateway.router import Router
from gateway.settings import GatewaySettings

TOOL = "chat_a"
SCHEMA = {"type": "object"}


async def _noop() -> None:
    pass


def fleet(*states: tuple[bool, bool, int], **settings: Any) -> tuple[Router, BridgePool]:
    """One bridge per (healthy, loaded, slots), each offering TOOL for model "a"."""
    urls = [f"http://box{i}:3000" for i in range(len(states))]
    gateway_settings = GatewaySettings(bridges=urls, auth_disabled=True, **settings)
    pool = BridgePool(gateway_settings, on_change=_noop)
    for bridge, (healthy, loaded, slots) in zip(pool.bridges, states, strict=True):
        bridge.healthy = bridge.known = healthy
        bridge.tools = {TOOL: types.Tool(name=TOOL, input_schema=SCHEMA)}
        bridge.read_serving([{"model": "a", "tools": [TOOL], "loaded": loaded, "slots": slots, "in_flight": 0}])
    return Router(pool, gateway_settings, Metrics()), pool


def names(router: Router, arguments: dict[str, Any] | None = None) -> list[str]:
    return [b.name for b in router.candidates(TOOL, arguments)]


def busy(pool: BridgePool, index: int, calls: int) -> None:
    pool.bridges[index].in_flight["a"] = calls


def test_loaded_bridges_first_ties_take_turns() -> None:
    router, _ = fleet((True, False, 4), (True, True, 4), (True, True, 4))
    firsts = [names(router)[0] for _ in range(4)]
    assert firsts == ["box1:3000", "box2:3000", "box1:3000", "box2:3000"]
    assert names(router)[-1] == "box0:3000"  # the one that would load the model comes last


def test_fewest_calls_per_slot_wins() -> None:
    router, pool = fleet((True, True, 8), (True, True, 2))
    busy(pool, 0, 4)  # half its slots
    busy(pool, 1, 2)  # all its slots
    assert names(router)[0] == "box0:3000"


def test_cold_bridge_only_when_loaded_ones_are_saturated_beyond_the_ratio() -> None:
    router, pool = fleet((True, True, 4), (True, False, 4), spill_ratio=2.0)
    busy(pool, 0, 7)
    assert names(router)[0] == "box0:3000"  # 1.75 calls per slot: still queue where it is loaded
    busy(pool, 0, 8)
    assert names(router)[0] == "box1:3000"  # 2 per slot: loading elsewhere is worth it now


def test_a_call_to_a_cold_bridge_counts_the_model_as_loading_there() -> None:
    router, pool = fleet((True, False, 4), (True, False, 4))
    metrics = router.metrics
    chosen = router.candidates(TOOL, None)[0]
    with router.counted(chosen, TOOL):
        assert chosen.is_loaded(TOOL)
        assert names(router)[0] == chosen.name  # the next call queues there instead of loading elsewhere
    labels = {"bridge": chosen.name, "model": "a"}
    assert metrics.registry.get_sample_value("llm_hub_bridge_jit_loads_total", labels) == 1
    assert pool.bridges[0].in_flight["a"] == pool.bridges[1].in_flight["a"] == 0


def test_unhealthy_bridges_are_never_candidates() -> None:
    router, _ = fleet((False, True, 4), (True, False, 4))
    assert names(router) == ["box1:3000"]
    router, _ = fleet((False, True, 4))
    assert names(router) == []


def test_other_gateways_calls_reported_by_the_bridge_count_too() -> None:
    router, pool = fleet((True, True, 4), (True, True, 4))
    pool.bridges[0].models["a"].reported_in_flight = 4  # another gateway's calls, at the last health check
    assert names(router)[0] == "box1:3000"


def test_round_robin_ignores_load_state() -> None:
    router, pool = fleet((True, False, 4), (True, True, 4), routing="round-robin")
    busy(pool, 1, 100)
    assert [names(router)[0] for _ in range(4)] == ["box0:3000", "box1:3000"] * 2


@pytest.mark.parametrize("enabled", [True, False])
def test_affinity_keeps_a_conversation_on_one_bridge(enabled: bool) -> None:
    router, pool = fleet((True, True, 4), (True, True, 4), affinity=enabled)
    first = [{"role": "user", "content": "hello"}]
    later = [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    home = names(router, {"messages": first})[0]
    followers = {names(router, {"messages": later})[0] for _ in range(4)}
    if enabled:
        assert followers == {home}
        # A full bridge lets the conversation go elsewhere rather than wait.
        busy(pool, [b.name for b in pool.bridges].index(home), 4)
        assert names(router, {"messages": later})[0] != home
    else:
        assert len(followers) == 2


def test_no_second_load_while_the_first_is_under_way() -> None:
    router, _ = fleet((True, False, 4), (True, False, 4), spill_ratio=1.0)
    first = router.candidates(TOOL, None)[0]
    with router.counted(first, TOOL):
        for _ in range(8):  # calls queue behind the load, well past the spill ratio
            first.started(TOOL)
        assert names(router)[0] == first.name
        # A health check taken mid-load still says "not loaded": the load stays counted as ours.
        first.read_serving([{"model": "a", "tools": [TOOL], "loaded": False, "slots": 4, "in_flight": 9}])
        assert first.is_loaded(TOOL) and names(router)[0] == first.name
    first.read_serving([{"model": "a", "tools": [TOOL], "loaded": True, "slots": 4, "in_flight": 8}])
    assert names(router)[0] != first.name  # loaded now, and 8 calls on 4 slots: the other box is worth loading
