"""The decode node's remote-prefill bookkeeping frees a request's held blocks however its
abort interleaves with the Prefill RPC's answer and the engine's connector polling (engine
thread commands can run before the poll notices the abort), and never while the prefill
node may still write them: a failed RPC keeps them until `writes_ended`."""

from __future__ import annotations

import pytest

from splitserve.decode.remote_prefill import (
    RemotePrefillInfo,
    RemotePrefillParams,
    RemotePrefills,
    stall_timeout_s,
)
from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.request import RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import RemotePlan
from splitserve.kv_transfer import ArrivalTracker, Notification, PeerName, encode_tag


def sample(remote: RemotePrefills, name: str, **labels: str) -> float | None:
    """A sample of the connector's ReceiveMetrics (node_id "" and role decode: detached)."""
    return remote.metrics.registry.get_sample_value(
        name, {"node_id": "", "role": "decode", **labels}
    )


class NoNotifications:
    def get_notifs(self) -> list:
        return []


@pytest.fixture(scope="module")
def core(tiny_llama) -> EngineCore:
    return EngineCore(
        EngineConfig(
            ModelConfig(str(tiny_llama), dtype="float32"),
            CacheConfig(block_size=16, num_blocks=64),
        )
    )


def admitted(core: EngineCore, rid: str) -> RemotePrefills:
    """A request admitted for remote KV under a fresh connector."""
    remote = RemotePrefills(ArrivalTracker(NoNotifications()), 1024, core.block_size)
    core.connector = remote  # a fresh connector per test, on the shared engine
    plans: list[RemotePlan] = []
    prompt = list(range(1, 100))
    kv_params = RemotePrefillParams("prefill-0", 30, len(prompt), plans.append)
    core.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=8), kv_params)
    assert len(plans) == 1 and core.pool.usage > 0
    return remote


@pytest.mark.parametrize("answer", ["failed", "succeeded", "none_sent"])
def test_abort_before_the_hook_polls_still_frees_the_blocks(core, answer: str) -> None:
    rid = f"r-{answer}"
    remote = admitted(core, rid)
    core.abort(rid)  # the client went away; the blocks stay held for the prefill node
    assert core.pool.usage > 0
    if answer == "failed":
        remote.rpc_failed(rid, "CANCELLED: aborted on the prefill node")
        core.poll_connector()
        assert core.pool.usage > 0  # the prefill node may still write them
        remote.writes_ended(rid)
    elif answer == "succeeded":
        remote.rpc_succeeded(rid, 7, None, RemotePrefillInfo())
    else:
        remote.abandon(rid)
    core.poll_connector()
    assert core.pool.usage == 0.0 and remote.num_in_flight == 0
    core.check_invariants()


def test_blocks_stay_held_until_the_rpc_answers(core) -> None:
    remote = admitted(core, "r-late")
    core.abort("r-late")
    core.poll_connector()
    assert core.pool.usage > 0 and remote.num_in_flight == 1
    remote.rpc_failed("r-late", "DEADLINE_EXCEEDED")
    core.poll_connector()
    assert core.pool.usage > 0 and remote.num_in_flight == 1
    remote.writes_ended("r-late")
    core.poll_connector()
    assert core.pool.usage == 0.0 and remote.num_in_flight == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stalled(core: EngineCore, rid: str) -> RemotePrefills:
    """A request whose prefill node stopped pushing, past its no-progress deadline: it fell
    back to local prefill while its Prefill RPC is still outstanding."""
    clock = Clock()
    remote = RemotePrefills(ArrivalTracker(NoNotifications(), clock=clock), 1024, core.block_size)
    core.connector = remote
    prompt = list(range(1, 100))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    kv_params = RemotePrefillParams("prefill-0", 30, len(prompt), lambda plan: None)
    core.add_request(rid, prompt, params, kv_params)
    stall_s = stall_timeout_s(len(prompt), 30)
    assert 5 <= stall_s < 6 and stall_timeout_s(10**6, 30) == 15  # at most half the timeout
    clock.now = stall_s - 0.1
    core.poll_connector()
    assert remote.num_fallbacks == 0
    assert core.request_status(rid) == RequestStatus.WAITING_FOR_REMOTE_KV
    clock.now = stall_s + 0.1
    core.poll_connector()
    assert remote.num_fallbacks == 1 and remote.num_in_flight == 0
    assert core.request_status(rid) == RequestStatus.WAITING  # queued for local prefill
    fallbacks = "splitserve_decode_prefill_fallbacks_total"
    assert sample(remote, fallbacks, reason="transfer_failed") == 1
    assert sample(remote, fallbacks, reason="rpc_failed") == 0
    assert sample(remote, "splitserve_kv_transfer_receives_total", status="failed") == 1
    return remote


def test_stalled_prefill_falls_back_to_local_well_before_the_timeout(core) -> None:
    """A prefill node that stops pushing (frozen) costs the no-progress deadline derived from
    the prompt's size, not the whole prefill timeout."""
    remote = stalled(core, "r-stall")
    remote.rpc_failed("r-stall", "DEADLINE_EXCEEDED")
    remote.writes_ended("r-stall")
    core.abort("r-stall")
    core.poll_connector()
    assert core.pool.usage == 0.0
    core.check_invariants()


@pytest.mark.parametrize("answer", ["failed", "succeeded"])
def test_after_a_stall_fallback_blocks_stay_held_until_the_rpc_answers(core, answer) -> None:
    """The stalled prefill node may resume and still write the request's blocks until its
    Prefill RPC ends: a request that finished locally meanwhile keeps them held (no other
    request can be given them) until then."""
    remote = stalled(core, "r-resume")
    while core.has_unfinished():
        core.step()
    core.poll_connector()
    assert core.pool.usage > 0  # finished, but the prefill node may still write
    if answer == "failed":
        remote.rpc_failed("r-resume", "DEADLINE_EXCEEDED")
        core.poll_connector()
        assert core.pool.usage > 0  # the call ended here; the node may still be pushing
        remote.writes_ended("r-resume")
    else:
        remote.rpc_succeeded("r-resume", 7, None, RemotePrefillInfo())
    core.poll_connector()
    assert core.pool.usage == 0.0 and remote.num_in_flight == 0
    core.check_invariants()


def test_a_failed_rpc_falls_back_and_its_set_aside_blocks_go_once_writes_ended(core) -> None:
    """The Prefill RPC fails first (a deadline: the call ends here while the prefill node
    may still push): the request is prefilled here into fresh blocks at once; the ones the
    node was given stay set aside (no other request gets them) until `writes_ended` (its
    Abort answered), and go at the poll after it, not before the failure that set them
    aside was applied."""
    remote = admitted(core, "r-died")
    held = core.pool.num_blocks - core.pool.num_free_blocks
    remote.rpc_failed("r-died", "DEADLINE_EXCEEDED: Deadline Exceeded")
    core.poll_connector()  # the failure: prefill locally, the node's blocks set aside
    assert core.request_status("r-died") == RequestStatus.WAITING
    while core.has_unfinished():
        core.step()
    core.poll_connector()
    assert core.pool.num_blocks - core.pool.num_free_blocks == held  # still set aside
    remote.writes_ended("r-died")
    core.poll_connector()  # the release
    assert core.pool.usage == 0.0 and remote.num_fallbacks == 1
    fallbacks = "splitserve_decode_prefill_fallbacks_total"
    assert sample(remote, fallbacks, reason="rpc_failed") == 1
    assert sample(remote, "splitserve_decode_remote_prefills_total") == 1
    core.check_invariants()


class QueuedNotifications:
    """A notification source whose notifications the test hands in."""

    def __init__(self) -> None:
        self.queued: list[Notification] = []

    def get_notifs(self) -> list[Notification]:
        notes, self.queued = self.queued, []
        return notes


def test_kv_arrival_and_rpc_answer_join_the_batch_with_the_first_token(core) -> None:
    """Both halves needed, in either order: the request waits for remote KV until its last
    chunk landed and the RPC answered, then generates from the prefill node's token."""
    source = QueuedNotifications()
    remote = RemotePrefills(ArrivalTracker(source), 1024, core.block_size)
    core.connector = remote
    plans: list[RemotePlan] = []
    prompt = list(range(1, 100))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    kv_params = RemotePrefillParams("prefill-0", 30, len(prompt), plans.append)
    core.add_request("r-ok", prompt, params, kv_params)
    assert core.request_status("r-ok") == RequestStatus.WAITING_FOR_REMOTE_KV
    assert sample(remote, "splitserve_kv_transfer_receives_in_flight") == 1
    remote.rpc_succeeded("r-ok", 7, None, RemotePrefillInfo(num_cached_tokens=16))
    assert core.poll_connector() == ([], True)  # the RPC answered, the KV has not landed
    source.queued.append(Notification(PeerName("prefill-0"), encode_tag("r-ok", 0, True).encode()))
    outputs, is_busy = core.poll_connector()
    assert [o.new_token_ids for o in outputs] == [[7]] and not is_busy
    assert core.request_status("r-ok") == RequestStatus.WAITING
    tokens = [7]
    while core.has_unfinished():
        tokens += [t for o in core.step() for t in o.new_token_ids]
    assert len(tokens) == 3 and remote.num_completed == 1
    assert remote.pop_metrics("r-ok").is_prefill_remote
    num_received = len(plans[0].block_ids) - plans[0].num_cached_blocks
    k = "splitserve_kv_transfer_"
    assert sample(remote, k + "receives_total", status="ok") == 1
    assert sample(remote, k + "received_blocks_total") == num_received > 0
    assert sample(remote, k + "receive_bytes_sum") == num_received * 1024
    assert sample(remote, k + "receive_duration_seconds_count") == 1
    assert sample(remote, k + "receives_in_flight") == 0
    core.check_invariants()
