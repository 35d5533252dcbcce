"""Start-up warm-up: the model runs once over each kind of step a server meets, so that
every Triton kernel variant is compiled before the first request rather than while a
request waits (a compile takes from a fraction of a second to seconds).

Who calls what: `build_parts` calls `warm_up(model, kv_cache, block_size, limits, draw)` on
CUDA, after the decode CUDA graphs are captured (which compile the decode kernels at
their graph shapes) and before the engine takes requests. Each warm-up step runs eagerly,
writes nothing into the KV pool (every slot is -1), reads only block 0 (every block-table
entry is 0) and throws its logits away, after the sampler's fused draw (`draw`, the
kernel registry's, when there is one) has drawn from them: its kernels specialise on the
vocabulary only, so the first step compiles them.

The steps (`warmup_steps`):
- a one-row decode over a short context (one split) and over a long one (many splits);
- prefills whose token counts fall in each class that Triton specialises an integer
  argument on (1, a multiple of 16, any other);
- a mixed step, decode rows first and then a prefill chunk over cached context, as
  chunked prefill schedules them under load;
- a mixed step whose chunk is the short rest of a long prompt, which the Triton backend
  attends a row at a time with the decode kernel (`short_rest_rows`,
  kernels/prefill_runs.py);
- a mixed step whose chunk is longer than any such rest over a long context, which the
  prefill kernel attends (with `split_context_prefill`, its context split across programs:
  kernels/prefill_split.py).

The kernels leave their step-varying arguments unspecialised (block-table width, split
count, view alignment: `kernels/`), so these steps compile every variant a step can need.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch

from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.registry import DrawOp

logger = logging.getLogger(__name__)

# Context of the long-context decode row: enough tokens for the most decode splits.
_LONG_CONTEXT = 16384
# Rows of the short rest: below any `short_rest_rows` worth setting (its default is 16).
_SHORT_REST = 5
# Rows of a chunk over long context: above any `short_rest_rows` worth setting.
_LONG_REST = 40


class Row(NamedTuple):
    """One sequence of a warm-up step: `query_len` new tokens ending a `seq_len` context."""

    query_len: int
    seq_len: int


class WarmupLimits(NamedTuple):
    max_model_len: int
    max_num_batched_tokens: int


def warmup_steps(limits: WarmupLimits) -> list[list[Row]]:
    """The warm-up steps, each a list of rows with the decode rows (query_len 1) first,
    within the model's context and the step's token budget."""
    max_len, budget = limits.max_model_len, limits.max_num_batched_tokens
    long_context = min(max_len, _LONG_CONTEXT)
    steps = [[Row(1, min(16, max_len))], [Row(1, long_context)]]
    steps += [[Row(n, n)] for n in (16, 17) if n <= min(budget, max_len)]
    chunk = min(97, budget - 2, max_len - 1)
    if chunk >= 1:
        cached = min(32, max_len - chunk)
        steps.append([Row(1, min(64, max_len)), Row(1, long_context), Row(chunk, chunk + cached)])
    for rows in (_SHORT_REST, _LONG_REST):
        rest = min(rows, budget - 1, long_context - 1)
        if rest >= 1:
            steps.append([Row(1, min(64, max_len)), Row(rest, long_context)])
    return steps


def step_metadata(rows: list[Row], block_size: int, device: torch.device) -> AttentionMetadata:
    """Metadata of a warm-up step: no slot written, every block-table entry block 0."""
    query_lens = [r.query_len for r in rows]
    seq_lens = [r.seq_len for r in rows]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    return AttentionMetadata(
        slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(rows), max_blocks, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        num_decodes=sum(1 for n in query_lens if n == 1),
    )


@torch.inference_mode()
def run_step(
    model: Any, kv_cache: torch.Tensor, rows: list[Row], block_size: int, draw: DrawOp | None = None
) -> None:
    """One eager forward pass (and the logits of each row's last token) over `rows`, and a
    `draw` from those logits."""
    device = kv_cache.device
    meta = step_metadata(rows, block_size, device)
    positions = [p for r in rows for p in range(r.seq_len - r.query_len, r.seq_len)]
    ids = torch.zeros(len(positions), dtype=torch.int64, device=device)
    hidden = model(ids, torch.tensor(positions, device=device), kv_cache, meta)
    logits = model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
    if draw is not None:
        keys = torch.zeros(len(rows), dtype=torch.int64, device=device)
        draw(logits, torch.ones(len(rows), device=device), keys, keys)


def warm_up(
    model: Any,
    kv_cache: torch.Tensor,
    block_size: int,
    limits: WarmupLimits,
    draw: DrawOp | None = None,
) -> None:
    """Run every warm-up step (see the module docstring) and wait for the device."""
    started = time.perf_counter()
    steps = warmup_steps(limits)
    for rows in steps:
        run_step(model, kv_cache, rows, block_size, draw)
    if kv_cache.device.type == "cuda":
        torch.cuda.synchronize(kv_cache.device)
    logger.info(
        "warmed up %d step shapes (prefill, mixed, decode) in %.1f s",
        len(steps),
        time.perf_counter() - started,
    )
