"""Overlapped output processing (the next step launched before this step's tokens are
detokenized) gives exactly what the plain step gives: tokens, text, finish and stop
reasons, logprobs, with stop strings, stop ids, n > 1, seeds, preemption and aborts, and
no block is leaked or freed under a launched step. On CUDA it is on by default; here it is
forced on over the CPU engine."""

from __future__ import annotations

import random

import pytest
from engine_outputs import assert_logprobs_close

from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.llm import LLM
from splitserve.engine.sampler import SampledTokens, SamplerOutput, WhileWaiting
from splitserve.engine.sampling_params import SamplingParams
from splitserve.prefill.pusher import PrefillPusher


def rand_tokens(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def summary(outputs) -> list:
    """Everything but logprob values: a dropped extra row changes a step's batch shape, and
    with it the last bits of the matmuls."""
    return [
        [
            (
                c.token_ids,
                c.text,
                c.finish_reason,
                c.stop_reason,
                None if c.logprobs is None else [(lp.token_id, lp.rank) for lp in c.logprobs],
            )
            for c in o.outputs
        ]
        for o in outputs
    ]


def workload(vocab: int, plain: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    """Mixed params, with stop strings carved from the plain engine's own greedy text."""
    prompts = [rand_tokens(n, vocab, seed=n) for n in (3, 17, 40, 64, 90, 130, 15, 33)]
    probe = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    params = []
    for i, out in enumerate(probe):
        text = out.outputs[0].text
        stop = [text[len(text) // 2 : len(text) // 2 + 2]] if len(text) > 6 and i % 2 else []
        params.append(
            SamplingParams(
                temperature=0 if i % 3 else 0.9,
                seed=100 + i,
                n=2 if i == 4 else 1,
                max_tokens=5 + 3 * i,
                ignore_eos=i % 4 != 0,
                stop=[s for s in stop if s.strip()],
                stop_token_ids=[probe[i].outputs[0].token_ids[6]] if i == 2 else [],
                logprobs=2 if i % 2 else None,
            )
        )
    return prompts, params


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_num_batched_tokens=256),
        dict(max_num_batched_tokens=64),  # chunked prefill mixed with decode rows
        dict(max_num_batched_tokens=256, num_blocks=24, max_num_seqs=6),  # preemption
    ],
)
def test_overlap_matches_plain_step(tiny_llama, settings: dict) -> None:
    plain = LLM(str(tiny_llama), dtype="float32", overlap_output_processing=False, **settings)
    overlap = LLM(str(tiny_llama), dtype="float32", overlap_output_processing=True, **settings)
    assert overlap.engine.overlap and not plain.engine.overlap
    prompts, params = workload(plain.engine.arch.vocab_size, plain)
    got, want = overlap.generate(prompts, params), plain.generate(prompts, params)
    assert summary(got) == summary(want)
    assert_logprobs_close(got, want)
    for engine in (plain.engine, overlap.engine):
        engine.check_invariants()
        assert engine.pool.usage == 0.0
        assert not engine.has_runnable()


def test_aborts_under_a_launched_step_free_everything(tiny_llama) -> None:
    config = EngineConfig(
        ModelConfig(str(tiny_llama), dtype="float32"),
        CacheConfig(block_size=16, num_blocks=64),
        SchedulerConfig(max_num_batched_tokens=128, overlap_output_processing=True),
    )
    core = EngineCore(config)
    vocab = core.arch.vocab_size
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(6):
        core.add_request(f"r{i}", rand_tokens(20 + 9 * i, vocab, i), params)
    tokens: dict[str, list[int]] = {}
    aborted = {"r1", "r4"}
    for step in range(200):
        if step == 3:
            assert core._launched is not None  # a step is in flight while we abort
            for rid in sorted(aborted):
                core.abort(rid)
            core.check_invariants()
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        core.check_invariants()
        if not core.has_runnable():
            break
    assert core.pool.usage == 0.0 and not core.has_unfinished()
    # Aborting everything under a launched step leaves nothing to consume.
    core.add_request("last", rand_tokens(40, vocab, 99), params)
    core.step()
    core.step()
    assert core._launched is not None
    core.abort("last")
    assert core._launched is None and not core.has_runnable()
    assert core.step() == [] and core.pool.usage == 0.0
    plain = LLM(str(tiny_llama), dtype="float32", overlap_output_processing=False)
    want = plain.generate([rand_tokens(20 + 9 * i, vocab, i) for i in range(6)], params)
    for i, out in enumerate(want):
        rid = f"r{i}"
        if rid in aborted:
            assert len(tokens.get(rid, [])) < 30
        else:
            assert tokens[rid] == out.outputs[0].token_ids


def test_prefill_role_refuses_overlap(tiny_llama) -> None:
    config = EngineConfig(
        ModelConfig(str(tiny_llama), dtype="float32"),
        scheduler=SchedulerConfig(overlap_output_processing=True),
    )
    core = EngineCore(config)
    with pytest.raises(ValueError, match="PrefillPusher"):
        core.set_connector(PrefillPusher(agent=None))  # type: ignore[arg-type]


def _core(model_dir, **scheduler) -> EngineCore:
    config = EngineConfig(
        ModelConfig(str(model_dir), dtype="float32"),
        CacheConfig(block_size=16, num_blocks=64),
        SchedulerConfig(overlap_output_processing=True, **scheduler),
    )
    return EngineCore(config)


def test_next_step_is_launched_before_tokens_are_read(tiny_llama, monkeypatch) -> None:
    """Each step's forward pass is queued before the step before it is read back, with the
    unread tokens standing in as pending ones."""
    core = _core(tiny_llama)
    vocab = core.arch.vocab_size
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(3):
        core.add_request(f"r{i}", rand_tokens(10 + 7 * i, vocab, i), params)
    seen: list[tuple[bool, list[int]]] = []
    collect = SampledTokens.collect

    def spy(self: SampledTokens, while_waiting: WhileWaiting | None = None) -> SamplerOutput:
        launched = core._launched
        pending = (
            []
            if launched is None
            else [c.request.num_pending_tokens for c in launched.sched.chunks]
        )
        seen.append((launched is not None, pending))
        return collect(self, while_waiting)

    monkeypatch.setattr(SampledTokens, "collect", spy)
    outputs: dict[str, list[int]] = {}
    # What AsyncEngine hands over runs once the next step is in flight, inside the read of
    # this step's tokens (which `seen` counts as it starts), before its wait.
    hand_overs: list[tuple[bool, int]] = []
    waited = 0

    def hand_over() -> None:
        hand_overs.append((core._launched is not None, len(seen) - waited))

    while core.has_unfinished():
        waited = len(seen)
        for out in core.step(while_waiting=hand_over):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert hand_overs == [(launched, 1) for launched, _ in seen]
    # Every step but the last read its tokens with the next one in flight, every row of
    # which held a pending token; the last step's tokens end every request by length, so
    # nothing was launched after it.
    assert [launched for launched, _ in seen] == [True] * (len(seen) - 1) + [False]
    assert all(pending == [1] * len(pending) for _, pending in seen[:-1])
    assert all(r.num_pending_tokens == 0 for r in core.scheduler.running)
    plain = LLM(str(tiny_llama), dtype="float32", overlap_output_processing=False)
    want = plain.generate([rand_tokens(10 + 7 * i, vocab, i) for i in range(3)], params)
    assert [outputs[f"r{i}"] for i in range(3)] == [o.outputs[0].token_ids for o in want]


def test_request_ending_under_a_launched_step_frees_when_it_retires(tiny_llama) -> None:
    """A request that ends on a stop token while the next step (holding its row) is in
    flight does not wait for the device: its blocks are held until that step retires. One
    that reaches its length is left out of the next step and frees at once."""
    core = _core(tiny_llama)
    vocab = core.arch.vocab_size
    prompt = rand_tokens(20, vocab, 1)
    plain = LLM(str(tiny_llama), dtype="float32", overlap_output_processing=False)
    probe = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    greedy = plain.generate([prompt], probe)[0].outputs[0].token_ids
    stop_at = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    stop = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[greedy[stop_at]]
    )
    core.add_request("stop", prompt, stop)
    core.add_request(
        "length",
        rand_tokens(20, vocab, 2),
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
    )
    core.add_request("long", rand_tokens(20, vocab, 3), probe)
    ended: dict[str, int] = {}
    for step in range(40):
        for out in core.step():
            if out.finished:
                ended[out.request_id] = step
                # Only the stop token's row is still in the launched step.
                if out.request_id == "stop":
                    assert core._launched is not None and "stop" in core.scheduler.held
                assert "length" not in core.scheduler.held
        if step == ended.get("stop", -2) + 1:
            assert "stop" not in core.scheduler.held
        core.check_invariants()
        if not core.has_runnable():
            break
    assert set(ended) == {"stop", "length", "long"}
    assert core.pool.usage == 0.0 and not core.scheduler.held
