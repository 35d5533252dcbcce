"""Prefill of long fresh prompts with cuDNN's fused attention, over bucket-padded rows.

A fresh prompt (nothing cached before it) attends its own k/v rows causally. cuDNN's
fused attention (torch's `_scaled_dot_product_cudnn_attention`, query groups native) runs
it on Hopper at nearly twice the rate of torch's FlashAttention-2: on an H200 (Llama-3.1-8B
heads, one layer, `benchmarks/kernels.py`; docs/kernels.md) a 1,024-token prompt took 40
against 62 µs and a 4,096-token one 287 against 500 µs. cuDNN builds an execution plan per
shape (40 to 100 ms each, about 1 s for the first), so a prompt is attended at its length
rounded up to `BUCKET_ROWS`: the rows past it are read from the same buffer (the next
prompt's rows, a graph bucket's padding, or slack the buffer keeps for this) and their
outputs dropped. Causal masking keeps those rows out of every real row's output as long
as they are finite, which activations of this or an earlier step are. Prompts shorter
than `MIN_ROWS` (and the run they are in) stay on the flash path (`takes`). Each prompt is
a call of its own, about 40 µs of host time, which the step's other work hides: a step
that carries a 768-row prompt keeps the device busier than that on its GEMMs alone.
Where cuDNN's frontend built its ragged plans, a run takes one call for all its prompts
instead (kernels/cudnn_ragged.py); this module's call a prompt is the path without them.

Who calls what: `TritonPagedAttention` (kernels/backend.py) calls `prepare_buckets` once
with q/k/v views of the piecewise graphs' static buffer (engine/piecewise_graphs.py, at
start-up), which builds a plan for every bucket up to the buffer's rows. From then on, on
the first layer of a step with a run of fresh prompts that `takes` (kernels/prefill_runs.py),
it takes `padded_prompts` of that run (None when a padded prompt would run past its
buffer: the run then takes the flash path) and keeps them while the step's layers pass
the same q/k/v buffers; each layer calls `attend_prompts`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# Prompts are attended at their length rounded up to a multiple of this.
BUCKET_ROWS = 128
# The shortest prompt cuDNN attends (shorter ones: FlashAttention-2). Measured: 768
# tokens took 31 against 50 µs, 512 tokens 53 against 28.
MIN_ROWS = 768

# (q [1, H, L, D], k [1, KVH, L, D], v, scale) -> [1, H, L, D], causal.
DenseAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def cudnn_prefill_supported(device_type: str) -> bool:
    """cuDNN's fused attention can run here and was measured faster (CUDA, sm90+)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return (
        torch.backends.cudnn.is_available()
        and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        and torch.cuda.get_device_capability()[0] >= 9
    )


def takes(query_lens: list[int]) -> bool:
    """Whether fresh prompts of these lengths, attended together, take this path."""
    return bool(query_lens) and min(query_lens) >= MIN_ROWS


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of BUCKET_ROWS."""
    return -(-rows // BUCKET_ROWS) * BUCKET_ROWS


def buckets_up_to(max_rows: int) -> list[int]:
    """Every bucket a prompt of MIN_ROWS to `max_rows` rows is attended at."""
    return list(range(bucket_rows(MIN_ROWS), bucket_rows(max_rows) + 1, BUCKET_ROWS))


def padded_rows(x: torch.Tensor, start: int, rows: int) -> torch.Tensor | None:
    """x[start:start + rows] (x: [T, heads, head_dim], rows of one stride), read from x's
    storage also where that runs past x's own T rows; None when the storage ends first."""
    row_stride = x.stride(0)
    offset = x.storage_offset() + start * row_stride
    last = offset + (rows - 1) * row_stride + (x.shape[1] - 1) * x.stride(1) + x.shape[2]
    if last * x.element_size() > x.untyped_storage().nbytes():
        return None
    return x.as_strided((rows, *x.shape[1:]), x.stride(), offset)


def cudnn_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """cuDNN's causal fused attention over one padded prompt."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True, False, scale=scale
    )[0]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0).transpose(1, 2)  # [L, heads, D] -> [1, heads, L, D]


# One prompt's q, k and v at its bucket's length, heads first: [1, heads, bucket, head_dim].
PaddedPrompt = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def padded_prompts(
    q: torch.Tensor,  # [T, num_heads, head_dim]: the prefill rows, then any padding
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    query_lens: list[int],  # [B] host copy
) -> list[PaddedPrompt] | None:
    """Each fresh sequence's rows at its bucket's length (views, no copy); None when one
    of them would run past the buffer."""
    prompts = []
    start = 0
    for rows in query_lens:
        padded = bucket_rows(rows)
        views = [padded_rows(x, start, padded) for x in (q, k, v)]
        if views[0] is None or views[1] is None or views[2] is None:
            return None
        prompts.append((_heads_first(views[0]), _heads_first(views[1]), _heads_first(views[2])))
        start += rows
    return prompts


def attend_prompts(
    prompts: list[PaddedPrompt],
    query_lens: list[int],
    scale: float,
    out: torch.Tensor,  # [T, num_heads, head_dim]: rows past the sequences are zeroed
    attend: DenseAttend = cudnn_attend,
) -> None:
    """Causal attention of each padded prompt, its real rows written into `out`."""
    start = 0
    for (q, k, v), rows in zip(prompts, query_lens, strict=True):
        result = attend(q, k, v, scale)  # [1, heads, bucket, head_dim]
        out[start : start + rows].copy_(result[0, :, :rows].transpose(0, 1))
        start += rows
    if start < out.shape[0]:
        out[start:].zero_()


def cudnn_fresh_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_lens: list[int],
    scale: float,
    out: torch.Tensor,
    attend: DenseAttend = cudnn_attend,
) -> bool:
    """`padded_prompts` then `attend_prompts`: False (and nothing written) when a
    sequence's padded rows run past the buffer."""
    prompts = padded_prompts(q, k, v, query_lens)
    if prompts is None:
        return False
    attend_prompts(prompts, query_lens, scale, out, attend)
    return True


def prepare_buckets(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    max_rows: int,
    attend: DenseAttend = cudnn_attend,
) -> int:
    """Run `attend` once at every bucket of prompts up to `max_rows` rows that fits q's
    rows (views of a step buffer), so that the per-shape plans exist before the first step
    needs them; the count."""
    started = time.perf_counter()
    buckets = [b for b in buckets_up_to(max_rows) if b <= q.shape[0]]
    for rows in buckets:
        attend(_heads_first(q[:rows]), _heads_first(k[:rows]), _heads_first(v[:rows]), scale)
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)
    logger.info(
        "prepared cuDNN prefill attention for %d prompt lengths (%d..%d tokens) in %.1f s",
        len(buckets),
        buckets[0] if buckets else 0,
        buckets[-1] if buckets else 0,
        time.perf_counter() - started,
    )
    return len(buckets)
