"""Prefill of fresh chunks (no cached context) with the flash-attention kernel torch ships.

A chunk that starts its sequence (nothing cached before it, so its context is exactly its
own new rows) needs no paged read: its keys and values are the layer's `k` and `v` rows.
torch's varlen flash-attention forward (`aten._flash_attention_forward`, FlashAttention-2:
CUDA, sm80 or newer, fp16/bf16, grouped-query heads native) attends them without the
block-table gather. Measured on an H200 (Llama-3.1-8B, one layer, store and attend;
docs/kernels.md): one 4,096-token prompt 533 against 640 µs with the Triton kernel; at
1,024-token prompts the two tie.

`plan_runs` (kernels/prefill_runs.py) asks `is_fresh` of each prefill sequence of a step,
with its host lengths; `TritonPagedAttention` (kernels/backend.py) calls
`fresh_prefill_attention` for each run of fresh sequences that cuDNN does not take. The
registry turns the path on where `flash_prefill_supported` holds. Rows past the prefill
sequences (padding of a piecewise-graph bucket) are not attended; padding sequences (slot
-1, an empty block table) exist only in all-decode batches, which never reach this path.
"""

from __future__ import annotations

import torch

# The dtypes the flash kernel takes.
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_prefill_supported(device_type: str) -> bool:
    """torch's flash-attention kernel can run on this device (CUDA, compute 8.0+)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return bool(torch.backends.cuda.is_flash_attention_available()) and (
        torch.cuda.get_device_capability()[0] >= 8
    )


def is_fresh(query_len: int, seq_len: int) -> bool:
    """The sequence's context is its new rows alone (none cached before this step)."""
    return query_len == seq_len > 0


def fresh_prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]: the prefill rows, then any padding
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [B + 1] int32, from 0
    query_lens: list[int],  # [B] host copy
    scale: float,
    out: torch.Tensor,  # [T, num_heads, head_dim]: the rows past the sequences are zeroed
) -> None:
    """Causal attention of each fresh sequence over its own rows, written into `out`."""
    rows = sum(query_lens)
    result = torch.ops.aten._flash_attention_forward(
        q[:rows],
        k[:rows],
        v[:rows],
        query_start_loc,
        query_start_loc,
        max(query_lens),
        max(query_lens),
        0.0,  # dropout
        True,  # causal
        False,  # return_debug_mask
        scale=scale,
    )[0]
    out[:rows].copy_(result)
    out[rows:].zero_()
