"""Paged decode attention: one query token per sequence, split-K (flash-decoding).

Stage 1 (`_decode_split_kernel`, grid (batch, num_kv_heads, num_splits)): each program
takes one sequence, one KV head and one partition of that sequence's context,
gathers the partition's K/V through the block table tile by tile, and scores all
`group_size` query heads that share the KV head in one `tl.dot` (the group is padded to 16
rows), so each KV byte is read once per KV head. It writes the partition's running max
`m`, sum `l` and unnormalised output `acc` (fp32). Partitions that start at or past the
sequence's length write nothing.

Stage 2 (`decode_reduce.merge_partitions`, grid (batch, num_heads)) merges the partitions that
hold tokens: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.
With a single partition stage 1 normalises and writes the output itself and stage 2 is
skipped. With `counters` (`MergeCounters`, zeros) stage 2 runs inside stage 1: each
partition stores its partials, the block synchronises, one thread takes a ticket from its
(sequence, KV head) counter with an acquire-release atomic at device scope, and the
partition that takes the last ticket merges the group's partitions (loads that bypass L1)
and sets the counter back to zero: one launch a layer instead of two.

Each sequence splits its own context evenly: its partitions hold
`partition_tokens(seq_len, num_splits, block_n, min_tiles)` tokens (seq_len / num_splits
rounded up to whole KV tiles, and at least `MIN_WALK_TOKENS`), so a short sequence in a
batch of long ones still spreads over the splits, into fewer of them where its context
is too short for partitions of that length. The number of splits is picked on the host
from `max_seq_len` and the batch shape so that batch x kv_heads x splits fills the
multiprocessors a few times over, and a batch of more programs than the device holds at
once evens out its last round (`round_cost`); nothing is read back from the device, and
the grid depends only on host ints (a CUDA graph captures it once for contexts up to its
`max_seq_len`).
Reference: `splitserve.kernels.attention_torch.decode_batched` (via
`decode_attention_reference`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.attention_torch import decode_batched
from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_launchable,
    check_shape,
    check_tensor,
    check_tile,
    dot_precision,
    indexed_device,
    next_pow2,
    num_sms,
)
from splitserve.kernels.decode_reduce import partition_tokens, prepare_merge
from splitserve.kernels.paged import attend_kv_tile

LOG2E = 1.4426950408889634
# Fewest context tokens worth a partition of their own (below this the reduce costs more
# than the parallelism gains).
MIN_PARTITION_TOKENS = 256
# The most partitions a sequence is split into.
MAX_SPLITS = 64
# Fewest context tokens a partition walks (rounded up to whole KV tiles): a decode graph's
# split count is planned for its context limit, so a short context cut that many ways gets
# partitions too short to pay for their partial results. Graph-replayed on an H100 at
# 1,150 tokens, 96-token partitions were the fastest at batch 1, 2 and 4 (13.2, 13.7 and
# 15.6 µs) where the plan's 48 and 64 took 14.7, 16.1 and 17.6
# (benchmarks/results/kernels/split_plan_small_h100_2523bcc/).
MIN_WALK_TOKENS = 96
# Programs per multiprocessor the split heuristic aims for: graph-replayed on an H200, the
# fastest count gave 5.8 at batch 24, 32 and 48 of 1,150-token contexts and at batch 24 of
# 4,200 (4 splits at batch 24: 9% and 13% faster than the 3 that an aim of 4 picked).
PROGRAMS_PER_SM = 5.5
# A batch whose unsplit programs (batch x kv_heads) give every multiprocessor at least this
# many is not split while they fit one round (`RESIDENT_PROGRAMS`): on an H200 at 1,150
# tokens one partition per sequence is fastest from batch 64 (3.9 a multiprocessor) to
# 128, and two beat one by 8% at batch 56 (3.4), graph-replayed (docs/kernels.md).
UNSPLIT_PROGRAMS_PER_SM = 3.5
# Past one round the plan comes from `round_cost`, a model fitted on an H200 with the
# default launch (16-token tiles, 2 warps, 5 stages): a multiprocessor streams
# `RESIDENT_PROGRAMS` programs at once; a last round of fewer takes at least
# `PARTIAL_ROUND_FLOOR` of a full one (bound by each program's load latency, not by
# bandwidth); a split plan pays `SPLIT_OVERHEAD` more for its partial results and reduce.
RESIDENT_PROGRAMS = 8
PARTIAL_ROUND_FLOOR = 0.43
SPLIT_OVERHEAD = 0.06
# The most partitions a batch of more than one round is split into.
MAX_ROUND_SPLITS = 4


# Strides that vary with the batch (table width, split count) are not specialised on, so an
# eager step never compiles a new variant mid-serving (engine/warmup.py).
@triton.jit(do_not_specialize=["stride_table_seq", "stride_pml_seq", "stride_pml_head"])
def _decode_split_kernel(
    q_ptr,  # [B, num_heads, HEAD_DIM]
    kv_ptr,  # [num_blocks, 2, KV_BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    table_ptr,  # [B, max_blocks] int32, -1 padded
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, num_heads, HEAD_DIM] (written when IS_SINGLE_SPLIT)
    part_acc_ptr,  # [B, num_heads, num_splits, HEAD_DIM] fp32 (otherwise)
    part_m_ptr,  # [B, num_heads, num_splits] fp32
    part_l_ptr,  # [B, num_heads, num_splits] fp32
    counters_ptr,  # [B * num_kv_heads] int32, zeros (read when FUSED_MERGE)
    qk_scale_log2,
    stride_q_seq,
    stride_q_head,
    stride_q_dim,
    stride_kv_block,
    stride_kv_kv,
    stride_kv_tok,
    stride_kv_head,
    stride_kv_dim,
    stride_table_seq,
    stride_table_blk,
    stride_seq_lens,
    stride_out_seq,
    stride_out_head,
    stride_out_dim,
    stride_pacc_seq,
    stride_pacc_head,
    stride_pacc_split,
    stride_pacc_dim,
    stride_pml_seq,
    stride_pml_head,
    stride_pml_split,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    MIN_TILES: tl.constexpr,
    IS_SINGLE_SPLIT: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq * stride_seq_lens)
    partition = partition_tokens(seq_len, tl.num_programs(2), BLOCK_N, MIN_TILES)
    start = split * partition
    if start >= seq_len:
        return
    end = tl.minimum(start + partition, seq_len)

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP_SIZE + groups
    row_mask = (groups < GROUP_SIZE)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :] * stride_q_dim,
        mask=row_mask,
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    table = table_ptr + seq.to(tl.int64) * stride_table_seq
    for tile_start in range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, groups, kv_ptr, table, kv_head, end, tile_start, qk_scale_log2,
            stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_kv_dim,
            stride_table_blk,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            CAUSAL=False, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    if IS_SINGLE_SPLIT:
        # A row that saw no visible key has acc = 0 and l = 0: it gets 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = (
            out_ptr
            + seq * stride_out_seq
            + heads[:, None] * stride_out_head
            + dims[None, :] * stride_out_dim
        )
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        pacc_ptrs = (
            part_acc_ptr
            + seq * stride_pacc_seq
            + heads[:, None] * stride_pacc_head
            + split * stride_pacc_split
            + dims[None, :] * stride_pacc_dim
        )
        tl.store(pacc_ptrs, acc, mask=row_mask)
        pml = seq * stride_pml_seq + heads * stride_pml_head + split * stride_pml_split
        tl.store(part_m_ptr + pml, m_i, mask=groups < GROUP_SIZE)
        tl.store(part_l_ptr + pml, l_i, mask=groups < GROUP_SIZE)
        if FUSED_MERGE:
            # Every thread's partials are stored before one thread takes a ticket (release);
            # the partition that takes the last one (acquire) merges them all.
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(1) + kv_head
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            num_active = tl.minimum(tl.cdiv(seq_len, partition), tl.num_programs(2))
            if ticket == num_active - 1:
                tl.store(counter, 0)  # zeros again for the next launch
                _merge_group(
                    part_acc_ptr + seq * stride_pacc_seq, part_m_ptr + seq * stride_pml_seq,
                    part_l_ptr + seq * stride_pml_seq, out_ptr + seq * stride_out_seq,
                    heads, groups, dims, row_mask, num_active,
                    stride_pacc_head, stride_pacc_split, stride_pacc_dim,
                    stride_pml_head, stride_pml_split, stride_out_head, stride_out_dim,
                    GROUP_SIZE=GROUP_SIZE, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
                )  # fmt: skip


@triton.jit
def _merge_group(
    pacc_ptr, pm_ptr, pl_ptr, out_ptr, heads, groups, dims, row_mask, num_active,
    stride_pacc_head, stride_pacc_split, stride_pacc_dim,
    stride_pml_head, stride_pml_split, stride_out_head, stride_out_dim,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One sequence's query group merged over its `num_active` partitions, the same sums in
    the same order as `decode_reduce`'s kernel (one head there, the group here). Loads skip
    L1 (`.cg`): other multiprocessors wrote the partials."""
    pml = heads * stride_pml_head
    pacc = heads[:, None] * stride_pacc_head + dims[None, :] * stride_pacc_dim
    live = groups < GROUP_SIZE
    m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for split in range(0, num_active):
        m_s = tl.load(pm_ptr + pml + split * stride_pml_split, mask=live, other=float("-inf"),
                      cache_modifier=".cg")  # fmt: skip
        m_max = tl.maximum(m_max, m_s)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    numer = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_G], dtype=tl.float32)
    for split in range(0, num_active):
        at = split * stride_pml_split
        weight = tl.exp2(tl.load(pm_ptr + pml + at, mask=live, other=0.0, cache_modifier=".cg")
                         - m_ref)  # fmt: skip
        denom += tl.load(pl_ptr + pml + at, mask=live, other=0.0, cache_modifier=".cg") * weight
        acc = tl.load(pacc_ptr + pacc + split * stride_pacc_split, mask=row_mask, other=0.0,
                      cache_modifier=".cg")  # fmt: skip
        numer += acc * weight[:, None]
    out = numer / tl.where(denom > 0, denom, 1.0)[:, None]
    out_ptrs = out_ptr + heads[:, None] * stride_out_head + dims[None, :] * stride_out_dim
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def min_walk_tiles(block_n: int) -> int:
    """KV tiles of `block_n` tokens in the shortest partition (`MIN_WALK_TOKENS`)."""
    return max(1, math.ceil(MIN_WALK_TOKENS / block_n))


class SplitPlan(NamedTuple):
    num_splits: int
    # Context tokens per split of the longest sequence, a multiple of the KV tile.
    partition_size: int


def round_cost(programs: int, num_splits: int, sms: int) -> float:
    """Modelled time of `programs` (sequences x KV heads) each cut into `num_splits`
    partitions, in full rounds of whole-sequence programs: the busiest multiprocessor's
    partitions run `RESIDENT_PROGRAMS` at a time, each `1 / num_splits` of a program's
    work; a partial last round costs at least `PARTIAL_ROUND_FLOOR`; splitting costs
    `SPLIT_OVERHEAD` more."""
    per_sm = math.ceil(programs * num_splits / sms)
    rounds, tail = divmod(per_sm, RESIDENT_PROGRAMS)
    partial = max(tail / RESIDENT_PROGRAMS, PARTIAL_ROUND_FLOOR) if tail else 0.0
    overhead = 1.0 + SPLIT_OVERHEAD if num_splits > 1 else 1.0
    return (rounds + partial) / num_splits * overhead


def _auto_splits(programs: int, max_seq_len: int, sms: int) -> int:
    by_length = max(1, math.ceil(max_seq_len / MIN_PARTITION_TOKENS))
    if programs > RESIDENT_PROGRAMS * sms:
        # More than one round: split when that evens out the last, partial round.
        counts = range(1, min(by_length, MAX_ROUND_SPLITS) + 1)
        return min(counts, key=lambda n: (round_cost(programs, n, sms), n))
    if programs >= UNSPLIT_PROGRAMS_PER_SM * sms:
        return 1
    wanted = math.ceil(PROGRAMS_PER_SM * sms / programs)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def plan_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    sms: int,
    num_splits: int | None = None,
) -> SplitPlan:
    """Partition the longest context so batch x kv_heads x splits fills the device (a
    batch that fills it unsplit is not split, one of more than a round of resident
    programs is split as `round_cost` models best); or into `num_splits` when given."""
    if num_splits is None:
        num_splits = _auto_splits(max(1, batch * num_kv_heads), max(1, max_seq_len), sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    partition = math.ceil(math.ceil(max(1, max_seq_len) / num_splits) / block_n) * block_n
    return SplitPlan(math.ceil(max(1, max_seq_len) / partition), partition)


class LaunchConfig(NamedTuple):
    block_n: int  # context tokens per KV tile
    num_warps: int
    num_stages: int


def default_launch(dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    """16-bit, head_dim <= 128: 16-token tiles (one pool block of 16) with 2 warps and 5
    stages. On an H100 3, 4 and 5 stages timed the same; on an H200 5 stages are 13%
    faster where one partition per sequence is walked (batch 96 x 1,150) and the same
    elsewhere (see docs/kernels.md). float32 and larger heads keep 32-token tiles with 8
    warps and 2 stages."""
    if dtype == torch.float32 or head_dim > 128:
        return LaunchConfig(32, 8, 2)
    return LaunchConfig(16, 2, 5)


def decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor,  # [B] int32, >= 1
    max_seq_len: int,  # host upper bound of seq_lens (sizes the split plan)
    scale: float,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim], q's dtype
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    counters: MergeCounters | None = None,
) -> torch.Tensor:  # [B, num_heads, head_dim]
    """Attention of each sequence's single query over its first seq_lens[b] pooled tokens.
    With `counters` a split plan merges its partitions inside the split kernel (one launch)."""
    check_tensor("q", q, 3, FLOAT_DTYPES, q.device)
    if out is None:
        out = torch.empty_like(q)
    default = default_launch(q.dtype, q.shape[2])
    launch = LaunchConfig(
        block_n or default.block_n,
        num_warps or default.num_warps,
        num_stages or default.num_stages,
    )
    prepared = PreparedDecode(
        q, kv_cache, block_tables, seq_lens, max_seq_len, scale, out, num_splits, launch, counters
    )
    return prepared(q, kv_cache, out)


def _check_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    out: torch.Tensor,
) -> None:
    """decode_attention's argument checks (ValueError with what to pass instead)."""
    device = q.device
    check_launchable(device)
    check_tensor("q", q, 3, FLOAT_DTYPES, device)
    check_tensor("kv_cache", kv_cache, 5, (q.dtype,), device)
    batch, num_heads, head_dim = q.shape
    _, two, block_size, num_kv_heads, _ = kv_cache.shape
    if two != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not match q {tuple(q.shape)}: "
            "expected [num_blocks, 2, block_size, num_kv_heads, head_dim]"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads}")
    check_tensor("block_tables", block_tables, 2, (torch.int32,), device, inner_contiguous=False)
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {batch} queries")
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device, inner_contiguous=False)
    check_shape("seq_lens", seq_lens, (batch,))
    if block_tables.shape[1] * block_size < max_seq_len:
        raise ValueError(
            f"block_tables holds {block_tables.shape[1]} blocks of {block_size} tokens, "
            f"fewer than max_seq_len={max_seq_len}"
        )
    check_tensor("out", out, 3, (q.dtype,), device)
    check_shape("out", out, q.shape)


def _layout(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> tuple:
    return (
        q.shape, q.stride(), q.dtype, q.device,
        kv_cache.shape, kv_cache.stride(), kv_cache.dtype,
        out.shape, out.stride(), out.dtype,
    )  # fmt: skip


class MergeCounters:
    """Arrival counters of the split kernel's fused merge, one int32 per (sequence, KV
    head): zeros, and every launch leaves them zeros (the partition that merges a group
    resets its counter). One buffer serves launches that run one after another (a step's
    layers, every decode graph, a mixed step's decode rows on the side stream, which joins
    before the next layer); kernels/backend.py keeps one per backend.

    `get(device, count)` gives a buffer of at least `count` counters, allocated outside a
    CUDA graph capture only (None during one when it would have to grow: that launch merges
    with the separate kernel). A buffer a graph captured stays alive with this object."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def get(self, device: torch.device, count: int) -> torch.Tensor | None:
        device = indexed_device(device)  # "cuda" is the tensors' "cuda:0": one buffer for both
        if self._buffers:
            latest = self._buffers[-1]
            if latest.device == device and latest.numel() >= count:
                return latest
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        size = max(count, 2 * self._buffers[-1].numel() if self._buffers else count)
        self._buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
        return self._buffers[-1]


class PreparedDecode:
    """One batch's decode attention, checked, planned and given its partition scratch once,
    then launched per layer: `prepared(q, kv_cache, out)` with each layer's own q rows, pool
    view and output rows, of the layout it was prepared with (a ValueError otherwise).
    A mixed step's layers share one (kernels/backend.py): the checks, the split plan and the
    kernels' arguments are not redone 32 times. The scratch is allocated on the stream
    current at construction and reused by every call, so calls must run on that stream.
    With `counters` a split plan's last partition of each group merges the partials
    (`MergeCounters`): one launch a layer instead of the split and the merge kernel."""

    def __init__(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        scale: float,
        out: torch.Tensor,
        num_splits: int | None = None,
        launch: LaunchConfig | None = None,
        counters: MergeCounters | None = None,
    ) -> None:
        _check_decode(q, kv_cache, block_tables, seq_lens, max_seq_len, out)
        batch, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[3]
        block_n, num_warps, num_stages = launch or default_launch(q.dtype, head_dim)
        check_tile("block_n", block_n)
        self._layout = _layout(q, kv_cache, out)
        self._batch = batch
        device = q.device
        plan = plan_splits(batch, num_kv_heads, max_seq_len, block_n, num_sms(device), num_splits)
        single = plan.num_splits == 1
        parts = 1 if single else plan.num_splits
        acc = torch.empty(batch, num_heads, parts, head_dim, dtype=torch.float32, device=device)
        m = torch.empty(batch, num_heads, parts, dtype=torch.float32, device=device)
        l_sum = torch.empty_like(m)
        self._grid = (batch, num_kv_heads, plan.num_splits)
        counts = None
        if counters is not None and not single:
            counts = counters.get(device, batch * num_kv_heads)
        # The split kernel and the separate merge must cut partitions alike.
        min_tiles = min_walk_tiles(block_n)
        self._args = _split_args(
            q, kv_cache, block_tables, seq_lens, out, acc, m, l_sum, scale, block_n, min_tiles,
            single,
        )  # fmt: skip
        self._args.update(
            counters_ptr=acc if counts is None else counts,  # not read unless FUSED_MERGE
            FUSED_MERGE=counts is not None,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        self._merge = None
        if not single and counts is None:
            self._merge = prepare_merge(acc, m, l_sum, seq_lens, out, block_n, min_tiles)

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if _layout(q, kv_cache, out) != self._layout:
            raise ValueError(
                "PreparedDecode called with q, kv_cache or out of another shape, stride, "
                "dtype or device than it was prepared with: prepare one for this batch"
            )
        if self._batch:
            _decode_split_kernel[self._grid](q_ptr=q, kv_ptr=kv_cache, out_ptr=out, **self._args)
            if self._merge is not None:
                self._merge(out)
        return out


def _split_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    part_acc: torch.Tensor,
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    scale: float,
    block_n: int,
    min_tiles: int,
    single: bool,
) -> dict[str, object]:
    """The split kernel's arguments but q, the pool and the output (which a layer passes)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group_size = num_heads // kv_cache.shape[3]
    return dict(
        table_ptr=block_tables, seq_lens_ptr=seq_lens,
        part_acc_ptr=part_acc, part_m_ptr=part_m, part_l_ptr=part_l,
        qk_scale_log2=scale * LOG2E,
        stride_q_seq=q.stride(0), stride_q_head=q.stride(1), stride_q_dim=q.stride(2),
        stride_kv_block=kv_cache.stride(0), stride_kv_kv=kv_cache.stride(1),
        stride_kv_tok=kv_cache.stride(2), stride_kv_head=kv_cache.stride(3),
        stride_kv_dim=kv_cache.stride(4),
        stride_table_seq=block_tables.stride(0), stride_table_blk=block_tables.stride(1),
        stride_seq_lens=seq_lens.stride(0),
        stride_out_seq=out.stride(0), stride_out_head=out.stride(1), stride_out_dim=out.stride(2),
        stride_pacc_seq=part_acc.stride(0), stride_pacc_head=part_acc.stride(1),
        stride_pacc_split=part_acc.stride(2), stride_pacc_dim=part_acc.stride(3),
        stride_pml_seq=part_m.stride(0), stride_pml_head=part_m.stride(1),
        stride_pml_split=part_m.stride(2),
        GROUP_SIZE=group_size, HEAD_DIM=head_dim, BLOCK_G=next_pow2(group_size, 16),
        BLOCK_D=next_pow2(head_dim, 16), BLOCK_N=block_n, KV_BLOCK_SIZE=kv_cache.shape[2],
        MIN_TILES=min_tiles, IS_SINGLE_SPLIT=single,
        DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip


def decode_attention_reference(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:  # [B, num_heads, head_dim]
    """The torch backend's batched decode path on the same arguments."""
    batch = q.shape[0]
    lens = seq_lens.tolist()
    meta = AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=q.device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=q.device),
        seq_lens=seq_lens,
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=max_seq_len,
        query_lens_cpu=[1] * batch,
        seq_lens_cpu=lens,
    )
    return decode_batched(q, kv_cache, meta, scale)
