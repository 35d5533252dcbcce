"""The decode kernel's time by split count, beside the split plan's choice.

    python -m splitserve.benchmarks.split_plan --ctx 1150 --batches 24,48,56,64,160 \
        --out split_plan.json

For every context length and batch, `decode_attention` runs with each split count in
`--splits` (and the plan's own choice, `plan_splits` with the decode graphs' context
limit), each captured in a CUDA graph of `CALLS_PER_GRAPH` calls that rotate over input
sets overflowing L2 four times (benchmarks/kernels.py) and replayed: the launch cost is
out of the timing, as in a decode graph. The median of `REPEATS` timed replays gives each
call's µs; `plan_vs_best` is the plan's time over the fastest count's. Split plans merge
inside the split kernel, as served (`--fused-decode-merge`); `--separate-merge` times
them with the merge kernel instead. On the CPU (`--smoke`) the calls run once each,
untimed, to check the script.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from typing import Any

import torch

from splitserve.benchmarks.arg_types import positive_ints
from splitserve.benchmarks.kernels import HEAD_DIM, KV_HEADS, _paged_sets
from splitserve.benchmarks.results_io import provenance, write_result

logger = logging.getLogger(__name__)

CALLS_PER_GRAPH = 20
REPEATS = 7
REPLAYS_PER_REPEAT = 5
GRAPH_MAX_SEQ_LEN = 8192  # the decode graphs' default context limit (engine/config.py)


def _time_graph(run: Any) -> float:
    """µs per call of `run` (CALLS_PER_GRAPH calls), graph-captured and replayed."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(REPLAYS_PER_REPEAT):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (REPLAYS_PER_REPEAT * CALLS_PER_GRAPH))
    return statistics.median(times)


def bench_case(
    ctx: int, batch: int, splits: list[int], device: torch.device, fused: bool = True
) -> dict[str, Any]:
    from splitserve.kernels.checks import num_sms
    from splitserve.kernels.decode_attention import MergeCounters, decode_attention, plan_splits

    kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
    sets = _paged_sets([(ctx - 1, 1)] * batch, kv_bytes, device)
    outs = [torch.empty_like(pb.q) for pb in sets]
    plan = plan_splits(batch, KV_HEADS, GRAPH_MAX_SEQ_LEN, 16, num_sms(device)).num_splits
    counters = MergeCounters() if fused else None  # filled outside capture (the first run)

    def run(num_splits: int) -> None:
        for i in range(CALLS_PER_GRAPH if device.type == "cuda" else 1):
            pb = sets[i % len(sets)]
            meta = pb.meta
            decode_attention(
                pb.q, pb.kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len,
                HEAD_DIM**-0.5, out=outs[i % len(sets)], num_splits=num_splits,
                counters=counters,
            )  # fmt: skip

    counts = sorted({*splits, plan})
    if device.type != "cuda":  # --smoke: each count runs once, untimed
        for n in counts:
            run(n)
        return {"ctx": ctx, "batch": batch, "plan": plan, "ran": counts, "fused_merge": fused}
    us = {n: _time_graph(lambda n=n: run(n)) for n in counts}
    best = min(us, key=lambda n: us[n])
    logger.info(
        "ctx %d batch %d: plan %d (%.1f us), best %d (%.1f us)", ctx, batch, plan, us[plan],
        best, us[best],
    )  # fmt: skip
    return {
        "ctx": ctx, "batch": batch, "plan": plan, "best": best, "us": us,
        "plan_vs_best": us[plan] / us[best], "fused_merge": fused,
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ctx", type=positive_ints, default=[1150], help="context lengths, comma-separated"
    )
    p.add_argument(
        "--batches", type=positive_ints, default=[24, 48, 56, 64, 96, 128, 160, 192, 256]
    )
    p.add_argument("--splits", type=positive_ints, default=[1, 2, 3, 4, 5, 6, 8])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="run each call once, untimed")
    p.add_argument(
        "--separate-merge", action="store_true",
        help="merge split plans with the separate kernel (default: inside the split kernel)",
    )  # fmt: skip
    p.add_argument("--out", help="write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("split_plan times CUDA graphs: run it on a GPU, or with --smoke")
    fused = not args.separate_merge
    rows = [bench_case(c, b, args.splits, device, fused) for c in args.ctx for b in args.batches]
    write_result(args.out, {**provenance(args.device), "rows": rows})


if __name__ == "__main__":
    main()
