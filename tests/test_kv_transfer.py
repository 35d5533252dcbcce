"""KV transfer: pure parts (runs, tags, tracker) and real NIXL between two processes (CPU)."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from splitserve.kv_transfer import (
    ArrivalTracker,
    Notification,
    PeerName,
    PoolDescriptor,
    PushResult,
    Run,
    TransferAgent,
    TransferConfig,
    coalesce_runs,
    decode_tag,
    encode_tag,
)
from splitserve.kv_transfer.layout import describe_pool
from splitserve.kv_transfer.peer_process import PeerProcess, PoolSpec, fill_pool

# Real node processes (or two NIXL processes): `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

# A tiny model's pool: 64 blocks x 2 layers x (K, V) x 16 tokens x 2 kv heads x 16 dims, fp32.
SHAPE = (64, 2, 2, 16, 2, 16)
POISON = -1234.5


# ---- coalesce_runs ----------------------------------------------------------------------


def test_coalesce_runs_examples() -> None:
    assert coalesce_runs([], []) == []
    assert coalesce_runs([4], [9]) == [Run(4, 9, 1)]
    assert coalesce_runs([1, 2, 3, 7, 8], [10, 11, 12, 13, 14]) == [Run(1, 10, 3), Run(7, 13, 2)]
    # consecutive on one side only: no merge
    assert coalesce_runs([1, 2, 3], [5, 7, 8]) == [Run(1, 5, 1), Run(2, 7, 2)]
    # descending ids are not a run
    assert coalesce_runs([3, 2], [3, 2]) == [Run(3, 3, 1), Run(2, 2, 1)]
    with pytest.raises(ValueError, match="differ in length"):
        coalesce_runs([1, 2], [1])


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=60))
def test_coalesce_runs_covers_pairs_maximally(pairs: list[tuple[int, int]]) -> None:
    src, dst = [p[0] for p in pairs], [p[1] for p in pairs]
    runs = coalesce_runs(src, dst)
    expanded = [(r.src_start + i, r.dst_start + i) for r in runs for i in range(r.length)]
    assert expanded == pairs
    for a, b in itertools.pairwise(runs):
        assert not (b.src_start == a.src_start + a.length and b.dst_start == a.dst_start + a.length)


# ---- tags --------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["r1", "cmpl-3f2a:0", "a b/c\\d", "é中🙂", "x" * 200])
@pytest.mark.parametrize(("idx", "last"), [(0, True), (0, False), (17, True)])
def test_tag_round_trip(rid: str, idx: int, last: bool) -> None:
    tag = decode_tag(encode_tag(rid, idx, last))
    assert (tag.request_id, tag.chunk_idx, tag.is_last) == (rid, idx, last)


def test_tag_format_is_stable() -> None:
    assert encode_tag("req-1", 3, True) == "req-1|3|1"
    assert encode_tag("req-1", 0, False) == "req-1|0|0"


@pytest.mark.parametrize("rid", ["", "a|b", "|"])
def test_tag_rejects_bad_request_ids(rid: str) -> None:
    with pytest.raises(ValueError):
        encode_tag(rid, 0, True)


@pytest.mark.parametrize("idx", [-1, 1.0, True])
def test_tag_rejects_bad_chunk_index(idx: object) -> None:
    with pytest.raises(ValueError, match="chunk_idx"):
        encode_tag("r", idx, True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tag", ["", "r", "r|1", "r|1|0|x", "|1|0", "r|x|0", "r|-1|0", "r|01|0", "r|1|2", "r|1|"]
)
def test_decode_rejects_malformed(tag: str) -> None:
    with pytest.raises(ValueError):
        decode_tag(tag)


# ---- layout and config -------------------------------------------------------------------


def test_pool_descriptor() -> None:
    pool = torch.zeros(SHAPE)
    desc = describe_pool(pool, "node-a")
    assert desc.block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    assert (desc.base_addr, desc.num_blocks, desc.mem_type, desc.device_id) == (
        pool.data_ptr(),
        64,
        "DRAM",
        0,
    )
    assert PoolDescriptor.from_json(desc.to_json()) == desc
    with pytest.raises(ValueError, match="mem_type"):
        PoolDescriptor("a", 0, 8, 1, "HBM", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contiguous"):
        describe_pool(torch.zeros(8, 4).t(), "a")


def test_config_validation() -> None:
    assert TransferConfig("a").use_progress_thread(is_gpu_pool=False) is False
    assert TransferConfig("a").use_progress_thread(is_gpu_pool=True) is True
    with pytest.raises(ValueError, match="ucx_error_handling_mode"):
        TransferConfig("a", ucx_error_handling_mode="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeouts"):
        TransferConfig("a", push_timeout_s=0)


# ---- ArrivalTracker with plain objects ----------------------------------------------------


class FakeSource:
    def __init__(self) -> None:
        self.pending: list[Notification] = []

    def send(self, message: str, peer: str = "p0") -> None:
        self.pending.append(Notification(PeerName(peer), message.encode()))

    def get_notifs(self) -> list[Notification]:
        out, self.pending = self.pending, []
        return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tracked() -> tuple[ArrivalTracker, FakeSource, FakeClock]:
    source, clock = FakeSource(), FakeClock()
    return ArrivalTracker(source, timeout_s=5.0, clock=clock), source, clock


def test_tracker_completes_out_of_order(tracked) -> None:
    tracker, source, clock = tracked
    tracker.expect("a")
    tracker.expect("b")
    source.send(encode_tag("a", 2, True))
    source.send(encode_tag("b", 0, True))
    source.send(encode_tag("a", 0, False))
    clock.now += 1.5
    assert [(r.request_id, r.ok, r.num_chunks) for r in tracker.poll()] == [("b", True, 1)]
    source.send(encode_tag("a", 1, False))
    [done] = tracker.poll()
    assert (done.request_id, done.ok, done.num_chunks, done.elapsed_s) == ("a", True, 3, 1.5)
    assert tracker.num_expected == 0


def test_tracker_times_out_and_forgets(tracked, caplog) -> None:
    tracker, source, clock = tracked
    tracker.expect("slow")
    tracker.expect("aborted")
    source.send(encode_tag("slow", 1, True))
    assert tracker.poll() == []
    assert tracker.forget("aborted") and not tracker.forget("aborted")
    clock.now += 5.1
    [late] = tracker.poll()
    assert (late.request_id, late.ok) == ("slow", False)
    assert "timed out" in (late.error or "") and "[1]" in (late.error or "")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="splitserve.kv_transfer.arrivals"):
        source.send(encode_tag("slow", 0, False))
        source.send(encode_tag("aborted", 0, True))
        assert tracker.poll() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tracker_rejects_bad_sequences(tracked, caplog) -> None:
    tracker, source, _ = tracked
    tracker.expect("dup")
    tracker.expect("after-last")
    source.send(encode_tag("dup", 0, False))
    source.send(encode_tag("dup", 0, False))
    source.send(encode_tag("after-last", 1, True))
    source.send(encode_tag("after-last", 2, False))
    source.send("not a tag")
    with caplog.at_level(logging.WARNING):
        [bad] = tracker.poll()
    assert (bad.request_id, bad.ok) == ("after-last", False)
    assert "duplicate KV chunk 0" in caplog.text and "not a tag" in caplog.text
    with pytest.raises(ValueError, match="already expected"):
        tracker.expect("dup")


def test_tracker_filters_by_peer(tracked, caplog) -> None:
    tracker, source, _ = tracked
    tracker.expect("retry", peer="p2")
    source.send(encode_tag("retry", 0, True), peer="p1")
    with caplog.at_level(logging.WARNING):
        assert tracker.poll() == []
    assert "expects its KV from p2" in caplog.text
    source.send(encode_tag("retry", 0, True), peer="p2")
    assert [(r.request_id, r.ok) for r in tracker.poll()] == [("retry", True)]


# ---- two real processes ------------------------------------------------------------------


class Sender:
    """This process's agent, collecting push results while anything waits."""

    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self.results: dict[int, PushResult] = {}

    def pump(self) -> None:
        for r in self.agent.poll():
            self.results[r.push_id] = r

    def wait(self, push_ids: list[int], timeout_s: float = 20.0) -> list[PushResult]:
        deadline = time.monotonic() + timeout_s
        while not all(i in self.results for i in push_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pushes {push_ids} unfinished after {timeout_s} s")
            self.pump()
        return [self.results.pop(i) for i in push_ids]


@pytest.fixture(scope="module")
def receiver() -> Iterator[PeerProcess]:
    peer = PeerProcess(TransferConfig("kvt-recv", arrival_timeout_s=20.0), PoolSpec(SHAPE))
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def sender(receiver: PeerProcess) -> Iterator[Sender]:
    pool = torch.empty(SHAPE)
    fill_pool(pool, seed=7)
    with TransferAgent(TransferConfig("kvt-send", push_timeout_s=10.0), pool) as agent:
        yield Sender(agent)


def _chunks(ids: list[int], num_chunks: int) -> list[list[int]]:
    step = -(-len(ids) // num_chunks)
    return [ids[i : i + step] for i in range(0, len(ids), step)]


def test_interleaved_requests_land_exactly(sender: Sender, receiver: PeerProcess) -> None:
    rng = random.Random(3)
    peer = sender.agent.connect(receiver.metadata, receiver.descriptor)
    assert sender.agent.connect(receiver.metadata, receiver.descriptor) == peer  # cached
    receiver.call("poison", POISON, pump=sender.pump)
    # a run of 3 blocks adjacent on both sides, then random ids
    src_all = [40, 41, 42, *rng.sample([i for i in range(64) if not 40 <= i <= 42], 42)]
    dst_all = [30, 31, 32, *rng.sample([i for i in range(64) if not 30 <= i <= 32], 42)]
    requests = {
        f"req:{i}": (src_all[i * 15 : (i + 1) * 15], dst_all[i * 15 : (i + 1) * 15])
        for i in range(3)
    }
    plan = []
    for rid, (src, dst) in requests.items():
        receiver.call("expect", rid, 20.0, pump=sender.pump)
        chunks = [*list(zip(_chunks(src, 3), _chunks(dst, 3), strict=True)), ([], [])]
        plan.append([(rid, i, i == len(chunks) - 1, s, d) for i, (s, d) in enumerate(chunks)])
    handles = []
    for round_ in zip(*plan, strict=True):  # chunk 0 of every request, then chunk 1, ...
        for rid, idx, is_last, s, d in round_:
            handles.append(sender.agent.push(peer, s, d, encode_tag(rid, idx, is_last)))
    assert handles[0].num_descs == len(coalesce_runs(src_all[:5], dst_all[:5])) <= 3
    arrived = {}
    for _ in requests:
        a = receiver.wait_event("arrival", pump=sender.pump)
        arrived[a.request_id] = a
    assert {rid: (a.ok, a.num_chunks) for rid, a in arrived.items()} == {
        rid: (True, 4) for rid in requests
    }
    results = sender.wait([h.push_id for h in handles])
    assert all(r.ok for r in results)
    assert sum(r.num_bytes for r in results) == 45 * sender.agent.pool_descriptor.block_bytes
    got = torch.frombuffer(
        bytearray(receiver.call("snapshot", pump=sender.pump)), dtype=torch.float32
    ).reshape(SHAPE)
    expected = torch.full(SHAPE, POISON)
    expected[dst_all] = sender.agent._pool[src_all]
    assert torch.equal(got, expected)


def test_push_argument_errors(sender: Sender, receiver: PeerProcess) -> None:
    peer = sender.agent.connect(receiver.metadata, receiver.descriptor)
    with pytest.raises(ValueError, match="not connected"):
        sender.agent.push(PeerName("nobody"), [0], [0], encode_tag("r", 0, True))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        sender.agent.push(peer, [0], [64], encode_tag("r", 0, True))
    with pytest.raises(ValueError, match="repeat"):
        sender.agent.push(peer, [0, 1], [5, 5], encode_tag("r", 0, True))
    with pytest.raises(ValueError, match="3 fields"):
        sender.agent.push(peer, [0], [5], "r-0-1")


def _pretend_in_progress(agent: TransferAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Post transfers for real but have NIXL answer "in progress" until the test ends."""
    nixl = agent._agent
    post = nixl.transfer
    monkeypatch.setattr(nixl, "transfer", lambda xfer, *a: post(xfer, *a) and "PROC")
    monkeypatch.setattr(nixl, "check_xfer_state", lambda xfer: "PROC")


def test_stalled_push_times_out(sender: Sender, receiver: PeerProcess, monkeypatch) -> None:
    peer = sender.agent.connect(receiver.metadata, receiver.descriptor)
    _pretend_in_progress(sender.agent, monkeypatch)
    handle = sender.agent.push(
        peer, list(range(32)), list(range(32)), encode_tag("stall", 0, True), timeout_s=0.3
    )
    assert sender.agent.num_in_flight == 1
    [result] = sender.wait([handle.push_id], timeout_s=5.0)
    assert (result.request_id, result.ok) == ("stall", False)
    assert "timed out" in (result.error or "") and 0.3 <= result.elapsed_s < 2.0


def test_disconnect_fails_in_flight_pushes(
    sender: Sender, receiver: PeerProcess, monkeypatch
) -> None:
    peer = sender.agent.connect(receiver.metadata, receiver.descriptor)
    with monkeypatch.context() as patch:
        _pretend_in_progress(sender.agent, patch)
        handle = sender.agent.push(peer, [1, 2], [1, 2], encode_tag("gone", 0, True))
        assert sender.agent.num_in_flight == 1
        sender.agent.disconnect(peer)
    [result] = sender.wait([handle.push_id])
    assert not result.ok and "disconnected" in (result.error or "")
    assert peer not in sender.agent.peers
    with pytest.raises(ValueError, match="not connected"):
        sender.agent.push(peer, [0], [0], encode_tag("gone", 1, True))
    # reconnecting works
    assert sender.agent.connect(receiver.metadata, receiver.descriptor) == peer
    receiver.call("expect", "again", pump=sender.pump)
    again = sender.agent.push(peer, [9], [9], encode_tag("again", 0, True))
    assert receiver.wait_event("arrival", pump=sender.pump).request_id == "again"
    assert sender.wait([again.push_id])[0].ok


def test_unknown_tag_is_logged_and_ignored(caplog) -> None:
    pool = torch.full(SHAPE, POISON)
    config = TransferConfig("kvt-dec", arrival_timeout_s=20.0)
    with TransferAgent(config, pool) as agent:
        tracker = ArrivalTracker(agent, config.arrival_timeout_s)
        arrivals: list = []
        pump = lambda: arrivals.extend(tracker.poll())  # noqa: E731
        prefill = PeerProcess(TransferConfig("kvt-pre"), PoolSpec(SHAPE))
        try:
            tracker.expect("known")
            meta, desc = agent.metadata(), agent.pool_descriptor.to_json()
            peer = prefill.call("connect", meta, desc, pump=pump)
            prefill.call("fill", 11, pump=pump)
            with caplog.at_level(logging.WARNING, logger="splitserve.kv_transfer.arrivals"):
                prefill.call("notify", peer, encode_tag("stranger", 0, True), pump=pump)
                prefill.call(
                    "push", peer, [3, 4], [60, 10], encode_tag("known", 0, True), pump=pump
                )
                deadline = time.monotonic() + 20
                while not arrivals and time.monotonic() < deadline:
                    pump()
        finally:
            prefill.close()
    assert [(a.request_id, a.ok) for a in arrivals] == [("known", True)]
    assert "unknown request" in caplog.text and "stranger|0|1" in caplog.text
    expected = torch.empty(SHAPE)
    fill_pool(expected, 11)
    assert torch.equal(pool[[60, 10]], expected[[3, 4]])
    pool[[60, 10]] = POISON
    assert bool((pool == POISON).all())


def test_push_to_killed_peer_fails_within_timeout() -> None:
    victim = PeerProcess(TransferConfig("kvt-victim"), PoolSpec(SHAPE))
    pool = torch.zeros(SHAPE)
    timeout_s = 5.0
    with TransferAgent(TransferConfig("kvt-killer", push_timeout_s=timeout_s), pool) as agent:
        sender = Sender(agent)
        try:
            peer = agent.connect(victim.metadata, victim.descriptor)
            victim.call("expect", "before", pump=sender.pump)
            first = agent.push(peer, [1, 2], [2, 3], encode_tag("before", 0, True))
            victim.wait_event("arrival", pump=sender.pump)
            assert sender.wait([first.push_id])[0].ok
            victim.kill()
        finally:
            victim.close()
        started = time.monotonic()
        handles = [agent.push(peer, [5, 6], [7, 8], encode_tag("after", i, i == 1)) for i in (0, 1)]
        results = sender.wait([h.push_id for h in handles], timeout_s=timeout_s + 5)
        assert time.monotonic() - started < timeout_s + 1.0
        assert [(r.request_id, r.ok) for r in results] == [("after", False)] * 2
        assert all(r.error for r in results)


def test_split_runs_caps_descriptor_length() -> None:
    from splitserve.kv_transfer.layout import Run, split_runs

    runs = [Run(0, 10, 5), Run(20, 3, 2)]
    assert split_runs(runs, 0) == runs
    assert split_runs(runs, 2) == [Run(0, 10, 2), Run(2, 12, 2), Run(4, 14, 1), Run(20, 3, 2)]
    assert sum(r.length for r in split_runs(runs, 3)) == 7


def test_tracker_reports_a_stall_long_before_the_timeout(tracked) -> None:
    tracker, source, clock = tracked  # overall timeout 5 s
    tracker.expect("stuck", stall_timeout_s=1.0)
    tracker.expect("moving", stall_timeout_s=1.0)
    clock.now += 0.8
    source.send(encode_tag("moving", 0, False))
    assert tracker.poll() == []
    clock.now += 0.8  # "stuck": 1.6 s without a chunk; "moving": 0.8 s since its last
    source.send(encode_tag("moving", 1, False))
    [stuck] = tracker.poll()
    assert (stuck.request_id, stuck.ok) == ("stuck", False) and "stalled" in (stuck.error or "")
    clock.now += 1.1
    [late] = tracker.poll()
    assert (late.request_id, late.ok, late.num_chunks) == ("moving", False, 2)
    with pytest.raises(ValueError, match="stall_timeout_s"):
        tracker.expect("bad", stall_timeout_s=0)


def test_a_busy_prefill_node_is_not_stalled_while_its_chunks_land(tracked) -> None:
    """Progress counts per prefill node: a node computing other prompts first keeps the
    requests queued behind them alive; a node that sends nothing stalls all of its own."""
    tracker, source, clock = tracked  # overall timeout 5 s
    tracker.expect("first", peer="p0", stall_timeout_s=1.0)
    tracker.expect("queued", peer="p0", stall_timeout_s=1.0)
    tracker.expect("frozen", peer="p1", stall_timeout_s=1.0)
    for idx in range(3):  # p0 pushes "first" only, a chunk every 0.8 s
        clock.now += 0.8
        source.send(encode_tag("first", idx, False), peer="p0")
        failed = tracker.poll()
        assert [r.request_id for r in failed] == (["frozen"] if idx == 1 else [])
    clock.now += 1.1  # p0 silent too now
    assert sorted(r.request_id for r in tracker.poll()) == ["first", "queued"]
