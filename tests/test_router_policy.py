"""Routing policy (router/policy.py) on plain node records: no sockets, exact choices."""

from __future__ import annotations

import pytest

from splitserve.node.registry import NodeCapacity, NodeId, NodeLoad, NodeRecord
from splitserve.router.policy import (
    PolicyConfig,
    RoutingInputs,
    cached_tokens,
    choose_route,
    node_cost,
)

BS = 16


def node(name: str, role: str = "decode", running: int = 0, waiting: int = 0, kv: float = 0.0):
    return NodeRecord(
        node_id=NodeId(name),
        role=role,  # type: ignore[arg-type]
        grpc_address=f"{name}:1",
        nixl_agent_name=name,
        model="m",
        block_size=BS,
        capacity=NodeCapacity(num_kv_blocks=1000, max_num_seqs=64),
        load=NodeLoad(num_running=running, num_waiting=waiting, kv_usage=kv),
    )


def inputs(decode, prefill=(), cached=None, prompt_len=1024, n=1, rotation=0) -> RoutingInputs:
    return RoutingInputs(
        prompt_len=prompt_len,
        n=n,
        decode_nodes=list(decode),
        prefill_nodes=list(prefill),
        cached_blocks={NodeId(k): v for k, v in (cached or {}).items()},
        rotation=rotation,
    )


CACHE = PolicyConfig(name="cache_aware", disagg_min_tokens=256)


def test_cache_aware_picks_the_node_holding_the_prefix() -> None:
    decode = [node("d0"), node("d1"), node("d2")]
    for rotation in range(3):
        decision = choose_route(inputs(decode, cached={"d1": 40}, rotation=rotation), CACHE)
        assert decision.decode.node_id == "d1"
        assert decision.decode_cached_tokens == 40 * BS
        assert decision.prefill is None and decision.reason == "no prefill node"


def test_longer_prefix_wins_and_a_little_load_does_not_undo_a_large_prefix() -> None:
    decode = [node("d0"), node("d1", running=2, waiting=1)]
    # d1 holds 60 blocks (960 tokens); its queue costs 512 + 2 * 32 = 576 < 960 - 160.
    decision = choose_route(inputs(decode, cached={"d0": 10, "d1": 60}), CACHE)
    assert decision.decode.node_id == "d1"
    # With four queued requests (2048 tokens of work) the idle node wins.
    decode = [node("d0"), node("d1", waiting=4)]
    decision = choose_route(inputs(decode, cached={"d0": 10, "d1": 60}), CACHE)
    assert decision.decode.node_id == "d0"


def test_herding_cap_skips_an_overloaded_node_even_with_the_whole_prefix() -> None:
    config = PolicyConfig(name="cache_aware", waiting_request_tokens=0, running_request_tokens=0)
    # Queue terms off: only the herding cap can keep the request off d1.
    busy = [node("d0", running=2), node("d1", running=20)]
    assert choose_route(inputs(busy, cached={"d1": 63}), config).decode.node_id == "d0"
    # Within the absolute margin (8 requests) the prefix still wins.
    close = [node("d0", running=2), node("d1", running=10)]
    assert choose_route(inputs(close, cached={"d1": 63}), config).decode.node_id == "d1"
    # Beyond the absolute margin but within the relative one (1.5x) it also wins.
    relative = [node("d0", running=40), node("d1", running=55)]
    assert choose_route(inputs(relative, cached={"d1": 63}), config).decode.node_id == "d1"


def test_kv_pressure_steers_away_from_a_full_node() -> None:
    decode = [node("d0", kv=0.99), node("d1", kv=0.2)]
    decision = choose_route(inputs(decode, cached={"d0": 20}), CACHE)
    assert decision.decode.node_id == "d1"
    assert node_cost(decode[0], inputs(decode), CACHE) > 1024 + 3900


def test_conditional_disaggregation_threshold() -> None:
    decode, prefill = [node("d0")], [node("p0", "prefill"), node("p1", "prefill")]
    # 1024-token prompt, 49 blocks (784 tokens) cached on d0: 240 uncached < 256 -> local.
    local = choose_route(inputs(decode, prefill, cached={"d0": 49}), CACHE)
    assert local.prefill is None and local.reason == "short uncached prompt"
    # 48 blocks cached: 256 uncached -> remote, on the prefill node holding more of it.
    remote = choose_route(inputs(decode, prefill, cached={"d0": 48, "p1": 30}), CACHE)
    assert remote.prefill is not None and remote.prefill.node_id == "p1"
    assert remote.prefill_cached_tokens == 30 * BS and remote.reason == "disagg"
    # A short prompt never leaves the decode node.
    short = choose_route(inputs(decode, prefill, prompt_len=200), CACHE)
    assert short.prefill is None
    # n > 1 is always prefilled by the decode node.
    assert choose_route(inputs(decode, prefill, n=2), CACHE).reason == "n>1"


def test_disaggregation_skips_busy_prefill_nodes_and_balances_them() -> None:
    decode = [node("d0")]
    busy = [node("p0", "prefill", waiting=33)]
    assert choose_route(inputs(decode, busy), CACHE).reason == "prefill nodes busy"
    prefill = [node("p0", "prefill", waiting=3), node("p1", "prefill")]
    assert choose_route(inputs(decode, prefill), CACHE).prefill.node_id == "p1"  # type: ignore[union-attr]
    config = PolicyConfig(name="cache_aware", disagg_min_tokens=0)
    assert choose_route(inputs(decode, prefill, prompt_len=2), config).prefill is not None


def test_round_robin_cycles_in_node_id_order() -> None:
    decode = [node("d2"), node("d0"), node("d1", waiting=50)]
    config = PolicyConfig(name="round_robin")
    chosen = [
        choose_route(inputs(decode, cached={"d2": 60}, rotation=r), config).decode.node_id
        for r in range(6)
    ]
    assert chosen == ["d0", "d1", "d2", "d0", "d1", "d2"]


def test_least_load_ignores_prefixes() -> None:
    decode = [node("d0", running=3), node("d1", running=1, waiting=1), node("d2", running=4)]
    config = PolicyConfig(name="least_load")
    decision = choose_route(inputs(decode, cached={"d2": 60}), config)
    assert decision.decode.node_id == "d1"
    # Equal load: KV usage breaks the tie.
    decode = [node("d0", running=1, kv=0.5), node("d1", running=1, kv=0.1)]
    assert choose_route(inputs(decode), config).decode.node_id == "d1"


def test_ties_rotate_so_equal_nodes_share_traffic() -> None:
    decode = [node("d0"), node("d1"), node("d2")]
    for config in (CACHE, PolicyConfig(name="least_load")):
        chosen = {choose_route(inputs(decode, rotation=r), config).decode.node_id for r in range(3)}
        assert chosen == {"d0", "d1", "d2"}


def test_cached_tokens_never_cover_the_last_prompt_token() -> None:
    d = node("d0")
    assert cached_tokens(d, inputs([d], cached={"d0": 4}, prompt_len=64)) == 63
    assert cached_tokens(d, inputs([d], cached={"d0": 2}, prompt_len=64)) == 32
    assert cached_tokens(d, inputs([d], prompt_len=64)) == 0


def test_config_and_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="routing policy must be one of"):
        PolicyConfig(name="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disagg_min_tokens"):
        PolicyConfig(disagg_min_tokens=-1)
    with pytest.raises(ValueError, match="no decode node"):
        choose_route(inputs([]), CACHE)


def test_short_prefill_moves_off_a_backed_up_decode_node() -> None:
    prefill = [node("p0", role="prefill")]
    # 1024-token prompt, 60 blocks cached on d0: 64 uncached tokens, a short prefill.
    calm = choose_route(inputs([node("d0", waiting=1)], prefill, cached={"d0": 60}), CACHE)
    assert calm.prefill is None and calm.reason == "short uncached prompt"
    busy = choose_route(inputs([node("d0", waiting=6)], prefill, cached={"d0": 60}), CACHE)
    assert busy.prefill is not None and busy.prefill.node_id == "p0"
    prefill_busier = [node("p0", role="prefill", waiting=9)]
    stays = choose_route(inputs([node("d0", waiting=6)], prefill_busier, cached={"d0": 60}), CACHE)
    assert stays.prefill is None
