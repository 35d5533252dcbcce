"""Prefill attention with each context split across programs (`prefill_attention` with
`num_splits`, kernels/prefill_split.py) against the torch reference, on random ragged
batches in a NaN-poisoned, shuffled pool: short chunks over long cached context (what the
path is for), fresh prompts and extends, decode rows, every split count from one to more
partitions than some sequences have. Without CUDA the kernel runs in the Triton
interpreter in float32."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.testing import PagedBatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5) if not ON_GPU else dict(atol=5e-5, rtol=5e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU")),
]
# (cached, new): rests over long context, an extend, a fresh prompt, decode rows.
CASES = [(180, 12), (97, 40), (16, 16), (0, 23), (31, 1), (250, 3)]


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global make_paged_batch, prefill_attention, prefill_attention_reference, store_kv
    from splitserve.kernels.prefill_attention import prefill_attention, prefill_attention_reference
    from splitserve.kernels.store_kv import store_kv
    from splitserve.kernels.testing import make_paged_batch


def _batch(ratio: int, head_dim: int, block_size: int, dtype, pad_rows: int = 0) -> PagedBatch:
    heads, kv_heads = {1: (2, 2), 4: (4, 1)}[ratio]
    batch = make_paged_batch(
        CASES, heads, kv_heads, head_dim, block_size, dtype, DEVICE, seed=ratio + block_size,
        pad_rows=pad_rows,
    )  # fmt: skip
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    return batch


def _split(batch: PagedBatch, num_splits: int, **kwargs) -> torch.Tensor:
    meta = batch.meta
    out = torch.full_like(batch.q, float("nan"))
    prefill_attention(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        meta.max_query_len, batch.q.shape[2] ** -0.5, out=out, num_splits=num_splits, **kwargs,
    )  # fmt: skip
    return out


def _reference(batch: PagedBatch) -> torch.Tensor:
    meta = batch.meta
    return prefill_attention_reference(
        batch.q,
        batch.kv_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        batch.q.shape[2] ** -0.5,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
@pytest.mark.parametrize("ratio", [1, 4])
def test_split_prefill_matches_the_reference(num_splits: int, ratio: int, dtype) -> None:
    """16 splits give the 34-token sequence more partitions than its 32-token KV tiles
    fill: the merge must read only the partitions that hold tokens."""
    batch = _batch(ratio, 64, 16, dtype)
    out = _split(batch, num_splits, block_m=16, block_n=32)
    assert not torch.isnan(out).any(), "some rows were never written"
    torch.testing.assert_close(out.float(), _reference(batch).float(), **TOL[dtype])


@pytest.mark.parametrize("tiles", [(32, 16), (16, 64)])
def test_tiles_against_pool_blocks_and_chunks(tiles: tuple[int, int]) -> None:
    """KV tiles smaller and larger than a pool block of 32; query tiles shorter than some
    chunks, so a chunk's later tiles start past the diagonal's first keys."""
    batch = _batch(4, 128, 32, torch.float32)
    out = _split(batch, 3, block_m=tiles[0], block_n=tiles[1])
    torch.testing.assert_close(out, _reference(batch), **TOL[torch.float32])


def test_rows_outside_every_sequence_are_left_unwritten() -> None:
    """Rows past the last sequence's (a buffer longer than the step) keep what they held;
    padding decode rows with no blocks see no key and come out as zeros."""
    batch = _batch(4, 64, 16, torch.float32, pad_rows=2)
    tokens = batch.q.shape[0]
    batch.q = torch.cat([batch.q, torch.randn_like(batch.q[:3])])
    out = _split(batch, 4, block_m=16, block_n=16)
    assert torch.isnan(out[tokens:]).all()
    rows = batch.num_seq_rows
    assert bool((out[rows:tokens] == 0).all())
    torch.testing.assert_close(out[:rows], _reference(batch)[:rows], **TOL[torch.float32])


def test_a_split_count_below_one_is_refused() -> None:
    batch = _batch(1, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        _split(batch, 0)


def test_the_plan_splits_only_runs_that_leave_the_device_idle() -> None:
    from splitserve.kernels.prefill_split import MAX_SPLITS, plan_context_splits

    # A 12-row rest over 4,096 tokens, 32 heads, 64-row tiles, 132 multiprocessors: 32
    # programs where 264 are wanted: 9 partitions of about 455 tokens.
    assert plan_context_splits([12], [4096], 32, 64, 132) == 9
    assert plan_context_splits([12], [600], 32, 64, 132) == 2  # bounded by the context
    assert plan_context_splits([12], [300], 32, 64, 132) == 1
    assert plan_context_splits([512] * 3, [4096] * 3, 32, 64, 132) == 1  # fills the device
    # At 128-row tiles and 32 heads: 128 rows (32 programs, a quarter of the
    # multiprocessors) split; 256 rows (64 programs) do not
    assert plan_context_splits([128], [4096], 32, 128, 132) == 9
    assert plan_context_splits([256], [4096], 32, 128, 132) == 1
    assert plan_context_splits([33] * 33, [4096] * 33, 1, 128, 132) == 8
    assert plan_context_splits([1], [1 << 20], 1, 64, 132) == MAX_SPLITS
    assert plan_context_splits([], [], 32, 64, 132) == 1


def test_the_backend_with_split_contexts_matches_the_torch_backend(monkeypatch) -> None:
    """Every CONTEXT run split (a small device, short partitions allowed), beside decode
    rows and fresh prompts, against the torch backend's output for the same step."""
    import dataclasses

    from splitserve.kernels import prefill_split
    from splitserve.kernels.attention_torch import TorchPagedAttention
    from splitserve.kernels.backend import TritonPagedAttention

    monkeypatch.setattr(prefill_split, "MIN_PARTITION_TOKENS", 32)
    cases = [(40, 1), (63, 1), *CASES]
    batch = make_paged_batch(cases, 4, 1, 64, 16, torch.float32, DEVICE, seed=9, pad_rows=2)
    meta = dataclasses.replace(batch.meta, num_decodes=2)
    scale = 64**-0.5
    ref = TorchPagedAttention().forward(
        batch.q, batch.k, batch.v, batch.pool[:, 1].clone(), meta, scale
    )
    backend = TritonPagedAttention(split_context_prefill=True)
    backend._sms = 1024  # as on a large device: every run here leaves it idle
    out = backend.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, scale)
    splits = backend.context_splits()
    assert max(splits) > 1, splits
    rows = batch.num_seq_rows
    torch.testing.assert_close(out[:rows], ref[:rows], **TOL[torch.float32])
