"""TorchPagedAttention against a dense causal attention written independently (float64,
heads repeated, one sequence at a time), over ragged batches in a NaN-poisoned pool."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.attention_torch import TorchPagedAttention

HEAD_DIM = 16
# (cached tokens, new tokens) per sequence.
CASES = {
    "decode": [(0, 1), (15, 1), (16, 1), (31, 1), (32, 1), (47, 1), (100, 1)],
    "prefill": [(0, 1), (0, 16), (0, 33), (16, 16), (20, 13), (0, 64)],
    "mixed": [(5, 1), (0, 17), (31, 1), (32, 40), (63, 2)],
}
TOLERANCE: dict[torch.dtype, dict[str, Any]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [Lq, H, D] for the last Lq of L positions; k, v: [L, KVH, D]. float64."""
    num_q, num_heads = q.shape[:2]
    seq_len, num_kv = k.shape[:2]
    k = k.double().repeat_interleave(num_heads // num_kv, dim=1)
    v = v.double().repeat_interleave(num_heads // num_kv, dim=1)
    out = torch.empty(num_q, num_heads, q.shape[2], dtype=torch.float64)
    for i in range(num_q):
        visible = seq_len - num_q + i + 1
        scores = torch.einsum("hd,khd->hk", q[i].double(), k[:visible]) * scale
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[:visible])
    return out


class Batch:
    """Random sequences laid out in a poisoned pool with shuffled block ids."""

    def __init__(self, cases, num_heads, num_kv, block_size, dtype, seed, pad_rows=0):
        gen = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-(c + n) // block_size) for c, n in cases]
        num_blocks = sum(blocks_per_seq) + 3
        self.pool = torch.full(
            (num_blocks, 2, block_size, num_kv, HEAD_DIM), float("nan"), dtype=dtype
        )
        order = torch.randperm(num_blocks, generator=gen).tolist()
        max_blocks = max(blocks_per_seq)
        qs, ks, vs, slots, tables = [], [], [], [], []
        self.full = []
        for (cached, new), nblk in zip(cases, blocks_per_seq, strict=True):
            ids, order = order[:nblk], order[nblk:]
            seq_len = cached + new
            k = torch.randn(seq_len, num_kv, HEAD_DIM, generator=gen).to(dtype)
            v = torch.randn(seq_len, num_kv, HEAD_DIM, generator=gen).to(dtype)
            q = torch.randn(new, num_heads, HEAD_DIM, generator=gen).to(dtype)
            seq_slots = [ids[p // block_size] * block_size + p % block_size for p in range(seq_len)]
            for p in range(cached):  # the cached prefix is already in the pool
                b, o = divmod(seq_slots[p], block_size)
                self.pool[b, 0, o], self.pool[b, 1, o] = k[p], v[p]
            qs.append(q)
            ks.append(k[cached:])
            vs.append(v[cached:])
            slots += seq_slots[cached:]
            tables.append(ids + [-1] * (max_blocks - nblk))
            self.full.append((q, k, v))
        query_lens = [n for _, n in cases] + [1] * pad_rows
        seq_lens = [c + n for c, n in cases] + [1] * pad_rows
        for _ in range(pad_rows):  # padding rows: slot -1, no blocks
            qs.append(torch.randn(1, num_heads, HEAD_DIM, generator=gen).to(dtype))
            ks.append(torch.randn(1, num_kv, HEAD_DIM, generator=gen).to(dtype))
            vs.append(torch.randn(1, num_kv, HEAD_DIM, generator=gen).to(dtype))
            slots.append(-1)
            tables.append([-1] * max_blocks)
        self.q, self.k, self.v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        starts = torch.tensor([0, *query_lens]).cumsum(0)
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=starts.to(torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_reference(case, block_size, num_heads, num_kv, dtype) -> None:
    batch = Batch(CASES[case], num_heads, num_kv, block_size, dtype, seed=block_size + num_kv)
    before = batch.pool.clone()
    scale = HEAD_DIM**-0.5
    out = TorchPagedAttention().forward(batch.q, batch.k, batch.v, batch.pool, batch.meta, scale)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert batch.meta.is_all_decode == (case == "decode")
    row = 0
    for q, k, v in batch.full:
        ref = dense_causal_attention(q, k, v, scale)
        got = out[row : row + len(q)].double()
        torch.testing.assert_close(got, ref, **TOLERANCE[dtype])
        row += len(q)
    _check_pool(batch, before)


def _check_pool(batch: Batch, before: torch.Tensor) -> None:
    """New rows landed at their slots; every other pool entry is bit-for-bit unchanged."""
    block_size = batch.pool.shape[2]
    expected = before.clone()
    for i, slot in enumerate(batch.meta.slot_mapping.tolist()):
        if slot >= 0:
            b, o = divmod(slot, block_size)
            expected[b, 0, o], expected[b, 1, o] = batch.k[i], batch.v[i]
    torch.testing.assert_close(batch.pool, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_padding_slots_are_skipped(case: str) -> None:
    batch = Batch(CASES[case], 8, 2, 16, torch.float32, seed=7, pad_rows=3)
    before = batch.pool.clone()
    scale = HEAD_DIM**-0.5
    out = TorchPagedAttention().forward(batch.q, batch.k, batch.v, batch.pool, batch.meta, scale)
    row = 0
    for q, k, v in batch.full:
        ref = dense_causal_attention(q, k, v, scale)
        torch.testing.assert_close(
            out[row : row + len(q)].double(), ref, **TOLERANCE[torch.float32]
        )
        row += len(q)
    # The padding rows' K/V went nowhere: still NaN wherever nothing was written.
    _check_pool(batch, before)
    assert torch.isnan(batch.pool).any()


def test_layer_view_of_block_major_pool() -> None:
    """The backend writes through a strided per-layer view of the full pool."""
    cases = CASES["mixed"]
    batch = Batch(cases, 4, 2, 16, torch.float32, seed=3)
    num_layers = 3
    full = torch.full((batch.pool.shape[0], num_layers, *batch.pool.shape[1:]), 7.0)
    full[:, 1] = batch.pool
    scale = HEAD_DIM**-0.5
    out = TorchPagedAttention().forward(batch.q, batch.k, batch.v, full[:, 1], batch.meta, scale)
    row = 0
    for q, k, v in batch.full:
        torch.testing.assert_close(
            out[row : row + len(q)].double(),
            dense_causal_attention(q, k, v, scale),
            **TOLERANCE[torch.float32],
        )
        row += len(q)
    assert bool((full[:, 0] == 7.0).all()) and bool((full[:, 2] == 7.0).all())
    written = batch.meta.slot_mapping
    b, o = written // 16, written % 16
    torch.testing.assert_close(full[b, 1, 0, o], batch.k)
