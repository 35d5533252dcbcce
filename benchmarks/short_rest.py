"""One layer of a mixed step whose prefill part is the short rest of a long prompt, on the
Triton backend with the rest on the prefill kernel (`--short-rest-rows 0`), on the
decode kernel a row at a time (kernels/prefill_runs.py, ROWS) and on the prefill kernel
with its context split across programs (`split_context_prefill`, kernels/prefill_split.py),
at Llama-3.1-8B shapes.

    python -m splitserve.benchmarks.short_rest --out short_rest.json

The step: `--decodes` requests decoding at `--decode-context` tokens, then `--rests`
chunks of `--rest` rows each ending a `--context`-token prompt (the default: the 12-row
rest that two 4,096-token prompts beside 12 decode rows leave at a budget of 8,192
tokens). 32 query heads, 8 KV heads, head_dim 128, bf16, 16-token blocks in a shuffled
pool. Each path's output is checked against the torch backend's, then one layer's
`forward` (the attention of the decode rows and the rest, as a mixed step runs it, the
decode rows on the side stream) is timed with CUDA events around `--reps` calls queued
while the device is held back (so the host's launches are not timed), after warm-up,
median of `--trials` trials. A CUDA device only.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from typing import Any

import torch

from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.launch_probes import CudaHold

logger = logging.getLogger(__name__)
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
# How long the device is held before each trial: longer than the host takes to queue a
# trial's calls (about 0.4 ms each).
HOLD_MS = 100.0


def _time_forward(attention: Any, batch: Any, meta: Any, reps: int, trials: int) -> float:
    """Median over `trials` of the mean device time of one `forward`, µs."""
    scale = HEAD_DIM**-0.5
    args = (batch.q, batch.k, batch.v, batch.kv_cache, meta, scale)
    for _ in range(5):
        attention.forward(*args)
    hold = CudaHold(torch)
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Hold the device while the host queues every call, so that the events time the
        # device's work and not the host's launches.
        hold.hold(HOLD_MS)
        start.record()
        for _ in range(reps):
            attention.forward(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from splitserve.kernels.attention_torch import TorchPagedAttention
    from splitserve.kernels.backend import TritonPagedAttention
    from splitserve.kernels.testing import make_paged_batch

    device = torch.device("cuda")
    cases = [(args.decode_context - 1, 1)] * args.decodes
    cases += [(args.context - args.rest, args.rest)] * args.rests
    batch = make_paged_batch(
        cases, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.bfloat16, device, seed=3
    )
    meta = dataclasses.replace(batch.meta, num_decodes=args.decodes)
    ref = TorchPagedAttention().forward(
        batch.q, batch.k, batch.v, batch.pool[:, 1].clone(), batch.meta, HEAD_DIM**-0.5
    )
    rows = batch.num_seq_rows
    result: dict[str, Any] = {}
    paths = (
        ("prefill_kernel", 0, False),
        ("decode_kernel_rows", args.rest, False),
        ("prefill_kernel_split", 0, True),
    )
    for name, rest_rows, split in paths:
        attention = TritonPagedAttention(
            overlap_decode_rows=True, fused_decode_merge=True, short_rest_rows=rest_rows,
            split_context_prefill=split,
        )  # fmt: skip
        out = attention.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta, HEAD_DIM**-0.5)
        err = (out[:rows].float() - ref[:rows].float()).abs().max().item()
        us = _time_forward(attention, batch, meta, args.reps, args.trials)
        runs = {kind: n for kind, n in attention.prefill_runs().items() if n}
        splits = attention.context_splits()
        result[name] = {
            "layer_us": round(us, 2), "max_abs_diff": err, "runs": runs, "context_splits": splits
        }  # fmt: skip
        logger.info("%s: %.1f µs a layer (largest difference %.4f)", name, us, err)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decodes", type=int, default=12)
    p.add_argument("--decode-context", type=int, default=4200)
    p.add_argument("--rests", type=int, default=1)
    p.add_argument("--rest", type=int, default=12, help="rows of each rest")
    p.add_argument("--context", type=int, default=4096, help="tokens of each rest's prompt")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args(argv)
    if min(args.decodes, args.rests, args.rest, args.reps, args.trials) < 1:
        p.error("--decodes, --rests, --rest, --reps and --trials must be >= 1")
    if args.context <= args.rest or args.decode_context < 2:
        p.error("--context must exceed --rest, and --decode-context must be at least 2")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = {**provenance("cuda"), "args": vars(args), **measure(args)}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
