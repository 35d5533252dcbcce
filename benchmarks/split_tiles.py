"""The prefill kernel's split launch (`prefill_attention(..., num_splits=)`,
kernels/prefill_split.py) at other tiles and warps than its defaults, against the unsplit
launch, on one chunk ending a long prompt at Llama-3.1-8B shapes: which configuration
does the same work fastest, and so how far the split plan's `MAX_FILL_FRACTION` could go.

    python -m splitserve.benchmarks.split_tiles --out split_tiles.json \
        [--rests 32,128,512 --context 4096 --configs 64x64x8,64x64x4 --splits 2,4,9]

For each chunk of `--rests` rows over a `--context`-token prompt (32 query heads, 8 KV
heads, head_dim 128, bf16, 16-token blocks in a shuffled pool): the unsplit launch at its
defaults, then each `--configs` entry (BLOCK_M x BLOCK_N x warps) at each `--splits`
count; each launch's device time (`triton.testing.do_bench`, median) and its largest
difference from the unsplit output. `--smoke` runs tiny float32 shapes on the CPU under
the Triton interpreter (TRITON_INTERPRET=1 set before this module imports triton), timing
one host call after one untimed (`benchmarks/kernels.py`'s `Timer`): a check of the
script, not a figure.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Any

import torch

from splitserve.benchmarks.arg_types import positive_ints
from splitserve.benchmarks.kernels import Timer
from splitserve.benchmarks.results_io import provenance, write_result

logger = logging.getLogger(__name__)
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SMOKE_HEADS, SMOKE_KV_HEADS, SMOKE_HEAD_DIM = 4, 1, 32


def _configs(text: str) -> list[tuple[int, int, int]]:
    configs = []
    for item in text.split(","):
        m, n, w = (int(x) for x in item.split("x"))
        configs.append((m, n, w))
    return configs


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from splitserve.kernels.prefill_attention import prefill_attention
    from splitserve.kernels.store_kv import store_kv
    from splitserve.kernels.testing import make_paged_batch

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    heads, kv_heads, head_dim = (
        (SMOKE_HEADS, SMOKE_KV_HEADS, SMOKE_HEAD_DIM) if smoke else (HEADS, KV_HEADS, HEAD_DIM)
    )
    timed = Timer(smoke)
    rows: list[dict[str, Any]] = []
    for rest in args.rests:
        batch = make_paged_batch(
            [(args.context - rest, rest)], heads, kv_heads, head_dim, BLOCK_SIZE, dtype, device
        )
        store_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
        meta = batch.meta
        call_args = (
            batch.q, batch.kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            rest, head_dim**-0.5,
        )  # fmt: skip
        want = prefill_attention(*call_args)
        launches: list[tuple[int | None, int | None, int | None, int]] = [(None, None, None, 1)]
        launches += [(m, n, w, s) for m, n, w in args.configs for s in args.splits]
        for block_m, block_n, warps, splits in launches:
            out = torch.empty_like(batch.q)
            launch = functools.partial(
                prefill_attention, *call_args, out=out, block_m=block_m, block_n=block_n,
                num_warps=warps, num_splits=splits,
            )  # fmt: skip
            us = timed(launch) * 1e3
            err = (out.float() - want.float()).abs().max().item()
            row = dict(
                rest=rest, context=args.context, block_m=block_m, block_n=block_n,
                num_warps=warps, num_splits=splits, us=round(us, 2), max_abs_diff=err,
            )  # fmt: skip
            logger.info("%s", row)
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rests", type=positive_ints, default=[32, 128, 512], help="rows of each chunk")
    p.add_argument("--context", type=int, default=4096, help="tokens of the chunk's prompt")
    p.add_argument("--configs", type=_configs, default=[(64, 64, 8), (64, 64, 4)],
                   help="split launches as BLOCK_MxBLOCK_NxWARPS, comma-separated")  # fmt: skip
    p.add_argument("--splits", type=positive_ints, default=[2, 4, 9], help="split counts to time")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args(argv)
    if not args.rests or min(args.rests) < 1 or args.context <= max(args.rests):
        p.error("--rests must be >= 1 and below --context")
    if not args.splits or min(args.splits) < 2:
        p.error("--splits must be >= 2 (1 is the unsplit launch, always timed)")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    result = {**provenance(device), "args": vars(args), "rows": measure(args)}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
