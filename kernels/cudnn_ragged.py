"""A run of long fresh prompts attended by cuDNN's fused attention in one ragged call.

`kernels/cudnn_prefill.py` gives cuDNN one call a prompt: one 1,024-token prompt (8 row
tiles of 32 heads) leaves part of the device idle through its tail, and the calls of a
run follow one another. cuDNN's ragged layout (torch's `_cudnn_attention_forward` with
cumulative sequence starts, the call behind nested tensors) takes the whole run at once,
each prompt's rows where the step put them: one launch whose tiles fill the device.

cuDNN builds a plan per call shape, keyed on the tensors' sizes and strides, the number of
sequences and the longest one. So that steps reuse the plans built at start-up:
- q/k/v are views of the same rows of the step buffer every step (`RaggedRows`, all its
  rows from the first), and the run's starts are offsets into them;
- the longest sequence is rounded up to a power of two (`ragged_bucket`): a prompt of
  1,100 rows is attended in a call planned for 2,048, whose tiles past its rows end at once;
- `prepare_ragged` builds the plan of every (sequences, bucket) pair a step buffer can
  hold, and checks that a second call finds it (a torch build that rebuilds the plan on
  every call would cost tens of ms a layer: the run then keeps one call a prompt).

Who calls what: `TritonPagedAttention` (kernels/backend.py) calls `prepare_ragged` once
with q/k/v views of the piecewise graphs' static buffer (engine/piecewise_graphs.py, at
start-up) and keeps the `RaggedRows` it returns. On a step with a run of fresh prompts on
cuDNN, it calls `run_starts` on the run's first layer (kept while the step's layers pass
the same buffers) and `attend_ragged` on every layer.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from splitserve.kernels import cudnn_prefill

logger = logging.getLogger(__name__)

# The smallest bucket: the longest prompt of a run is rounded up to a power of two of at
# least this many rows.
MIN_BUCKET = 1024
# A second call of a prepared plan slower than this (ms) means the build rebuilds plans.
CACHED_CALL_MS = 5.0


def ragged_supported() -> bool:
    """This torch has cuDNN's ragged attention call."""
    return hasattr(torch.ops.aten, "_cudnn_attention_forward")


def ragged_bucket(longest: int) -> int:
    """The planned longest sequence for a run whose longest prompt has `longest` rows."""
    return max(MIN_BUCKET, 1 << (longest - 1).bit_length())


def max_sequences(bucket: int, rows: int) -> int:
    """The most prompts a run with this bucket fits in `rows`: its longest prompt over half
    the bucket (at the smallest bucket, cuDNN's shortest), the others cuDNN's shortest."""
    least = cudnn_prefill.MIN_ROWS
    longest = max(least, bucket // 2 + 1) if bucket > MIN_BUCKET else least
    return 0 if longest > rows else 1 + (rows - longest) // least


class RaggedRows(NamedTuple):
    """q/k/v over every row of the step buffer from its first ([R, heads, head_dim]):
    the same sizes and strides every step, so that the plans built at start-up serve."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    plans: frozenset[tuple[int, int]]  # (sequences, bucket) pairs with a plan

    def first_row(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int | None:
        """The row of these buffers that q/k/v's first row is (one for all three), or None
        when they are not row slices of them."""
        rows = []
        for part, whole in ((q, self.q), (k, self.k), (v, self.v)):
            same = part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            if not same or part.stride() != whole.stride():
                return None
            row, rest = divmod(
                int(part.storage_offset()) - int(whole.storage_offset()), whole.stride(0)
            )
            if rest or row < 0 or row + part.shape[0] > whole.shape[0]:
                return None
            rows.append(row)
        return rows[0] if rows[0] == rows[1] == rows[2] else None


def run_starts(starts: torch.Tensor, first_row: int) -> torch.Tensor:
    """The run's cumulative starts ([B + 1], from 0, on the device) as rows of the buffers."""
    return (starts + first_row).to(torch.int32)


def attend_ragged(
    rows: RaggedRows,
    starts: torch.Tensor,  # [B + 1] int32, rows of `rows`' buffers (`run_starts`)
    bucket: int,
    scale: float,
) -> torch.Tensor:  # [R, heads, head_dim]: each prompt's rows where they are, the rest unset
    """Causal attention of each prompt over its own rows, one call."""
    return torch.ops.aten._cudnn_attention_forward(
        rows.q, rows.k, rows.v, None, starts, starts, bucket, bucket, False, 0.0, True, False,
        scale=scale,
    )[0]  # fmt: skip


def _timed_call(rows: RaggedRows, sequences: int, bucket: int, scale: float) -> float:
    """ms of one call over `sequences` prompts of cuDNN's shortest (synchronized)."""
    lens = [0] + [cudnn_prefill.MIN_ROWS] * sequences
    starts = torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    starts = starts.to(rows.q.device)
    started = time.perf_counter()
    attend_ragged(rows, starts, bucket, scale)
    if rows.q.device.type == "cuda":
        torch.cuda.synchronize(rows.q.device)
    return (time.perf_counter() - started) * 1e3


def prepare_ragged(
    q: torch.Tensor,  # [R, num_heads, head_dim]: the step buffer's rows
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    max_rows: int,
) -> RaggedRows | None:
    """Build the plan of every (sequences, bucket) pair a run of up to `max_rows` rows can
    take; None when a second call of a built plan is slow (the plans are not kept)."""
    started = time.perf_counter()
    base = RaggedRows(q, k, v, frozenset())
    pairs = []
    bucket = MIN_BUCKET
    while bucket // 2 < min(max_rows, q.shape[0]):
        count = max_sequences(bucket, min(max_rows, q.shape[0]))
        pairs += [(n, bucket) for n in range(1, count + 1)]
        bucket *= 2
    if not pairs:
        return None
    for n, b in pairs:
        _timed_call(base, n, b, scale)
    again = _timed_call(base, *pairs[0], scale)
    if again > CACHED_CALL_MS:
        logger.warning(
            "cuDNN's ragged attention took %.1f ms on a second call of a built plan: this "
            "torch rebuilds its plans, so runs of prompts keep one cuDNN call a prompt",
            again,
        )
        return None
    logger.info(
        "prepared cuDNN ragged attention for %d (prompts, bucket) shapes in %.1f s",
        len(pairs),
        time.perf_counter() - started,
    )
    return base._replace(plans=frozenset(pairs))
