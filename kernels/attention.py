"""Attention backend interface and the flattened batch metadata it reads.

A step's batch is flattened: the new tokens of every scheduled sequence are concatenated
into one row dimension T (sequence b owns rows query_start_loc[b]:query_start_loc[b+1]).
A backend first stores the rows' K/V into the paged pool at `slot_mapping` (unless
`kv_stored`: the caller stored them already, with the backend's `store` or in the same
layout), then computes attention of each sequence's queries over its whole context: the
blocks in its block table up to seq_lens[b] tokens, causally (query row i of sequence b
sits at position seq_lens[b] - query_len_b + i). The model stores each layer's K/V with
its rotary before attention (engine/model/layers.py: one kernel on the Triton backend,
kernels/rotary_store.py; inside the captured piece with piecewise graphs), and attends
with `kv_stored`.

Implementations: `kernels/attention_torch.py` (plain torch, what the CPU runs) and the
Triton backend of `kernels/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    # [T] int64: pool slot (block_id * block_size + offset) of each new token; -1 skips it.
    slot_mapping: torch.Tensor
    # [B + 1] int32: cumulative query lengths.
    query_start_loc: torch.Tensor
    # [B] int32: context length of each sequence after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # [B, max_blocks] int32: block ids per sequence, padded with -1 (never read).
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies, so CPU paths need no device-to-host sync.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Leading sequences with one query row each (decode rows): a backend may run them with
    # its decode kernel and the rest with its prefill kernel. 0 when unknown.
    num_decodes: int = 0
    # The rows' K/V are in the pool already (the caller stored them): forward only attends.
    kv_stored: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Stores new K/V into one layer's pool view (unless `meta.kv_stored`), then attends:
    into `out` when given (a caller's static buffer), else into a new tensor."""

    def store(
        self,
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    ) -> None:
        """Write the rows' K/V into one layer's pool view at `slot_mapping`."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [T, num_heads, head_dim]: written, and returned
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...

    def prepare(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_rows: int
    ) -> None:
        """Steps to come take q/k/v as row slices of these views (a static step buffer of
        at least `max_rows` rows): do any per-shape set-up now, at start-up."""
        ...

    def prefill_runs(self) -> dict[str, int]:
        """Prefill runs planned since start, by path (kernels/prefill_runs.py: one per step
        and run); empty for a backend with one path."""
        ...
