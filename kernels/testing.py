"""Random paged batches for the kernel tests and benchmarks.

`make_paged_batch(cases, ...)` lays out one sequence per `(cached_len, new_len)` case in a
block-major pool `kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`
with shuffled block ids: the cached prefix is already in the pool (random values), the
new tokens come as q/k/v rows with their slot mapping, and every other pool entry is NaN
(`poison=True`, so a kernel that reads outside a sequence's context shows it) or random.
The attention layer under test is the strided view `kv_cache = pool[:, layer]`. Built
with vectorised torch ops, so benchmark-sized batches (hundreds of thousands of tokens)
are quick to make on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kernels.attention import AttentionMetadata


@dataclass
class PagedBatch:
    pool: torch.Tensor  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    kv_cache: torch.Tensor  # pool[:, layer]: [num_blocks, 2, block_size, num_kv_heads, head_dim]
    q: torch.Tensor  # [T, num_heads, head_dim]
    k: torch.Tensor  # [T, num_kv_heads, head_dim]
    v: torch.Tensor  # [T, num_kv_heads, head_dim]
    meta: AttentionMetadata
    num_seq_rows: int  # rows that belong to a case (padding rows follow)


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _block_tables(
    blocks_per_seq: list[int], num_blocks: int, rows: int, gen, device: torch.device
) -> torch.Tensor:
    """Each sequence's blocks drawn from a shuffle of the pool's ids; -1 past them and in
    the `rows` beyond the sequences (padding rows)."""
    order = torch.randperm(num_blocks, generator=gen, device=device)
    tables = torch.full((rows, max([*blocks_per_seq, 1])), -1, dtype=torch.int32, device=device)
    first = 0
    for b, nblk in enumerate(blocks_per_seq):
        tables[b, :nblk] = order[first : first + nblk].to(torch.int32)
        first += nblk
    return tables


def _context_slots(
    cases: list[tuple[int, int]], tables: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot of every context position of every case sequence, and which of them are
    cached (the rest are the new rows)."""
    device = tables.device
    lens = torch.tensor([c + n for c, n in cases], device=device)
    seq_of = torch.repeat_interleave(torch.arange(len(cases), device=device), lens)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(int(lens.sum()), device=device) - starts[seq_of]
    slots = tables[seq_of, pos // block_size].long() * block_size + pos % block_size
    cached = torch.tensor([c for c, _ in cases], device=device)
    return slots, pos < cached[seq_of]


def _metadata(
    cases: list[tuple[int, int]], new_slots: torch.Tensor, tables: torch.Tensor, pad_rows: int
) -> AttentionMetadata:
    """The batch's metadata: the cases' new rows, then `pad_rows` one-row decodes of
    length 1 (slot -1)."""
    device = tables.device
    query_lens = [n for _, n in cases] + [1] * pad_rows
    all_seq_lens = [c + n for c, n in cases] + [1] * pad_rows
    padding = torch.full((pad_rows,), -1, dtype=torch.int64, device=device)
    return AttentionMetadata(
        slot_mapping=torch.cat([new_slots, padding]),
        query_start_loc=torch.tensor([0, *query_lens], device=device).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(all_seq_lens, dtype=torch.int32, device=device),
        block_tables=tables,
        max_query_len=max([*query_lens, 0]),
        max_seq_len=max([*all_seq_lens, 0]),
        query_lens_cpu=query_lens,
        seq_lens_cpu=all_seq_lens,
    )


def make_paged_batch(
    cases: list[tuple[int, int]],  # (cached tokens, new tokens) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_layers: int = 2,
    layer: int = 1,
    pad_rows: int = 0,  # trailing decode rows with slot -1 and an all -1 block table
    poison: bool = True,
    spare_blocks: int = 3,
) -> PagedBatch:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in cases]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    if poison:
        pool = torch.full(shape, float("nan"), dtype=dtype, device=device)
    else:
        pool = _random(shape, dtype, device, gen)
    kv_cache = pool[:, layer]
    tables = _block_tables(blocks_per_seq, num_blocks, len(cases) + pad_rows, gen, device)
    slots, is_cached = _context_slots(cases, tables, block_size)
    cached_slots = slots[is_cached]
    ctx_shape = (int(cached_slots.numel()), num_kv_heads, head_dim)
    blocks, offsets = cached_slots // block_size, cached_slots % block_size
    for kind in (0, 1):
        kv_cache[:, kind][blocks, offsets] = _random(ctx_shape, dtype, device, gen)
    num_rows = sum(n for _, n in cases) + pad_rows
    return PagedBatch(
        pool=pool,
        kv_cache=kv_cache,
        q=_random((num_rows, num_heads, head_dim), dtype, device, gen),
        k=_random((num_rows, num_kv_heads, head_dim), dtype, device, gen),
        v=_random((num_rows, num_kv_heads, head_dim), dtype, device, gen),
        meta=_metadata(cases, slots[~is_cached], tables, pad_rows),
        num_seq_rows=num_rows - pad_rows,
    )
