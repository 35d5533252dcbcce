"""Paged attention kernels (store_kv, decode, prefill, the Triton backend) against the
plain-torch references, on random ragged batches in a NaN-poisoned, shuffled pool.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported) at small shapes in float32; with CUDA the same tests run on the GPU,
16-bit dtypes included, and the `gpu`-marked tests add model-sized shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch

from splitserve.kernels.attention_torch import TorchPagedAttention
from splitserve.kernels.testing import PagedBatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global \
        TritonPagedAttention, \
        decode_attention, \
        decode_attention_reference, \
        MergeCounters, \
        merge_partitions, \
        merge_partitions_reference, \
        prefill_attention, \
        prefill_attention_reference, \
        store_kv, \
        store_kv_reference, \
        make_paged_batch
    from splitserve.kernels.backend import TritonPagedAttention
    from splitserve.kernels.decode_attention import (
        MergeCounters,
        decode_attention,
        decode_attention_reference,
    )
    from splitserve.kernels.decode_reduce import merge_partitions, merge_partitions_reference
    from splitserve.kernels.prefill_attention import prefill_attention, prefill_attention_reference
    from splitserve.kernels.store_kv import store_kv, store_kv_reference
    from splitserve.kernels.testing import make_paged_batch


ON_GPU = DEVICE.type == "cuda"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5) if not ON_GPU else dict(atol=5e-5, rtol=5e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
# 16-bit dtypes at these small shapes run on a GPU when the whole file runs there; the
# `gpu`-marked model-sized tests below cover them under `-m gpu`.
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=gpu),
    pytest.param(torch.float16, marks=gpu),
]
# (num_heads, num_kv_heads): GQA ratios 1, 4 and 8, kept small for the interpreter.
HEADS = {1: (2, 2), 4: (4, 1), 8: (8, 1)}
DECODE_LENS = [1, 15, 16, 17, 32, 33, 70]
# (cached, new): fresh prompts, extends of a cached prefix, and decode rows mixed in.
MIXED_CASES = [(0, 1), (0, 15), (0, 17), (16, 16), (5, 1), (31, 1), (20, 12), (32, 1)]


def _batch(cases, ratio, head_dim, block_size, dtype, seed, pad_rows=0) -> PagedBatch:
    num_heads, num_kv = HEADS[ratio]
    return make_paged_batch(
        cases, num_heads, num_kv, head_dim, block_size, dtype, DEVICE, seed, pad_rows=pad_rows
    )


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _assert_written_and_close(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert not torch.isnan(out).any(), "some output elements were never written"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv(block_size: int, head_dim: int, dtype: torch.dtype) -> None:
    batch = _batch(MIXED_CASES, 4, head_dim, block_size, dtype, seed=head_dim, pad_rows=2)
    expected = batch.pool.clone()
    store_kv_reference(batch.k, batch.v, expected[:, 1], batch.meta.slot_mapping)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    # Exact, and nothing else in the pool (other layer, unused slots, padding) touched.
    torch.testing.assert_close(batch.pool, expected, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def one_tile_walks(monkeypatch) -> None:
    """Partitions as short as one 16-token tile: the short contexts of these CPU batches
    then spread over every split planned (with the served `MIN_WALK_TOKENS`, 96, each of
    them would fill one partition)."""
    from splitserve.kernels import decode_attention as dec

    monkeypatch.setattr(dec, "MIN_WALK_TOKENS", 16)


def _run_decode(batch: PagedBatch, scale: float, **kwargs) -> torch.Tensor:
    meta = batch.meta
    out = _nan_like(batch.q)
    decode_attention(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
        out=out, **kwargs,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.usefixtures("one_tile_walks")
def test_decode_attention(head_dim, ratio, block_size, num_splits, dtype) -> None:
    cases = [(n - 1, 1) for n in DECODE_LENS]
    batch = _batch(cases, ratio, head_dim, block_size, dtype, seed=ratio + block_size)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    scale = head_dim**-0.5
    # block_n 16 with 3 splits: partitions of one or more tiles, some sequences with empty
    # partitions.
    block_n = 16 if num_splits else None
    out = _run_decode(batch, scale, num_splits=num_splits, block_n=block_n)
    meta = batch.meta
    ref = decode_attention_reference(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
    )
    _assert_written_and_close(out, ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.usefixtures("one_tile_walks")
def test_a_prepared_decode_serves_every_layer_of_a_step(num_splits: int) -> None:
    """One PreparedDecode, launched for two layers' pool views, q rows and outputs (what a
    mixed step's 32 layers do), writes what decode_attention writes for each; a layout it
    was not prepared for is refused."""
    from splitserve.kernels.decode_attention import PreparedDecode

    cases = [(n - 1, 1) for n in DECODE_LENS]
    batch = _batch(cases, 4, 64, 16, torch.float32, seed=3)
    meta, scale = batch.meta, 64**-0.5
    layers = [batch.pool[:, 0], batch.pool[:, 1]]
    queries = [batch.q, torch.randn_like(batch.q)]
    for kv in layers:
        kv.nan_to_num_(0.5)  # both layers' contexts finite (the fixture fills one)
    outs = [_nan_like(q) for q in queries]
    prepared = PreparedDecode(
        queries[0], layers[0], meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
        outs[0], num_splits=num_splits,
    )  # fmt: skip
    for q, kv, out in zip(queries, layers, outs, strict=True):
        assert prepared(q, kv, out) is out
    for q, kv, out in zip(queries, layers, outs, strict=True):
        want = decode_attention(
            q, kv, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
            num_splits=num_splits,
        )  # fmt: skip
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prepare one for this batch"):
        prepared(queries[0][:-1], layers[0], outs[0][:-1])


def _assert_same_merge(fused: torch.Tensor, separate: torch.Tensor) -> None:
    """The interpreter runs the two merges' float ops alike: equal to the bit. A GPU may
    contract them into other fused multiply-adds: equal to fp32 rounding."""
    assert not torch.isnan(fused).any(), "some output elements were never written"
    tol = dict(rtol=0, atol=0) if not ON_GPU else dict(rtol=1e-6, atol=1e-6)
    if fused.dtype != torch.float32 and ON_GPU:
        tol = dict(rtol=1e-2, atol=1e-2)  # one rounding of the 16-bit output apart
    torch.testing.assert_close(fused, separate, **tol)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.usefixtures("one_tile_walks")
def test_fused_merge_writes_what_the_merge_kernel_writes(ratio: int, num_splits: int) -> None:
    """With counters the split kernel's last partition of each query group merges (one
    launch); every sequence length, empty partitions included (16-token tiles over up to 5
    splits of 1 to 70 tokens), comes out as the separate merge kernel's, and the counters
    are zeros again after each launch."""
    cases = [(n - 1, 1) for n in DECODE_LENS]
    batch = _batch(cases, ratio, 64, 16, torch.float32, seed=ratio + num_splits)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    counters = MergeCounters()
    for layer_q in (batch.q, torch.randn_like(batch.q)):
        batch.q = layer_q
        separate = _run_decode(batch, 0.125, num_splits=num_splits, block_n=16)
        fused = _run_decode(batch, 0.125, num_splits=num_splits, block_n=16, counters=counters)
        _assert_same_merge(fused, separate)
        assert not counters.get(DEVICE, 1).any(), "a counter was left non-zero"


def test_merge_counters_grow_and_keep_every_buffer() -> None:
    """A CUDA graph keeps the address it captured: a counter buffer that grows leaves the
    old one allocated (and zero), and a smaller request reuses the latest."""
    counters = MergeCounters()
    first = counters.get(DEVICE, 8)
    assert first.dtype == torch.int32 and first.numel() == 8 and not first.any()
    assert counters.get(DEVICE, 5) is first
    grown = counters.get(DEVICE, 9)
    assert grown is not first and grown.numel() >= 16 and not grown.any()
    assert counters.get(DEVICE, 3) is grown
    assert counters.get(str(DEVICE), 2) is grown  # "cuda" names the tensors' "cuda:0"
    assert counters._buffers == [first, grown]


@pytest.mark.parametrize("case", ["decode", "mixed_decodes_first"])
@pytest.mark.usefixtures("one_tile_walks")
def test_backend_fused_merge_matches_the_separate_merge(case: str) -> None:
    """The backend with `fused_decode_merge` (decode batches and a mixed step's decode
    rows, both split three ways) writes what it writes without."""
    cases = [(n - 1, 1) for n in DECODE_LENS]
    if case != "decode":
        cases = [*cases, (0, 15), (16, 16)]
    batch = _batch(cases, 4, 64, 16, torch.float32, seed=17, pad_rows=2)
    if case != "decode":
        batch.meta = dataclasses.replace(batch.meta, num_decodes=len(DECODE_LENS))
    scale, pool = 64**-0.5, batch.pool.clone()
    outs = []
    for fused in (False, True):
        batch.pool.copy_(pool)
        attention = TritonPagedAttention(decode_num_splits=3, fused_decode_merge=fused)
        outs.append(attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, scale))
    assert TritonPagedAttention(fused_decode_merge=True)._counters is not None
    _assert_same_merge(outs[1], outs[0])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_merge_partitions_skips_unwritten_partitions(head_dim: int) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(head_dim)
    # Tiles of 16 tokens over 6 splits: partitions of 16, 16, 16, 32 and 32 tokens, with
    # 1, 2, 3, 4 and 6 of the 6 partitions written.
    batch, heads, splits, tile = 5, 4, 6, 16
    seq_lens = torch.tensor([1, 32, 33, 100, 192], dtype=torch.int32, device=DEVICE)
    part_acc = torch.randn(batch, heads, splits, head_dim, generator=gen, device=DEVICE)
    part_m = 4 * torch.randn(batch, heads, splits, generator=gen, device=DEVICE)
    part_l = torch.rand(batch, heads, splits, generator=gen, device=DEVICE) + 0.5
    # Partitions past a sequence's length were never written: poison them. At least 3
    # tiles a partition: 48 tokens each, 1, 1, 1, 3 and 4 of the 6 written.
    for min_tiles, written in ((1, [1, 2, 3, 4, 6]), (3, [1, 1, 1, 3, 4])):
        num_active = torch.tensor(written, device=DEVICE)
        active = torch.arange(splits, device=DEVICE)[None, :] < num_active[:, None]
        for t in (part_m, part_l):
            t.masked_fill_(~active[:, None, :], float("nan"))
        part_acc.masked_fill_(~active[:, None, :, None], float("nan"))
        out = torch.full((batch, heads, head_dim), float("nan"), device=DEVICE)
        merge_partitions(part_acc, part_m, part_l, seq_lens, out, tile, min_tiles)
        ref = merge_partitions_reference(part_acc, part_m, part_l, seq_lens, tile, min_tiles)
        _assert_written_and_close(out, ref, torch.float32)


@pytest.mark.parametrize("fused", [False, True])
def test_short_contexts_fill_fewer_partitions_than_planned(fused: bool, monkeypatch) -> None:
    """With partitions of at least `MIN_WALK_TOKENS` (48 here: three 16-token tiles), a
    plan of 5 splits cuts the 17- to 70-token contexts into 1 or 2 partitions, not 5 of one
    tile, and both merges take only those: the output is the reference's, all written."""
    from splitserve.kernels import decode_attention as dec

    monkeypatch.setattr(dec, "MIN_WALK_TOKENS", 48)
    cases = [(n - 1, 1) for n in DECODE_LENS]
    batch = _batch(cases, 4, 64, 16, torch.float32, seed=29)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    counters = MergeCounters() if fused else None
    out = _run_decode(batch, 0.125, num_splits=5, block_n=16, counters=counters)
    meta = batch.meta
    ref = decode_attention_reference(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.125
    )
    _assert_written_and_close(out, ref, torch.float32)
    if fused:
        assert not counters.get(DEVICE, 1).any(), "a counter was left non-zero"


def _run_prefill(batch: PagedBatch, scale: float, **kwargs) -> torch.Tensor:
    meta = batch.meta
    out = _nan_like(batch.q)
    prefill_attention(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        meta.max_query_len, scale, out=out, **kwargs,
    )  # fmt: skip
    return out


def _prefill_ref(batch: PagedBatch, scale: float) -> torch.Tensor:
    meta = batch.meta
    return prefill_attention_reference(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_attention(head_dim, ratio, block_size, dtype) -> None:
    batch = _batch(MIXED_CASES, ratio, head_dim, block_size, dtype, seed=ratio * block_size)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    scale = head_dim**-0.5
    # KV tiles smaller and larger than a pool block; query tiles shorter than some chunks.
    tile = 32 if block_size == 16 else 16
    out = _run_prefill(batch, scale, block_m=tile, block_n=tile)
    _assert_written_and_close(out, _prefill_ref(batch, scale), dtype)


def _backend_pair(batch: PagedBatch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ref_pool = batch.pool.clone()
    ref = TorchPagedAttention().forward(
        batch.q, batch.k, batch.v, ref_pool[:, 1], batch.meta, scale
    )
    out = TritonPagedAttention().forward(
        batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, scale
    )
    torch.testing.assert_close(batch.pool, ref_pool, rtol=0, atol=0, equal_nan=True)
    rows = batch.num_seq_rows
    # Padding rows (slot -1, no blocks) see no key: they come out as zeros, never NaN.
    assert bool((out[rows:] == 0).all())
    return out[:rows], ref[:rows]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "mixed", "mixed_decodes_first"])
def test_backend_matches_torch_backend(case: str, dtype: torch.dtype) -> None:
    """mixed_decodes_first: the leading decode rows take the decode kernel, the rest the
    prefill kernel (meta.num_decodes, as the model runner lays batches out)."""
    cases = MIXED_CASES if case != "decode" else [(n - 1, 1) for n in DECODE_LENS]
    if case == "mixed_decodes_first":
        cases = sorted(cases, key=lambda c: c[1] != 1)
    batch = _batch(cases, 4, 64, 16, dtype, seed=11, pad_rows=2)
    if case == "mixed_decodes_first":
        num_decodes = next(i for i, c in enumerate(cases) if c[1] != 1)
        assert num_decodes == 4
        batch.meta = dataclasses.replace(batch.meta, num_decodes=num_decodes)
    assert batch.meta.is_all_decode == (case == "decode")
    out, ref = _backend_pair(batch, 64**-0.5)
    _assert_written_and_close(out, ref, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_store_then_attend_stored_matches_the_storing_forward(backend: str) -> None:
    """What the piecewise graphs do: `store` the rows' K/V, then `forward` with
    `kv_stored`, which attends without writing the pool, into the same output as one
    storing forward (a mixed batch, so the prefill rows read their own K/V from the pool)."""
    make = TritonPagedAttention if backend == "triton" else TorchPagedAttention
    batch = _batch(MIXED_CASES, 4, 64, 16, torch.float32, seed=5, pad_rows=2)
    scale = 64**-0.5
    stored_pool = batch.pool.clone()
    want = make().forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, scale)
    batch.pool.copy_(stored_pool)
    attention = make()
    attention.store(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    after_store = batch.pool.clone()
    stored = dataclasses.replace(batch.meta, kv_stored=True)
    got = attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, stored, scale)
    torch.testing.assert_close(batch.pool, after_store, rtol=0, atol=0, equal_nan=True)
    rows = batch.num_seq_rows
    torch.testing.assert_close(got[:rows], want[:rows], rtol=0, atol=0)
    # Without the store, a forward that skips it reads the pool as it was: not the same.
    batch.pool.copy_(stored_pool)
    skipped = make().forward(batch.q, batch.k, batch.v, batch.kv_cache, stored, scale)
    assert not torch.equal(skipped[:rows], want[:rows])


# Model-sized shapes, GPU only.
GPU_DECODE_LENS = [1, 15, 16, 17, 32, 255, 1000, 2048, 4096, 4097]
GPU_MIXED = [(0, 2048), (1024, 512), (4000, 1), (17, 300), (0, 1), (511, 1), (2047, 129)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 7])
@pytest.mark.parametrize("heads", [(32, 8), (32, 4), (8, 8)])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
def test_decode_attention_full(head_dim, block_size, heads, num_splits, dtype) -> None:
    cases = [(n - 1, 1) for n in GPU_DECODE_LENS] * 3
    batch = make_paged_batch(cases, *heads, head_dim, block_size, dtype, DEVICE, seed=5)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    scale = head_dim**-0.5
    out = _run_decode(batch, scale, num_splits=num_splits)
    meta = batch.meta
    ref = decode_attention_reference(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
    )
    _assert_written_and_close(out, ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 7, 32])
def test_fused_merge_full(num_splits, dtype) -> None:
    """Model-sized batches on the device, where the partitions of a group run on many
    multiprocessors at once: twenty launches sharing one counter buffer (new queries each
    time) write what the separate merge writes, and leave the counters zero."""
    cases = [(n - 1, 1) for n in GPU_DECODE_LENS] * 5
    batch = make_paged_batch(cases, 32, 8, 128, 16, dtype, DEVICE, seed=21)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    counters = MergeCounters()
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    for _launch in range(20):
        batch.q = torch.randn(batch.q.shape, generator=gen, device=DEVICE).to(dtype)
        separate = _run_decode(batch, 128**-0.5, num_splits=num_splits)
        fused = _run_decode(batch, 128**-0.5, num_splits=num_splits, counters=counters)
        _assert_same_merge(fused, separate)
    torch.cuda.synchronize()
    assert not counters.get(DEVICE, 1).any(), "a counter was left non-zero"


@pytest.mark.gpu
@gpu
def test_fused_merge_replays_in_a_cuda_graph() -> None:
    """What the decode graphs do: counters allocated before the capture, the launch
    captured at a context limit, replayed over new contexts and queries."""
    dtype, limit = torch.bfloat16, 4096
    cases = [(n - 1, 1) for n in (1, 17, 300, 1000, 2048, 4095)] * 8
    batch = make_paged_batch(cases, 32, 8, 128, 16, dtype, DEVICE, seed=22)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    meta, counters = batch.meta, MergeCounters()
    q, lens, out = batch.q.clone(), meta.seq_lens.clone(), torch.empty_like(batch.q)

    def launch() -> None:
        decode_attention(
            q, batch.kv_cache, meta.block_tables, lens, limit, 0.088, out=out, counters=counters
        )

    launch()  # compiles, and allocates the counters outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    for _replay in range(5):
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE).to(dtype))
        # Each row within its own stored context (the pool past it is NaN).
        fraction = torch.rand(lens.shape, generator=gen, device=DEVICE)
        lens.copy_((fraction * meta.seq_lens).ceil().clamp_min(1).to(torch.int32))
        graph.replay()
        want = decode_attention(q, batch.kv_cache, meta.block_tables, lens, limit, 0.088)
        _assert_same_merge(out, want)
    torch.cuda.synchronize()
    assert not counters.get(DEVICE, 1).any()


# Launch configs (block_n, num_warps, num_stages) the benchmark sweeps for 16-bit decode.
DECODE_LAUNCHES = [(16, 2, 3), (16, 2, 4), (16, 2, 5), (32, 4, 3), (64, 8, 2), (128, 8, 2)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 7])  # the single-partition path and split-K
@pytest.mark.parametrize("heads", [(32, 8), (8, 8)])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
@pytest.mark.parametrize("launch", DECODE_LAUNCHES)
def test_decode_attention_launch_configs(
    launch, head_dim, block_size, heads, num_splits, dtype
) -> None:
    cases = [(n - 1, 1) for n in GPU_DECODE_LENS]
    batch = make_paged_batch(cases, *heads, head_dim, block_size, dtype, DEVICE, seed=7)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    scale = head_dim**-0.5
    block_n, num_warps, num_stages = launch
    out = _run_decode(
        batch, scale, num_splits=num_splits, block_n=block_n, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    meta = batch.meta
    ref = decode_attention_reference(
        batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
    )
    _assert_written_and_close(out, ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(32, 8), (32, 4), (8, 8)])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
def test_prefill_attention_full(head_dim, block_size, heads, dtype) -> None:
    batch = make_paged_batch(GPU_MIXED, *heads, head_dim, block_size, dtype, DEVICE, seed=6)
    store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    scale = head_dim**-0.5
    out = _run_prefill(batch, scale)
    _assert_written_and_close(out, _prefill_ref(batch, scale), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_backend_matches_torch_backend_full(case: str, dtype: torch.dtype) -> None:
    cases = GPU_MIXED if case == "mixed" else [(n - 1, 1) for n in GPU_DECODE_LENS]
    batch = make_paged_batch(cases, 32, 8, 128, 16, dtype, DEVICE, seed=8, pad_rows=3)
    out, ref = _backend_pair(batch, 128**-0.5)
    _assert_written_and_close(out, ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_decodes", [0, 5])
def test_fresh_prefills_take_the_flash_kernel(num_decodes: int, dtype, monkeypatch) -> None:
    """Prefill chunks with no cached context (behind any decode rows) go to torch's flash
    kernel and match the torch backend; rows past the sequences (a graph bucket's padding)
    come out zero. One cached chunk sends the step back to the Triton kernel."""
    import splitserve.kernels.backend as backend
    from splitserve.kernels.registry import select_kernels

    assert select_kernels("cuda").attention.flash_fresh_prefill  # type: ignore[attr-defined]
    pinned = select_kernels("cuda", attention_backend="triton").attention
    assert not pinned.flash_fresh_prefill  # type: ignore[attr-defined]
    calls: list[int] = []
    flash = backend.fresh_prefill_attention
    monkeypatch.setattr(
        backend, "fresh_prefill_attention", lambda *a, **kw: calls.append(1) or flash(*a, **kw)
    )
    fresh = [(0, 2048), (0, 1), (0, 300), (0, 17)]
    for cases, flash_calls in ((fresh, 1), ([*fresh, (64, 40)], 0)):
        cases = [(700, 1)] * num_decodes + cases
        batch = make_paged_batch(cases, 32, 8, 128, 16, dtype, DEVICE, seed=9)
        meta = dataclasses.replace(batch.meta, num_decodes=num_decodes)
        extra = torch.randn(3, *batch.q.shape[1:], dtype=dtype, device=DEVICE)
        q, k, v = (torch.cat([t, extra[:, : t.shape[1]]]) for t in (batch.q, batch.k, batch.v))
        slots = torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((3,), -1)])
        meta = dataclasses.replace(meta, slot_mapping=slots)
        ref_pool = batch.pool.clone()
        ref = TorchPagedAttention().forward(q, k, v, ref_pool[:, 1], meta, 128**-0.5)
        calls.clear()
        attention = TritonPagedAttention(flash_fresh_prefill=True)
        out = attention.forward(q, k, v, batch.kv_cache, meta, 128**-0.5)
        assert len(calls) == flash_calls
        torch.testing.assert_close(batch.pool, ref_pool, rtol=0, atol=0, equal_nan=True)
        rows = batch.num_seq_rows
        assert bool((out[rows:] == 0).all()) or not flash_calls
        _assert_written_and_close(out[:rows], ref[:rows], dtype)


# (cached, new): two decode rows, then the short rests of long prompts, as a step's token
# budget leaves them, and a longer chunk.
REST_CASES = [(70, 1), (33, 1), (90, 5), (64, 3), (40, 12)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows_max", [0, 11, 12])
@pytest.mark.usefixtures("one_tile_walks")
def test_short_rests_take_the_decode_kernel_a_row_at_a_time(rows_max: int, fused: bool) -> None:
    """With `short_rest_rows`, a mixed step's chunks over cached context of at most that
    many rows are attended by the decode kernel, each row as a sequence ending at its own
    position (split three ways, merged by the kernel or by the merge kernel), and come out
    as the torch backend's; a longer chunk keeps the whole run on the prefill kernel."""
    from splitserve.kernels.prefill_runs import CONTEXT, ROWS

    batch = _batch(REST_CASES, 4, 64, 16, torch.float32, seed=23, pad_rows=2)
    meta = dataclasses.replace(batch.meta, num_decodes=2)
    ref_pool = batch.pool.clone()
    ref = TorchPagedAttention().forward(batch.q, batch.k, batch.v, ref_pool[:, 1], meta, 0.125)
    attention = TritonPagedAttention(
        decode_num_splits=3, fused_decode_merge=fused, short_rest_rows=rows_max
    )
    rows = batch.num_seq_rows
    for _layer in range(2):  # the second layer reuses the step's prepared row launch
        out = attention.forward(
            batch.q, batch.k, batch.v, batch.kv_cache, meta, 0.125, out=_nan_like(batch.q)
        )
        _assert_written_and_close(out[:rows], ref[:rows], torch.float32)
    kind = ROWS if rows_max >= 12 else CONTEXT
    assert attention.prefill_runs() == {**dict.fromkeys(attention.prefill_runs(), 0), kind: 1}


def test_short_rest_rows_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="short_rest_rows"):
        TritonPagedAttention(short_rest_rows=-1)


def test_a_mixed_step_is_planned_once_for_all_its_layers(monkeypatch) -> None:
    """The layers of one step share its metadata object: the split into decode rows and
    prefill sequences (and the shifted query starts, a device op) is worked out on the
    first layer only, and a new step's metadata gets a new plan."""
    from splitserve.kernels import backend

    cases = sorted(MIXED_CASES, key=lambda c: c[1] != 1)
    batch = _batch(cases, 4, 64, 16, torch.float32, seed=5)
    meta = dataclasses.replace(batch.meta, num_decodes=sum(c[1] == 1 for c in cases))
    planned: list[int] = []
    plan = backend._MixedPlan
    monkeypatch.setattr(backend, "_MixedPlan", lambda **kw: planned.append(1) or plan(**kw))
    attention = TritonPagedAttention(flash_fresh_prefill=True)
    ref_pool = batch.pool.clone()
    ref = TorchPagedAttention().forward(batch.q, batch.k, batch.v, ref_pool[:, 1], meta, 0.125)
    rows = batch.num_seq_rows
    for _layer in range(3):  # one pool layer stands for every layer of the step
        out = attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, 0.125)
        _assert_written_and_close(out[:rows], ref[:rows], torch.float32)
    assert len(planned) == 1
    attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, dataclasses.replace(meta), 0.125)
    assert len(planned) == 2


class _RecordingBranch:
    """A side stream that records the order of events (CPU tests have no streams)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    @contextlib.contextmanager
    def branch(self) -> Iterator[None]:
        self.events.append("branch")
        yield
        self.events.append("back")

    def join(self) -> None:
        self.events.append("join")


def test_overlap_runs_decode_rows_on_the_side_stream_then_joins(monkeypatch) -> None:
    """With overlap_decode_rows, a mixed step's decode kernel runs inside the side
    stream's branch, the prefill kernel after it on the current stream, and the current
    stream joins the side stream before attention returns: same outputs as without it.
    An all-decode step (one kernel) and a step without decode rows never branch."""
    from splitserve.kernels import backend

    events: list[str] = []
    for name in ("decode_attention", "prefill_attention"):
        kernel = getattr(backend, name)
        monkeypatch.setattr(
            backend, name,
            lambda *a, _n=name, _k=kernel, **kw: events.append(_n) or _k(*a, **kw),
        )  # fmt: skip

    class RecordedDecode(backend.PreparedDecode):  # a mixed step's decode rows
        def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            events.append("decode_attention")
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(backend, "PreparedDecode", RecordedDecode)
    cases = sorted(MIXED_CASES, key=lambda c: c[1] != 1)
    batch = _batch(cases, 4, 64, 16, torch.float32, seed=7)
    meta = dataclasses.replace(batch.meta, num_decodes=sum(c[1] == 1 for c in cases))
    ref_pool = batch.pool.clone()
    ref = TorchPagedAttention().forward(batch.q, batch.k, batch.v, ref_pool[:, 1], meta, 0.125)
    attention = TritonPagedAttention(overlap_decode_rows=True, side_stream=_RecordingBranch(events))
    out = attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, 0.125)
    assert events == ["branch", "decode_attention", "back", "prefill_attention", "join"]
    rows = batch.num_seq_rows
    _assert_written_and_close(out[:rows], ref[:rows], torch.float32)
    events.clear()
    no_decodes = dataclasses.replace(meta, num_decodes=0)
    attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, no_decodes, 0.125)
    assert events == ["prefill_attention"]
    events.clear()
    decode = _batch([(n - 1, 1) for n in DECODE_LENS], 4, 64, 16, torch.float32, seed=3)
    attention.forward(decode.q, decode.k, decode.v, decode.kv_cache, decode.meta, 0.125)
    assert events == ["decode_attention"]


def test_overlap_is_off_by_default_and_on_the_cpu() -> None:
    """The registry gives the Triton backend a side stream only on CUDA and when asked."""
    from splitserve.kernels.registry import select_kernels

    assert not TritonPagedAttention().overlap_decode_rows
    cpu = select_kernels("cpu", attention_backend="triton", overlap_decode_attention=True)
    assert not cpu.attention.overlap_decode_rows  # type: ignore[attr-defined]
    assert cpu.attention._side_stream(torch.device("cpu")) is None  # type: ignore[attr-defined]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize(
    "prefills", [[(0, 1024), (0, 300)], [(0, 1024), (300, 200)], [(0, 1024), (4084, 12)]]
)
def test_overlapped_mixed_step_matches_torch_backend_on_gpu(prefills, dtype) -> None:
    """On a real second stream (decode rows beside fresh prompts, which take the flash
    kernel, beside a cached chunk, which takes the Triton one, or beside a short rest,
    which takes the decode kernel a row at a time with merge counters of its own), the
    outputs match the torch backend, and repeated layers reuse the one side stream."""
    from splitserve.kernels.side_stream import SideStream

    cases = [(1000, 1)] * 24 + prefills
    batch = make_paged_batch(cases, 32, 8, 128, 16, dtype, DEVICE, seed=13)
    meta = dataclasses.replace(batch.meta, num_decodes=24)
    ref_pool = batch.pool.clone()
    ref = TorchPagedAttention().forward(batch.q, batch.k, batch.v, ref_pool[:, 1], meta, 0.088)
    attention = TritonPagedAttention(
        flash_fresh_prefill=True,
        overlap_decode_rows=True,
        fused_decode_merge=True,
        short_rest_rows=32,
    )
    rows = batch.num_seq_rows
    for _layer in range(3):
        out = attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, 0.088)
        torch.cuda.synchronize()
        _assert_written_and_close(out[:rows], ref[:rows], dtype)
    assert isinstance(attention._side, SideStream)


def test_wrappers_reject_bad_arguments() -> None:
    batch = _batch([(3, 1), (0, 5)], 1, 64, 16, torch.float32, seed=0)
    meta, scale = batch.meta, 0.125
    args = (batch.kv_cache, meta.block_tables, meta.seq_lens)
    with pytest.raises(ValueError, match="int32"):
        decode_attention(batch.q[:2], batch.kv_cache, meta.block_tables.long(), *args[2:], 8, scale)
    strided_k = torch.cat([batch.k, batch.k], dim=-1)[..., ::2]
    with pytest.raises(ValueError, match="unit stride"):
        store_kv(strided_k, batch.v, batch.kv_cache, meta.slot_mapping)
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention(batch.q[:, :1], *args, meta.query_start_loc, 5, scale)
    with pytest.raises(ValueError, match="power of two"):
        prefill_attention(batch.q, *args, meta.query_start_loc, 5, scale, block_m=24)
    with pytest.raises(ValueError, match="dtype"):
        store_kv(batch.k, batch.v, batch.kv_cache, meta.slot_mapping.int())
    with pytest.raises(ValueError, match="fewer than max_seq_len"):
        decode_attention(batch.q[:2], *args, 10_000, scale)


@pytest.mark.parametrize(
    ("batch", "max_seq_len", "splits"),
    [
        (1, 512, 2),  # partitions of at least 256 tokens
        (1, 8192, 32),  # as many as fill the device, at most MAX_SPLITS
        (24, 8192, 4),  # 192 programs on 132 SMs: split to about 5.5 an SM
        (32, 1150, 3),
        (48, 1150, 2),
        (56, 1150, 2),  # 448 programs, 3.4 an SM: two partitions still pay
        (64, 1150, 1),  # 512 programs give every SM 3.9: one partition each
        (64, 8192, 1),  # a decode graph's plan is the same for every context
        (96, 1150, 1),
        (128, 8192, 1),  # 1,024 programs: one round of 8 resident programs an SM
        (160, 8192, 4),  # 1,280: a last round of 2 an SM, evened out by splitting
        (256, 8192, 1),  # 2,048: two full rounds
    ],
)
def test_split_plan_splits_only_batches_that_leave_the_device_idle(
    batch: int, max_seq_len: int, splits: int
) -> None:
    from splitserve.kernels.decode_attention import plan_splits

    plan = plan_splits(batch, 8, max_seq_len, 16, 132)
    assert plan.num_splits == splits
    assert plan.partition_size * plan.num_splits >= max_seq_len
