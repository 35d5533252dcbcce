"""`TorchPagedAttention`: the plain-torch attention backend over the paged KV pool.

What the CPU runs, and the reference the Triton kernels are tested against. Per layer the
model calls `forward(q, k, v, kv_cache_layer, meta, scale[, out])`, which

1. stores the step's K/V rows into the pool at `meta.slot_mapping` (slot -1 is skipped);
2. attends: each sequence's queries over its first `seq_lens[b]` context tokens, gathered
   through its block table, causally, with grouped-query heads. Scores, softmax and the
   weighted sum run in float32 (float64 for float64 inputs); the output has q's dtype.

An all-decode batch (one query per sequence) of similar lengths runs as one padded batched
gather; ragged lengths, and anything with a prefill chunk, run sequence by sequence (a
whole prompt through torch's fused causal `scaled_dot_product_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.attention import AttentionMetadata


def store_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[:, 0][blocks, offsets] = k[valid].to(kv_cache.dtype)
    kv_cache[:, 1][blocks, offsets] = v[valid].to(kv_cache.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gather_context(
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32, -1 padded
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # K, V: [seq_len, kv_heads, head_dim]
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    table = block_table[:num_blocks].long()
    # K and V gathered apart: each comes out contiguous, so the reshapes copy nothing.
    k = kv_cache[table, 0].reshape(-1, *kv_cache.shape[-2:])[:seq_len]
    v = kv_cache[table, 1].reshape(-1, *kv_cache.shape[-2:])[:seq_len]
    return k, v


def _prefill_one(
    q: torch.Tensor,  # [query_len, heads, head_dim]
    k: torch.Tensor,  # [seq_len, kv_heads, head_dim]
    v: torch.Tensor,  # [seq_len, kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [query_len, heads, head_dim]
    query_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[:2]
    acc = _acc_dtype(q.dtype)
    if query_len == seq_len > 1:  # a whole prompt: torch's fused causal kernel
        qh, kh, vh = (t.to(acc).transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(0, 1).to(q.dtype)
    qg = q.to(acc).reshape(query_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", qg, k.to(acc)) * scale
    if query_len > 1:
        # Query row i sits at position seq_len - query_len + i and sees keys up to it (the
        # one query of a decode step sees every key).
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.to(acc))
    return out.reshape(query_len, num_heads, head_dim).to(q.dtype)


def decode_batched(
    q: torch.Tensor,  # [B, heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [B, heads, head_dim]
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    max_blocks = -(-meta.max_seq_len // block_size)
    # Padding entries (-1) read block 0; the length mask hides them.
    tables = meta.block_tables[:, :max_blocks].long().clamp(min=0)
    # [B, max_blocks, block_size, kv_heads, head_dim] each, contiguous: the reshapes are views.
    k = kv_cache[tables, 0].reshape(batch, max_blocks * block_size, num_kv_heads, head_dim)
    v = kv_cache[tables, 1].reshape(batch, max_blocks * block_size, num_kv_heads, head_dim)
    k_pos = torch.arange(max_blocks * block_size, device=q.device)
    hidden = k_pos[None, :] >= meta.seq_lens.to(q.device).long()[:, None]  # [B, S]
    # Slots past a sequence's length hold stale (even non-finite) data: zero them, so
    # that 0 * NaN never reaches the output.
    k = k.masked_fill(hidden[:, :, None, None], 0)
    v = v.masked_fill(hidden[:, :, None, None], 0)
    acc = _acc_dtype(q.dtype)
    qg = q.to(acc).reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bkhd->bhgk", qg, k.to(acc)) * scale
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgk,bkhd->bhgd", probs, v.to(acc))
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def _padding_pays(meta: AttentionMetadata) -> bool:
    """Whether one padded batch beats a loop: it reads every sequence at the longest one's
    length, so with ragged lengths (a 1,500-token context beside 20-token ones) the loop
    reads far fewer keys."""
    lens = meta.seq_lens_cpu
    return len(lens) * max(lens, default=0) <= 2 * sum(lens)


class TorchPagedAttention:
    """AttentionBackend in plain torch (see the module docstring)."""

    def prepare(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_rows: int
    ) -> None:
        """Nothing to set up: every shape runs as it comes."""

    def prefill_runs(self) -> dict[str, int]:
        """One path for every sequence: nothing to count."""
        return {}

    def store(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """The rows' K/V into one layer's pool view at `slot_mapping` (-1 skipped)."""
        store_kv(k, v, kv_cache, slot_mapping)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [T, num_heads, head_dim]
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]}")
        if not meta.kv_stored:
            self.store(k, v, kv_cache, meta.slot_mapping)
        if meta.is_all_decode and q.shape[0] == meta.num_seqs and _padding_pays(meta):
            result = decode_batched(q, kv_cache, meta, scale)
            return result if out is None else out.copy_(result)
        if out is None:
            out = torch.empty_like(q)
        start = 0
        for b, (query_len, seq_len) in enumerate(
            zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)
        ):
            if query_len == 0:
                continue
            k_ctx, v_ctx = gather_context(kv_cache, meta.block_tables[b], seq_len)
            out[start : start + query_len] = _prefill_one(
                q[start : start + query_len], k_ctx, v_ctx, scale
            )
            start += query_len
        return out
