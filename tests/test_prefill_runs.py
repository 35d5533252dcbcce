"""How a step's prefill sequences split into runs, each with its attention path
(kernels/prefill_runs.py): plain host lists, no kernels."""

from __future__ import annotations

import pytest

from splitserve.kernels import cudnn_prefill
from splitserve.kernels.prefill_runs import CONTEXT, CUDNN, FLASH, MAX_RUNS, ROWS, plan_runs

MID = cudnn_prefill.MIN_ROWS  # the shortest prompt cuDNN takes
LONG = 2 * MID


def _kinds(runs) -> list[tuple[str, int, int, list[int]]]:
    return [(r.kind, r.first_seq, r.first_row, r.query_lens) for r in runs]


def test_the_rest_of_a_prompt_and_the_next_prompts_take_a_path_each() -> None:
    # A running prompt's last 300 rows over 3,796 cached, then two fresh 4,096-row prompts.
    runs = plan_runs([300, 4096, 4096], [4096, 4096, 4096], flash=True, cudnn=True)
    assert _kinds(runs) == [(CONTEXT, 0, 0, [300]), (CUDNN, 1, 300, [4096, 4096])]
    assert [r.rows for r in runs] == [300, 8192] and [r.num_seqs for r in runs] == [1, 2]
    # Before cuDNN's plans exist the fresh prompts take FlashAttention-2's ragged call.
    runs = plan_runs([300, 4096, 4096], [4096, 4096, 4096], flash=True, cudnn=False)
    assert _kinds(runs) == [(CONTEXT, 0, 0, [300]), (FLASH, 1, 300, [4096, 4096])]


def test_which_fresh_prompts_cudnn_takes() -> None:
    one = plan_runs([MID], [MID], flash=True, cudnn=True)
    assert _kinds(one) == [(CUDNN, 0, 0, [MID])]
    several = plan_runs([MID, LONG, MID], [MID, LONG, MID], flash=True, cudnn=True)
    assert _kinds(several) == [(CUDNN, 0, 0, [MID, LONG, MID])]
    short = plan_runs([MID - 1], [MID - 1], flash=True, cudnn=True)
    assert _kinds(short) == [(FLASH, 0, 0, [MID - 1])]
    one_short = plan_runs([LONG, MID - 1], [LONG, MID - 1], flash=True, cudnn=True)
    assert _kinds(one_short) == [(FLASH, 0, 0, [LONG, MID - 1])]


def test_without_the_flash_path_every_sequence_takes_the_triton_kernel() -> None:
    runs = plan_runs([40, 4096, 16], [90, 4096, 16], flash=False, cudnn=True)
    assert _kinds(runs) == [(CONTEXT, 0, 0, [40, 4096, 16])]


def test_fresh_prompts_before_a_cached_one_keep_their_order() -> None:
    runs = plan_runs([4096, 64, 100], [4096, 64, 900], flash=True, cudnn=True)
    assert _kinds(runs) == [(FLASH, 0, 0, [4096, 64]), (CONTEXT, 2, 4160, [100])]


def test_past_the_most_runs_a_step_takes_one_triton_run() -> None:
    lens = [8, 16] * MAX_RUNS  # cached, fresh, cached, ...: 2 * MAX_RUNS runs
    seq_lens = [40 if i % 2 == 0 else n for i, n in enumerate(lens)]
    runs = plan_runs(lens, seq_lens, flash=True, cudnn=True)
    assert _kinds(runs) == [(CONTEXT, 0, 0, lens)]
    at_most = plan_runs(lens[:MAX_RUNS], seq_lens[:MAX_RUNS], flash=True, cudnn=True)
    assert len(at_most) == MAX_RUNS


def test_short_chunks_over_context_take_the_decode_kernel_a_row_at_a_time() -> None:
    # The 12-row rest of a prompt chunked at the step's budget, then two fresh prompts.
    runs = plan_runs([12, 4096, 4096], [4096, 4096, 4096], flash=True, cudnn=True, rows_max=32)
    assert _kinds(runs) == [(ROWS, 0, 0, [12]), (CUDNN, 1, 12, [4096, 4096])]
    # Every chunk of the run must be short; off by default and at 0.
    assert plan_runs([12, 40], [900, 990], flash=True, cudnn=True, rows_max=32)[0].kind == CONTEXT
    assert plan_runs([12, 32], [900, 990], flash=True, cudnn=True, rows_max=32)[0].kind == ROWS
    assert plan_runs([12], [900], flash=True, cudnn=True)[0].kind == CONTEXT
    assert plan_runs([12], [900], flash=True, cudnn=True, rows_max=0)[0].kind == CONTEXT
    # Short fresh prompts keep the fresh paths; without them the Triton kernel's run is
    # short enough for ROWS as a whole.
    assert plan_runs([12], [12], flash=True, cudnn=True, rows_max=32)[0].kind == FLASH
    assert plan_runs([12, 5], [12, 90], flash=False, cudnn=True, rows_max=32)[0].kind == ROWS


def test_no_sequences_no_runs_and_lengths_must_pair() -> None:
    assert plan_runs([], [], flash=True, cudnn=True) == []
    with pytest.raises(ValueError, match="2 query lengths for 1 sequences"):
        plan_runs([4, 5], [9], flash=True, cudnn=True)


def test_the_engines_statistics_carry_its_backends_runs(tiny_llama) -> None:
    """EngineStats reads the attention backend's runs through the model runner (the torch
    backend, on the CPU, has none)."""
    from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from splitserve.engine.core import EngineCore

    model = ModelConfig(str(tiny_llama), dtype="float32", device="cpu")
    core = EngineCore(EngineConfig(model, CacheConfig(block_size=16, num_blocks=8)))

    def runs() -> tuple[int, int, int, int]:
        stats = core.stats()
        return (
            stats.prefill_runs_context,
            stats.prefill_runs_flash,
            stats.prefill_runs_cudnn,
            stats.prefill_runs_rows,
        )

    assert runs() == (0, 0, 0, 0)
    core.runner.prefill_runs = lambda: {CUDNN: 3, CONTEXT: 1, ROWS: 2}
    assert runs() == (1, 0, 3, 2)
