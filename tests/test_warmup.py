"""The start-up warm-up (engine/warmup.py): which step shapes it runs, and that running
them leaves the KV pool untouched. tests/test_engine_gpu.py checks on a GPU that no
kernel compiles once an engine has started."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.llm import LLM
from splitserve.engine.warmup import Row, WarmupLimits, run_step, warm_up, warmup_steps


def _is_prefill_only(rows: list[Row]) -> bool:
    return all(r.query_len > 1 for r in rows)


@pytest.mark.parametrize("limits", [WarmupLimits(8192, 2048), WarmupLimits(131072, 8192)])
def test_steps_cover_each_kind_of_serving_step(limits: WarmupLimits) -> None:
    steps = warmup_steps(limits)
    decodes = [s[0].seq_len for s in steps if len(s) == 1 and s[0].query_len == 1]
    assert min(decodes) <= 256  # one split of the decode kernel
    assert max(decodes) >= 8192  # many splits
    prefill_tokens = {sum(r.query_len for r in s) % 16 == 0 for s in steps if _is_prefill_only(s)}
    assert prefill_tokens == {True, False}
    mixed = [s for s in steps if s[0].query_len == 1 and s[-1].query_len > 1]
    assert mixed, "no step mixes decode rows with a prefill chunk"
    chunk = mixed[0][-1]
    assert chunk.seq_len > chunk.query_len  # the chunk attends to cached context too
    # ... and a short rest of a long prompt, which the decode kernel takes a row at a time
    rests = [s[-1] for s in mixed if s[-1].query_len <= ModelConfig.short_rest_rows]
    assert rests and max(r.seq_len for r in rests) >= 8192
    # ... and a longer chunk over a long context, which the prefill kernel takes (its
    # context split with `split_context_prefill`: a few tiles leave the device idle)
    longer = [s[-1] for s in mixed if s[-1].query_len > ModelConfig.short_rest_rows]
    assert any(r.seq_len >= 8192 and r.query_len <= 64 for r in longer)
    for rows in steps:
        decode_rows = [r.query_len == 1 for r in rows]
        assert decode_rows == sorted(decode_rows, reverse=True)  # decode rows lead
        assert sum(r.query_len for r in rows) <= limits.max_num_batched_tokens
        assert all(1 <= r.query_len <= r.seq_len <= limits.max_model_len for r in rows)


@pytest.mark.parametrize("limits", [WarmupLimits(40, 8), WarmupLimits(20, 2048)])
def test_steps_fit_small_limits(limits: WarmupLimits) -> None:
    for rows in warmup_steps(limits):
        assert sum(r.query_len for r in rows) <= limits.max_num_batched_tokens
        assert all(1 <= r.query_len <= r.seq_len <= limits.max_model_len for r in rows)


def test_warm_up_runs_every_step_and_writes_no_kv(tiny_llama) -> None:
    engine = LLM(str(tiny_llama), dtype="float32").engine
    engine.kv_cache.normal_()
    before = engine.kv_cache.clone()
    seen: list[tuple[int, int]] = []
    model = engine.model

    def recording(ids, positions, kv_cache, meta):
        seen.append((meta.num_seqs, meta.num_decodes))
        return model(ids, positions, kv_cache, meta)

    recording.compute_logits = model.compute_logits  # type: ignore[attr-defined]
    limits = WarmupLimits(engine.max_model_len, 512)
    warm_up(recording, engine.kv_cache, engine.block_size, limits)
    assert len(seen) == len(warmup_steps(limits))
    assert any(0 < decodes < seqs for seqs, decodes in seen)  # a mixed step ran
    assert torch.equal(engine.kv_cache, before)


def test_warm_up_step_is_a_valid_batch(tiny_llama) -> None:
    """A warm-up step is a valid batch for the model: one logits row per sequence."""
    engine = LLM(str(tiny_llama), dtype="float32").engine
    rows = [Row(1, 40), Row(5, 21)]
    logits: list[torch.Tensor] = []
    model = engine.model

    class Spy:
        def __call__(self, *args):
            return model(*args)

        def compute_logits(self, hidden):
            logits.append(model.compute_logits(hidden))
            return logits[-1]

    run_step(Spy(), engine.kv_cache, rows, engine.block_size)
    assert logits[0].shape == (2, engine.arch.vocab_size)


def test_warm_up_draws_from_every_step_s_logits(tiny_llama) -> None:
    """The sampler's fused draw runs on each warm-up step's logits (so its kernels compile
    at start-up), one row per sequence."""
    engine = LLM(str(tiny_llama), dtype="float32").engine
    drawn: list[tuple[int, int]] = []

    def draw(logits, inv_temps, seeds, counters):  # type: ignore[no-untyped-def]
        assert inv_temps.shape == seeds.shape == counters.shape == (logits.shape[0],)
        drawn.append(tuple(logits.shape))
        return logits.argmax(dim=-1)

    limits = WarmupLimits(engine.max_model_len, 512)
    warm_up(engine.model, engine.kv_cache, engine.block_size, limits, draw)
    vocab = engine.arch.vocab_size
    assert drawn == [(len(rows), vocab) for rows in warmup_steps(limits)]
