"""The decode node's remote-prefill bookkeeping frees a request's held blocks however its
abort interleaves with the Prefill RPC's answer and the step hook's polling (engine
thread commands can run before the hook notices the abort)."""

from __future__ import annotations

import pytest

from splitserve.decode.remote_prefill import RemotePrefillInfo, RemotePrefills, stall_timeout_s
from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.request import RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv_transfer import ArrivalTracker


class NoNotifications:
    def get_notifs(self) -> list:
        return []


@pytest.fixture(scope="module")
def core(tiny_llama) -> EngineCore:
    return EngineCore(
        EngineConfig(
            ModelConfig(str(tiny_llama), dtype="float32"),
            CacheConfig(block_size=16, num_blocks=64),
            SchedulerConfig(role="decode"),
        )
    )


def admitted(core: EngineCore, rid: str) -> RemotePrefills:
    remote = RemotePrefills(ArrivalTracker(NoNotifications()), lambda outs: None, 1024)
    params = SamplingParams(temperature=0, max_tokens=8)
    plan = remote.admit(core, rid, list(range(1, 100)), params, "prefill-0", timeout_s=30)
    assert plan is not None and core.pool.usage > 0
    return remote


@pytest.mark.parametrize("answer", ["failed", "succeeded", "none_sent"])
def test_abort_before_the_hook_polls_still_frees_the_blocks(core, answer: str) -> None:
    rid = f"r-{answer}"
    remote = admitted(core, rid)
    core.abort(rid)  # the client went away; the blocks stay held for the prefill node
    assert core.pool.usage > 0
    if answer == "failed":
        remote.rpc_failed(core, rid, "CANCELLED: aborted on the prefill node")
    elif answer == "succeeded":
        remote.rpc_succeeded(core, rid, 7, None, RemotePrefillInfo())
    else:
        remote.abandon(rid)
    remote.poll(core)
    assert core.pool.usage == 0.0 and remote.num_in_flight == 0
    core.check_invariants()


def test_blocks_stay_held_until_the_rpc_answers(core) -> None:
    remote = admitted(core, "r-late")
    core.abort("r-late")
    remote.poll(core)
    assert core.pool.usage > 0 and remote.num_in_flight == 1
    remote.rpc_failed(core, "r-late", "DEADLINE_EXCEEDED")
    assert core.pool.usage == 0.0 and remote.num_in_flight == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stalled_prefill_falls_back_to_local_well_before_the_timeout(core) -> None:
    """A prefill node that stops pushing (frozen) costs the no-progress deadline derived from
    the prompt's size, not the whole prefill timeout."""
    clock = Clock()
    remote = RemotePrefills(ArrivalTracker(NoNotifications(), clock=clock), lambda outs: None, 1024)
    params = SamplingParams(temperature=0, max_tokens=8)
    prompt = list(range(1, 100))
    assert remote.admit(core, "r-stall", prompt, params, "prefill-0", timeout_s=30) is not None
    stall_s = stall_timeout_s(len(prompt), 30)
    assert 5 <= stall_s < 6 and stall_timeout_s(10**6, 30) == 15  # at most half the timeout
    clock.now = stall_s - 0.1
    remote.poll(core)
    assert remote.num_fallbacks == 0
    assert core.request_status("r-stall") == RequestStatus.WAITING_FOR_REMOTE_KV
    clock.now = stall_s + 0.1
    remote.poll(core)
    assert remote.num_fallbacks == 1 and remote.num_in_flight == 0
    assert core.request_status("r-stall") == RequestStatus.WAITING  # queued for local prefill
    core.abort("r-stall")
    core.check_invariants()
