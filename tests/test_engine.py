"""Engine behaviour on the tiny llama: prefix caching, stops, n, seeds, aborts, bad input,
roles, and a randomised soak with the block invariant checked throughout."""

from __future__ import annotations

import asyncio
import random

import pytest

from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.kv_connector import FinalBlocks, KVEvents
from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", max_num_batched_tokens=256)


def rand_tokens(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def test_second_request_with_same_512_prefix_computes_only_its_suffix(llm: LLM) -> None:
    vocab = llm.engine.arch.vocab_size
    prefix = rand_tokens(512, vocab, seed=11)
    params = SamplingParams(temperature=0, max_tokens=4)
    llm.generate([prefix + rand_tokens(30, vocab, 1)], params)
    before = llm.engine.stats()
    out = llm.generate([prefix + rand_tokens(20, vocab, 2)], params)[0]
    after = llm.engine.stats()
    assert out.num_cached_tokens == 512
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 20
    assert after.prefix_cache_hits - before.prefix_cache_hits == 512


def test_text_prompts_and_finish_reasons(llm: LLM) -> None:
    out = llm.generate("The weather today", SamplingParams(temperature=0, max_tokens=5))[0]
    comp = out.outputs[0]
    assert comp.finish_reason in ("length", "stop")
    assert out.prompt == "The weather today" and out.prompt_token_ids
    if comp.finish_reason == "length":
        assert len(comp.token_ids) == 5
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids, skip_special_tokens=True)


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    vocab = llm.engine.arch.vocab_size
    prompt = rand_tokens(40, vocab, 5)
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    stopped = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True),
    )[0].outputs[0]
    assert stopped.token_ids == tokens[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at


def test_stop_string_cuts_text(llm: LLM) -> None:
    vocab = llm.engine.arch.vocab_size
    prompt = rand_tokens(30, vocab, 8)
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    text = full[0].outputs[0].text
    if len(text.strip()) < 4:
        pytest.skip("greedy text too short to carve a stop string from")
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        stop = text.strip()[-2:]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_n_and_seeds_are_batch_independent(llm: LLM) -> None:
    vocab = llm.engine.arch.vocab_size
    prompt = rand_tokens(25, vocab, 9)
    params = SamplingParams(
        temperature=1.0, top_k=50, max_tokens=10, seed=1234, n=3, ignore_eos=True
    )
    alone = llm.generate([prompt], params)[0]
    others = [rand_tokens(60, vocab, s) for s in range(5)]
    noise = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    mixed = llm.generate(
        [*others[:2], prompt, *others[2:]], [noise, noise, params, noise, noise, noise]
    )
    assert len(alone.outputs) == 3
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed[2].outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1


def test_bad_input_raises_with_fix_and_engine_keeps_serving(llm: LLM) -> None:
    eng = llm.engine
    too_long = [1] * eng.max_model_len
    with pytest.raises(ValueError, match="shorten the prompt"):
        llm.generate([too_long], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="n must be between"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[eng.arch.vocab_size + 5]], SamplingParams(max_tokens=1))
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    eng.check_invariants()


def test_unknown_or_unsupported_model_directory(tmp_path) -> None:
    with pytest.raises((ValueError, FileNotFoundError)):
        LLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(
        '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}'
    )
    with pytest.raises(ValueError, match=r"(?i)supported"):
        LLM(str(tmp_path))


def test_abort_frees_blocks(llm: LLM) -> None:
    eng = llm.engine
    vocab = eng.arch.vocab_size
    eng.add_request("abort-me", rand_tokens(100, vocab, 3), SamplingParams(max_tokens=50))
    eng.step()
    outs = eng.abort("abort-me")
    assert [o.finish_reason for o in outs] == ["abort"]
    assert not eng.has_unfinished()
    assert eng.abort("abort-me") == []
    eng.check_invariants()
    assert eng.pool.usage == 0.0


class RecordingConnector:
    """A prefill-like KV connector: one token per request, blocks reported as they become
    final, freeing delayed until `poll` after `release`."""

    max_new_tokens = 1
    reserves_prompt = True
    supports_overlap = False

    def __init__(self) -> None:
        self.reports: list[FinalBlocks] = []
        self.held: set[str] = set()
        self.to_release: list[str] = []

    def on_admission(self, request_id: str, kv_params: object | None) -> bool:
        return False

    def on_remote_plan(self, request_id: str, plan: object) -> None:
        raise AssertionError("no remote admission here")

    def on_blocks_final(self, blocks: FinalBlocks) -> None:
        self.reports.append(blocks)

    def on_finish(self, request_id: str) -> bool:
        self.held.add(request_id)
        return True

    def poll(self) -> KVEvents:
        released, self.to_release = self.to_release, []
        return KVEvents(released=released)


def test_prefill_role_reports_chunks_and_holds_blocks(tiny_llama) -> None:
    config = EngineConfig(
        ModelConfig(str(tiny_llama), dtype="float32"),
        CacheConfig(block_size=16, num_blocks=64),
        SchedulerConfig(max_num_batched_tokens=40),
    )
    eng = EngineCore(config)
    connector = RecordingConnector()
    eng.set_connector(connector)
    chunks = connector.reports
    prompt = rand_tokens(100, eng.arch.vocab_size, 4)
    eng.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=20))
    outs = []
    while eng.has_unfinished():
        outs.extend(eng.step())
    assert [o.finish_reason for o in outs] == ["length"] and len(outs[0].new_token_ids) == 1
    assert [(c.first_block_index, len(c.block_ids), c.is_last) for c in chunks] == [
        (0, 2, False),
        (2, 3, False),
        (5, 2, True),
    ]
    assert chunks[-1].first_token_id == outs[0].new_token_ids[0]
    assert eng.stats().num_held == 1 and eng.pool.usage > 0
    assert connector.held == {"p"}
    connector.to_release.append("p")
    assert eng.poll_connector() == ([], False)
    eng.check_invariants()
    assert eng.pool.usage == 0.0


def test_soak_500_random_requests_with_aborts(tiny_llama) -> None:
    _soak(tiny_llama, num_requests=500)


def test_soak_with_overlapped_output_processing(tiny_llama) -> None:
    _soak(tiny_llama, num_requests=200, overlap=True)


def _soak(model_dir, num_requests: int, overlap: bool = False) -> None:
    rng = random.Random(0)
    config = EngineConfig(
        ModelConfig(str(model_dir), dtype="float32"),
        CacheConfig(block_size=16, num_blocks=40),
        SchedulerConfig(
            max_num_batched_tokens=128, max_num_seqs=16, overlap_output_processing=overlap
        ),
    )
    eng = EngineCore(config)
    vocab = eng.arch.vocab_size
    pending = list(range(num_requests))
    live: set[str] = set()
    finished = 0
    while pending or eng.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if pending:
                i = pending.pop()
                params = SamplingParams(
                    temperature=rng.choice([0.0, 0.8]),
                    max_tokens=rng.randint(1, 24),
                    n=rng.choice([1, 1, 2]),
                    seed=rng.choice([None, i]),
                    ignore_eos=rng.random() < 0.5,
                )
                prompt = rand_tokens(rng.randint(1, 200), vocab, i)
                if rng.random() < 0.3 and live:  # share a prefix with an earlier request
                    prompt = rand_tokens(64, vocab, 7) + prompt
                eng.add_request(f"r{i}", prompt, params)
                live.add(f"r{i}")
        if live and rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            eng.abort(victim)
            live.discard(victim)
        for out in eng.step():
            rid = out.request_id
            if out.finished and rid in live and not eng.is_unfinished(rid):
                live.discard(rid)
                finished += 1
        eng.check_invariants()
    assert eng.pool.usage == 0.0
    assert finished > num_requests // 2
    assert eng.stats().num_preemptions > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_async_engine_streams_and_aborts(tiny_llama, overlap: bool) -> None:
    from splitserve.engine.async_engine import AsyncEngine

    config = EngineConfig(
        ModelConfig(str(tiny_llama), dtype="float32"),
        scheduler=SchedulerConfig(overlap_output_processing=overlap),
    )
    engine = AsyncEngine(config)

    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        deltas = [o async for o in engine.generate("a", [5, 6, 7, 8], params)]
        assert sum(len(d.outputs[0].token_ids) for d in deltas) == 6
        # Deltas queued while the consumer was away are coalesced, so count only the end.
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate("bad", [], params):
                pass
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        gen = engine.generate("b", [1, 2, 3], long)
        await gen.__anext__()
        await gen.aclose()  # the client went away: the request is aborted
        stats = await engine.stats()
        assert stats.num_running == 0 and stats.kv_usage == 0.0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_async_engine_aborts_a_request_whose_caller_left_during_admission(tiny_llama) -> None:
    """The caller is cancelled while the admission still runs on the engine thread (a slow
    connector): once admitted, the request is aborted (the connector hears of its end), so
    nothing stays."""
    import time

    from splitserve.engine.async_engine import AsyncEngine

    class SlowAdmission:
        max_new_tokens = None
        reserves_prompt = False
        supports_overlap = True

        def on_admission(self, request_id: str, kv_params: object | None) -> bool:
            time.sleep(0.3)
            return False

        def on_remote_plan(self, request_id: str, plan: object) -> None:
            raise AssertionError("no remote admission here")

        def on_blocks_final(self, blocks: FinalBlocks) -> None:
            pass

        def on_finish(self, request_id: str) -> bool:
            abandoned.append(request_id)
            return False

        def poll(self) -> KVEvents:
            return KVEvents()

    engine = AsyncEngine(EngineConfig(ModelConfig(str(tiny_llama), dtype="float32")))
    engine.call(lambda core: core.set_connector(SlowAdmission())).result()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    abandoned: list[str] = []

    async def consume() -> None:
        stream = engine.generate("slow", [5, 6, 7, 8], params)
        async for _ in stream:
            pass

    async def main() -> None:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            stats = await engine.stats()
            if abandoned and stats.num_running + stats.num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert abandoned == ["slow"]
        assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_usage == 0.0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
