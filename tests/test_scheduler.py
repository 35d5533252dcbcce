"""Scheduler with plain objects: budgets, chunking, preemption, FCFS, remote KV."""

from __future__ import annotations

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.config import SchedulerConfig
from splitserve.engine.hashing import seed_hash
from splitserve.engine.request import Request, RequestId, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler

BS = 4


def make(num_blocks: int, **kwargs: object) -> Scheduler:
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(**kwargs), BlockManager(pool, BS, seed_hash("m", BS)))  # type: ignore[arg-type]


def req(rid: str, num_tokens: int, base: int = 0) -> Request:
    tokens = [base + i for i in range(num_tokens)]
    return Request(RequestId(rid), tokens, SamplingParams(), max_new_tokens=16)


def run_step(sched: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule, pretend the model ran, append a sampled token where a chunk samples."""
    out = sched.schedule()
    sched.advance(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.output_token_ids.append(7)
    return [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks]


def test_chunked_prefill_and_mixed_batches() -> None:
    sched = make(32, max_num_batched_tokens=8)
    a, b = req("a", 10), req("b", 5, base=100)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == [("a", 0, 8)]
    assert run_step(sched) == [("a", 8, 2), ("b", 0, 5)]  # a's last chunk samples
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    assert run_step(sched) == [("a", 10, 1), ("b", 5, 1)]  # two decodes
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4]
    assert sched.num_prompt_tokens_computed == 15


def test_no_chunking_waits_for_budget() -> None:
    sched = make(32, max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add_request(req("a", 6))
    sched.add_request(req("b", 6, base=50))
    assert run_step(sched) == [("a", 0, 6)]
    assert run_step(sched) == [("a", 6, 1), ("b", 0, 6)]


def test_max_num_seqs_caps_running() -> None:
    sched = make(32, max_num_seqs=2)
    for i in range(3):
        sched.add_request(req(str(i), 3, base=10 * i))
    assert [r for r, _, _ in run_step(sched)] == ["0", "1"]
    assert len(sched.waiting) == 1


def test_preemption_recomputes_latest_request() -> None:
    sched = make(4)  # 16 token slots
    a, b = req("a", 7), req("b", 7, base=100)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == [("a", 0, 7), ("b", 0, 7)]
    assert run_step(sched) == [("a", 7, 1), ("b", 7, 1)]
    # a needs a third block for position 8: no free block, so b (admitted last) is preempted.
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [("a", 8, 1)]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    sched.advance(out)
    a.output_token_ids.append(7)
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    # b comes back: its prompt blocks hit the cache, the rest (incl. its output) recomputes.
    step = run_step(sched)
    assert step == [("b", 4, 5)]
    assert b.num_cached_tokens == 0  # counted at first admission only
    sched.blocks.pool.check_invariants({blk: 1 for blk in b.block_ids})


def test_lone_request_preempts_itself_then_resumes() -> None:
    sched = make(2, max_num_batched_tokens=4)
    a = req("a", 8)
    sched.add_request(a)
    assert run_step(sched) == [("a", 0, 4)]
    assert run_step(sched) == [("a", 4, 4)]
    out = sched.schedule()  # token 9 needs a third block: nothing to preempt but itself
    assert out.is_empty and out.preempted == [a]


def test_remote_admission_and_arrival() -> None:
    sched = make(8)
    warm = req("warm", 9)
    sched.add_request(warm)
    run_step(sched)
    sched.finish(warm, RequestStatus.FINISHED_LENGTH)  # blocks 0, 1 cached
    r = req("r", 14)
    plan = sched.admit_remote(r)
    assert plan is not None
    assert plan.num_cached_blocks == 2 and plan.block_ids[:2] == [0, 1]
    assert len(plan.block_ids) == 4 and r.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert r.num_cached_tokens == 8
    sched.remote_kv_arrived(r.request_id)
    r.output_token_ids.append(5)  # first token from the prefill node
    assert run_step(sched) == [("r", 14, 1)]
    assert sched.num_prompt_tokens_computed == 9  # only the warm-up prompt


def test_remote_failure_prefills_locally_into_fresh_blocks() -> None:
    """The prefill node may still write the blocks it was given: the request prefills into
    others, and those stay held until the connector releases them."""
    sched = make(8)
    r = req("r", 10)
    plan = sched.admit_remote(r)
    assert plan is not None and plan.num_cached_blocks == 0
    sched.remote_kv_failed(r.request_id)
    assert run_step(sched) == [("r", 0, 10)]
    assert r.block_ids and not set(r.block_ids) & set(plan.block_ids)
    sched.check_invariants()
    assert sched.release_held(r.request_id)
    sched.check_invariants()


def test_remote_admission_refused_when_pool_short() -> None:
    sched = make(2)
    assert sched.admit_remote(req("r", 12)) is None
    sched.blocks.pool.check_invariants({})


def test_prefill_role_holds_blocks_until_released() -> None:
    sched = make(8)
    r = req("r", 6)
    sched.add_request(r)
    run_step(sched)
    sched.finish(r, RequestStatus.FINISHED_LENGTH, hold=True)
    assert sched.blocks.pool.num_free_blocks == 6
    assert sched.release_held(r.request_id)
    assert sched.blocks.pool.num_free_blocks == 8
    assert not sched.release_held(r.request_id)


def test_prefill_role_reserves_the_whole_prompt_and_never_preempts() -> None:
    sched = make(6, max_num_batched_tokens=4)
    a, b = req("a", 12), req("b", 12, base=50)
    a.reserves_prompt = b.reserves_prompt = True  # what a prefill node's connector asks
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == [("a", 0, 4)]
    assert a.block_ids == [0, 1, 2]  # the whole prompt, though only 4 tokens ran
    assert run_step(sched) == [("a", 4, 4)]
    assert run_step(sched) == [("a", 8, 4)]
    # b needs 3 blocks and finds 3: it is admitted without preempting anyone.
    sched.finish(a, RequestStatus.FINISHED_LENGTH, hold=True)
    assert run_step(sched) == [("b", 0, 4)]
    assert b.block_ids == [3, 4, 5] and sched.num_preemptions == 0
