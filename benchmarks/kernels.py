"""Kernel micro-benchmarks at Llama-3.1-8B shapes against the device's measured ceilings.

    python3 -m splitserve.benchmarks.kernels --out kernels.json
    python3 -m splitserve.benchmarks.kernels --summary kernels.json   # table of a result

Shapes: 32 query heads, 8 KV heads, head_dim 128, bfloat16, 16-token blocks, shuffled
block ids in a two-layer block-major pool (the kernels read the strided layer view).
Ceilings, measured in the same run: a device-to-device copy of 2 GiB (bytes read + bytes
written) and an 8192^3 bf16 matmul. Each case times the kernel with
`triton.testing.do_bench` (median; it also flushes L2 before every call) while rotating
over enough independent input sets to overflow L2 several times; with `--queued`, as the
calls' time on the device alone, queued back to back by the host behind a sleep kernel (a
call whose launches take the host longer than the device, as cuDNN's per prompt do, is
timed by do_bench at the host's pace, which a longer step around it hides).

Counted work: decode attention = KV bytes of every context token + q + out; prefill
attention = 4 * heads * head_dim FLOPs per causally visible (query, key) pair;
store_kv / rmsnorm / rotary = bytes read + written. Every decode case is also swept over
split counts and tile shapes, prefill over tile shapes (`config` of each row); on CUDA each
prefill case is also attended over the prompts' own k/v rows by the engine's two
fresh-prompt paths, torch's ragged FlashAttention-2 and cuDNN per bucket-padded prompt
(kernels/cudnn_prefill.py), with each one's largest difference from FlashAttention-2's
output, and with `--vllm-fa3` (under vLLM's environment) vLLM's FlashAttention-3 build,
what vLLM attends prompts with on Hopper. `--smoke` runs tiny
shapes once each, timed by the host clock (for checking the script without a GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from splitserve.benchmarks.results_io import provenance, write_result

logger = logging.getLogger(__name__)


def compile_errors() -> tuple[type[Exception], ...]:
    """What a launch config this device cannot run raises (recorded, not fatal)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return (CompilationError, OutOfResources)


HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, HIDDEN = 32, 8, 128, 16, 4096
DECODE_CASES = [(64, 4096), (1, 512), (256, 2048)]  # (batch, context tokens)
PREFILL_CASES = [(8, 2048)]  # (sequences, prompt tokens)
ELEMENTWISE_TOKENS = 8192
DECODE_SWEEP = [  # (num_splits, block_n, num_warps, num_stages); None: the wrapper's default
    (None, None, None, None), (1, None, None, None), (2, None, None, None),
    (4, None, None, None), (8, None, None, None), (16, None, None, None), (None, 16, 2, 4),
    (None, 16, 2, 5), (None, 16, 4, 3), (None, 32, 4, 3), (None, 32, 4, 4), (None, 32, 8, 3),
    (None, 64, 4, 3), (None, 64, 8, 2), (None, 128, 8, 2),
]  # fmt: skip
PREFILL_SWEEP = [  # (block_m, block_n, num_warps, num_stages); None: the wrapper's default
    (None, None, None, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2),
    (64, 128, 4, 2), (128, 32, 8, 3), (128, 128, 8, 2),
]  # fmt: skip


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'64x2048,1x512' -> [(64, 2048), (1, 512)]; an empty string -> []."""
    cases = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        left, sep, right = item.lower().partition("x")
        if not (sep and left.isdigit() and right.isdigit() and int(left) and int(right)):
            raise argparse.ArgumentTypeError(f"{item!r} is not NxM with positive integers")
        cases.append((int(left), int(right)))
    return cases


def _cases_text(cases: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}x{b}" for a, b in cases)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--summary", metavar="JSON", help="only print the table of a result file")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, host timing")
    p.add_argument("--no-sweep", action="store_true", help="skip the tuning sweeps")
    p.add_argument(
        "--queued", action="store_true",
        help="time each case's calls back to back, queued by the host ahead of the device "
        "(the device's time alone, as inside a longer step), instead of do_bench's one call "
        "after an L2 flush",
    )  # fmt: skip
    p.add_argument(
        "--decode-cases", type=parse_cases, default=_cases_text(DECODE_CASES),
        help="batch x context tokens, comma-separated (empty: none)",
    )  # fmt: skip
    p.add_argument(
        "--prefill-cases", type=parse_cases, default=_cases_text(PREFILL_CASES),
        help="sequences x prompt tokens, comma-separated (empty: none)",
    )  # fmt: skip
    p.add_argument(
        "--vllm-fa3", action="store_true",
        help="also time vLLM 0.26's FlashAttention-3 build on the fresh prompts, for "
        "comparison (run under vLLM's environment: source /tmp/site/vllm_env.sh)",
    )  # fmt: skip
    return p.parse_args(argv)


# --queued: calls timed back to back behind a device sleep, and how many times over.
QUEUED_CALLS, QUEUED_REPEATS = 20, 5


class Timer:
    """Median milliseconds of fn(): do_bench on CUDA, one host-timed call with --smoke;
    with `queued`, the device's time alone (`queued_ms`)."""

    def __init__(self, smoke: bool, queued: bool = False) -> None:
        self.smoke = smoke
        self.queued = queued

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.smoke:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        if self.queued:
            return statistics.median(queued_ms(fn) for _ in range(QUEUED_REPEATS))
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def queued_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds a call of fn() keeps the device busy when the host has queued it
    ahead, as in an engine step whose other work outlasts the host's launches: a sleep
    kernel holds the device while the host queues QUEUED_CALLS calls, and the events
    around the calls time the device alone. do_bench times each call after an L2 flush,
    so a call that takes the host longer than the device is timed at the host's pace."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(QUEUED_CALLS):
        fn()
    host_s = time.perf_counter() - started
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Twice the host's time at most 2 GHz of device clock: the device sleeps past the last launch.
    torch.cuda._sleep(int(2 * host_s * 2e9) + 1_000_000)
    begin.record()
    for _ in range(QUEUED_CALLS):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / QUEUED_CALLS


def rotating(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    state = {"i": 0}

    def step() -> Any:
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()

    return step


def num_sets(bytes_per_set: int, device: torch.device) -> int:
    """Input sets to rotate over so that together they overflow L2 four times."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(32, math.ceil(4 * l2 / max(1, bytes_per_set))))


def measure_ceilings(device: torch.device, timer: Timer, smoke: bool) -> dict[str, float]:
    numel = (1 << 16) if smoke else (1 << 30)  # 2 GiB of bf16
    src = torch.randn(numel, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(torch.bfloat16)
    mm_ms = timer(lambda: a @ b)
    return {
        "copy_gbps": 2 * src.numel() * 2 / copy_ms / 1e6,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
    }


def _row(case: str, ms: float, **extra: Any) -> dict[str, Any]:
    return {"case": case, "ms": ms, **extra}


def _paged_sets(cases: list[tuple[int, int]], kv_bytes: int, device: torch.device) -> list:
    """Independent paged batches (random pools, K/V of the new tokens stored) to rotate."""
    from splitserve.kernels.store_kv import store_kv
    from splitserve.kernels.testing import make_paged_batch

    sets = []
    for seed in range(num_sets(kv_bytes, device)):
        pb = make_paged_batch(
            cases, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.bfloat16, device, seed=seed,
            poison=False, spare_blocks=0,
        )  # fmt: skip
        store_kv(pb.k, pb.v, pb.kv_cache, pb.meta.slot_mapping)
        sets.append(pb)
    return sets


def _time_config(case: str, timer: Timer, calls: list, config: dict[str, Any]) -> tuple:
    """(ms, error): a launch config this device cannot compile or fit is recorded."""
    try:
        return timer(rotating(calls)), None
    except compile_errors() as exc:
        logger.warning("%s %s failed: %r", case, config, exc)
        return math.nan, repr(exc)


def bench_decode(batch: int, ctx: int, device, timer, sweep: bool) -> list[dict[str, Any]]:
    from splitserve.kernels.checks import num_sms
    from splitserve.kernels.decode_attention import (
        MergeCounters,
        decode_attention,
        default_launch,
        plan_splits,
    )

    kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
    qo_bytes = 2 * batch * HEADS * HEAD_DIM * 2
    sets = _paged_sets([(ctx - 1, 1)] * batch, kv_bytes, device)
    default = default_launch(torch.bfloat16, HEAD_DIM)
    rows = []
    for splits, block_n, warps, stages in DECODE_SWEEP if sweep else DECODE_SWEEP[:1]:
        block_n, warps = block_n or default.block_n, warps or default.num_warps
        stages = stages or default.num_stages
        plan = plan_splits(batch, KV_HEADS, ctx, block_n, num_sms(device), splits)
        split = plan.num_splits > 1
        launch = (splits, block_n, warps, stages)
        is_default = launch == (None, default.block_n, default.num_warps, default.num_stages)
        # A split plan twice: the separate merge kernel, then the merge inside the split.
        for fused in (False, True) if split else (False,):
            config = dict(
                num_splits=plan.num_splits, partition=plan.partition_size, block_n=block_n,
                num_warps=warps, num_stages=stages, fused_merge=fused,
                is_default=is_default and fused == split,
            )  # fmt: skip
            counters = MergeCounters() if fused else None
            calls = [
                lambda pb=pb, n=plan.num_splits, bn=block_n, w=warps, st=stages, c=counters: (
                    decode_attention(
                        pb.q, pb.kv_cache, pb.meta.block_tables, pb.meta.seq_lens,
                        pb.meta.max_seq_len, HEAD_DIM**-0.5, num_splits=n, block_n=bn,
                        num_warps=w, num_stages=st, counters=c,
                    )
                )
                for pb in sets
            ]  # fmt: skip
            case = f"decode b{batch} x {ctx}"
            ms, error = _time_config(case, timer, calls, config)
            rows.append(_row(case, ms, gbps=(kv_bytes + qo_bytes) / ms / 1e6, config=config))
            if error:
                rows[-1]["error"] = error
    return rows


def bench_prefill(
    seqs: int, length: int, device, timer, sweep: bool, fresh: tuple[str, ...]
) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from splitserve.kernels.prefill_attention import (
        default_num_warps,
        default_tiles,
        prefill_attention,
    )

    flops = seqs * 4 * HEADS * HEAD_DIM * length * (length + 1) / 2
    sets = _paged_sets([(0, length)] * seqs, seqs * length * KV_HEADS * HEAD_DIM * 4, device)
    default_m, default_n = default_tiles(torch.bfloat16, HEAD_DIM, device)
    rows = []
    for block_m, block_n, warps, stages in PREFILL_SWEEP if sweep else PREFILL_SWEEP[:1]:
        is_default = block_m is None
        block_m, block_n = block_m or default_m, block_n or default_n
        warps = warps or default_num_warps(block_m, torch.bfloat16)
        config = dict(
            block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
            is_default=is_default,
        )  # fmt: skip
        calls = [
            lambda pb=pb, bm=block_m, bn=block_n, w=warps, st=stages: prefill_attention(
                pb.q, pb.kv_cache, pb.meta.block_tables, pb.meta.seq_lens,
                pb.meta.query_start_loc, pb.meta.max_query_len, HEAD_DIM**-0.5, block_m=bm,
                block_n=bn, num_warps=w, num_stages=st,
            )
            for pb in sets
        ]  # fmt: skip
        case = f"prefill {seqs} x {length}"
        ms, error = _time_config(case, timer, calls, config)
        rows.append(_row(case, ms, tflops=flops / ms / 1e9, config=config))
        if error:
            rows[-1]["error"] = error
    if device.type == "cuda":
        rows += bench_fresh(sets, length, flops, timer, fresh)
    # Dense causal flash attention on contiguous q/k/v, for comparison (not paged).
    pb = sets[0]
    q = pb.q.view(seqs, length, HEADS, HEAD_DIM).transpose(1, 2)
    group = HEADS // KV_HEADS
    k = pb.k.view(seqs, length, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, 1)
    v = pb.v.view(seqs, length, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, 1)
    ms = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    rows.append(_row(f"torch sdpa {seqs} x {length}", ms, tflops=flops / ms / 1e9))
    return rows


# What attends fresh prompts over their own k/v rows in the engine: torch's ragged
# FlashAttention-2 (one packed [tokens, heads, head_dim] tensor and cumulative lengths)
# and cuDNN's fused attention per prompt at its bucket-padded length
# (kernels/cudnn_prefill.py), query groups native in both. (cuDNN's own ragged form,
# `_cudnn_attention_forward` with cumulative lengths, built a new plan on every call in
# torch 2.11: 45 to 68 ms a call on an H200.)
FRESH_KERNELS = ("flash", "cudnn")
# vLLM 0.26's FlashAttention-3 build (`vllm.vllm_flash_attn`), what vLLM attends prompts
# with on Hopper: timed beside the engine's paths with --vllm-fa3, never used by the engine.
VLLM_FA3 = "vllm_fa3"


def _with_slack(x: torch.Tensor) -> torch.Tensor:
    """x as the first rows of a buffer with a bucket of zero rows more, as the engine's
    step buffer has."""
    from splitserve.kernels.cudnn_prefill import BUCKET_ROWS

    return torch.cat([x, x.new_zeros(BUCKET_ROWS, *x.shape[1:])])[: x.shape[0]]


def _vllm_fa3_call(pb: Any, length: int) -> Callable[[], torch.Tensor]:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise RuntimeError(
            f"vLLM's FlashAttention-3 is not importable here ({exc}); run under vLLM's "
            "environment (source /tmp/site/vllm_env.sh) or leave out --vllm-fa3"
        ) from exc
    cum, scale = pb.meta.query_start_loc, HEAD_DIM**-0.5
    return lambda: flash_attn_varlen_func(
        pb.q, pb.k, pb.v, max_seqlen_q=length, cu_seqlens_q=cum, max_seqlen_k=length,
        cu_seqlens_k=cum, softmax_scale=scale, causal=True, fa_version=3,
    )  # fmt: skip


def _fresh_call(kind: str, pb: Any, length: int) -> Callable[[], torch.Tensor]:
    if kind == VLLM_FA3:
        return _vllm_fa3_call(pb, length)
    cum, scale = pb.meta.query_start_loc, HEAD_DIM**-0.5
    if kind == "flash":  # FlashAttention-2: the engine's fresh-prefill path
        return lambda: torch.ops.aten._flash_attention_forward(
            pb.q, pb.k, pb.v, cum, cum, length, length, 0.0, True, False, scale=scale
        )[0]
    from splitserve.kernels.cudnn_prefill import cudnn_fresh_prefill

    q, k, v = (_with_slack(x) for x in (pb.q, pb.k, pb.v))
    out, lens = torch.empty_like(q), pb.meta.query_lens_cpu

    def call() -> torch.Tensor:
        if not cudnn_fresh_prefill(q, k, v, lens, scale, out):
            raise RuntimeError("cuDNN's padded rows ran past the buffer")
        return out

    return call


def bench_fresh(
    sets: list, length: int, flops: float, timer: Timer, kinds: tuple[str, ...] = FRESH_KERNELS
) -> list[dict[str, Any]]:
    """Each of `kinds` over the prompts of `sets`, with its largest difference from
    flash's output; a kernel this build or device cannot run gives a row with the error
    instead."""
    seqs = len(sets[0].meta.query_lens_cpu)
    reference = _fresh_call("flash", sets[0], length)().float()
    rows = []
    for kind in kinds:
        case = f"{kind} fresh {seqs} x {length}"
        try:
            diff = (_fresh_call(kind, sets[0], length)().float() - reference).abs().max()
            ms = timer(rotating([_fresh_call(kind, pb, length) for pb in sets]))
        except RuntimeError as exc:
            logger.warning("%s: %s", case, exc)
            rows.append(_row(case, math.nan, error=str(exc).splitlines()[0][:200]))
            continue
        rows.append(_row(case, ms, tflops=flops / ms / 1e9, max_abs_diff_vs_flash=diff.item()))
    return rows


def bench_elementwise(device, timer, smoke: bool) -> list[dict[str, Any]]:
    from splitserve.kernels.rmsnorm import rmsnorm
    from splitserve.kernels.rotary import apply_rotary_
    from splitserve.kernels.store_kv import store_kv

    tokens = 64 if smoke else ELEMENTWISE_TOKENS
    dt = torch.bfloat16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dt)

    num_blocks = tokens // BLOCK_SIZE
    pool = rand(num_blocks, 2, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)
    k, v = rand(tokens, KV_HEADS, HEAD_DIM), rand(tokens, KV_HEADS, HEAD_DIM)
    kv_bytes = 2 * 2 * tokens * KV_HEADS * HEAD_DIM * 2
    x, res, w = rand(tokens, HIDDEN), rand(tokens, HIDDEN), rand(HIDDEN)
    qkv = rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    kr = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    cos_sin = torch.randn(131072, 2, HEAD_DIM, device=device)
    positions = torch.randint(0, 131072, (tokens,), device=device)
    cases = [
        (f"store_kv {tokens} tok", lambda: store_kv(k, v, pool[:, 1], slots), kv_bytes),
        (f"rmsnorm+res {tokens} x {HIDDEN}", lambda: rmsnorm(x, w, 1e-5, res), 4 * x.numel() * 2),
        (
            f"rotary {tokens} tok",
            lambda: apply_rotary_(positions, q, kr, cos_sin),
            2 * (q.numel() + kr.numel()) * 2 + tokens * 2 * HEAD_DIM * 4,
        ),
    ]
    return [_row(name, (ms := timer(fn)), gbps=nbytes / ms / 1e6) for name, fn, nbytes in cases]


def format_table(result: dict[str, Any]) -> str:
    ceil = result["ceilings"]
    lines = [
        f"device: {result['provenance']['device']}  copy ceiling {ceil['copy_gbps']:.0f} GB/s  "
        f"bf16 matmul ceiling {ceil['matmul_tflops']:.0f} TFLOP/s",
        f"{'case':<28} {'ms':>9} {'achieved':>16} {'of ceiling':>10}  config",
    ]
    for row in result["rows"]:
        if "gbps" in row:
            achieved, frac = f"{row['gbps']:.0f} GB/s", row["gbps"] / ceil["copy_gbps"]
        elif "tflops" in row:
            achieved, frac = f"{row['tflops']:.1f} TFLOP/s", row["tflops"] / ceil["matmul_tflops"]
        else:
            achieved, frac = row.get("error", "?")[:16], math.nan
        config = " ".join(f"{k}={v}" for k, v in row.get("config", {}).items())
        lines.append(f"{row['case']:<28} {row['ms']:>9.4f} {achieved:>16} {frac:>10.1%}  {config}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device here; run on a GPU machine or pass --smoke --device cpu")
    timer = Timer(args.smoke, args.queued)
    decode_cases = [(2, 40)] if args.smoke else args.decode_cases
    prefill_cases = [(2, 40)] if args.smoke else args.prefill_cases
    sweep = not args.no_sweep and not args.smoke
    ceilings = measure_ceilings(device, timer, args.smoke)
    rows: list[dict[str, Any]] = []
    for batch, ctx in decode_cases:
        rows += bench_decode(batch, ctx, device, timer, sweep)
    fresh = (*FRESH_KERNELS, VLLM_FA3) if args.vllm_fa3 else FRESH_KERNELS
    for seqs, length in prefill_cases:
        rows += bench_prefill(seqs, length, device, timer, sweep, fresh)
    rows += bench_elementwise(device, timer, args.smoke)
    command = shlex.join(["python3", "-m", "splitserve.benchmarks.kernels", *sys.argv[1:]])
    return {
        "provenance": {**provenance(args.device), "command": command},
        "timing": "queued" if args.queued and not args.smoke else "do_bench",
        "shapes": dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE),
        "ceilings": ceilings,
        "rows": rows,
        "versions": {"torch": torch.__version__, "triton": _triton_version()},
    }


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        # On the CPU the kernels run in Triton's interpreter, which must be chosen before
        # triton is first imported (everything here imports it lazily).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.summary:
        print(format_table(json.loads(Path(args.summary).read_text())))
        return 0
    result = run(args)
    write_result(args.out, result)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
