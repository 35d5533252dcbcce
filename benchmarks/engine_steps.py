"""Engine step costs against the device's measured ceilings (copy GB/s, bf16 matmul TFLOP/s).

    python -m splitserve.benchmarks.engine_steps --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 --kv-cache-memory-gib 80 --max-num-batched-tokens 16384 \
        --out engine_steps.json
    python -m splitserve.benchmarks.engine_steps --model dummy:tiny --device cpu --smoke \
        --decode-cases 2x64 --prefill-cases 2x32 --max-num-batched-tokens 128

An EngineCore is built from the engine flags and driven directly with `add_request` / `step`.
Decode case BxC: B distinct random prompts of C tokens are prefilled (untimed), a few
warm-up decode steps run, then `--steps` decode-only steps of B sequences are timed. Bytes
read per step = weight bytes + KV bytes, where each sequence reads the K and V of every token
it attends to (prompt and generated so far, the new one included) in every layer:
context * num_layers * 2 * num_kv_heads * head_dim * dtype bytes. The weight-read floor of a
step is weight bytes / copy rate. Prefill case SxL: S fresh random prompts of L tokens in one
step (max_tokens=1), median of `--prefill-repeats` timed steps after one warm-up; FLOPs =
2 * parameters per prompt token + causal attention (QK^T and PV, each
2 * num_heads * head_dim * L * (L + 1) / 2 per sequence and layer).

`roofline_seconds` (also used by `engine_offline --roofline`) estimates an offline workload
from the same counts. Prints a table and (with --out) writes JSON with provenance.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shlex
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from splitserve.benchmarks.kernels import Timer, measure_ceilings, parse_cases
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.engine_args import (
    add_engine_arguments,
    engine_config_from_args,
    resolve_scheduler_args,
)

if TYPE_CHECKING:
    from splitserve.engine.core import EngineCore, StepOutput
    from splitserve.engine.model.arch import ModelArchConfig
logger = logging.getLogger(__name__)

BATCH1_MAX_RATIO_TO_FLOOR = 1.2
DECODE_TARGET_MIN_BATCH = 64
DECODE_MIN_FRACTION_OF_COPY = 0.70
PREFILL_MIN_FRACTION_OF_MATMUL = 0.60


class CaseError(ValueError):
    """A case the engine flags cannot run; the message names the flag to raise."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument(
        "--decode-cases", type=parse_cases, default="1x512,64x2048,256x2048", help="BxCONTEXT,..."
    )
    parser.add_argument("--prefill-cases", type=parse_cases, default="8x2048", help="SxLEN,...")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per case")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps")
    parser.add_argument("--prefill-repeats", type=int, default=5, help="timed prefill steps")
    parser.add_argument("--smoke", action="store_true", help="host-timed tiny ceilings (CPU)")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    return parser


# Counted work.


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters; a tensor shared by two modules counts once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return total


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters other than the token embedding and the LM head (tied or not)."""
    skip = {"embed_tokens", "lm_head"}
    embeddings = {
        param.data_ptr()
        for name, param in model.named_parameters(remove_duplicate=False)
        if skip & set(name.split("."))
    }
    return sum(p.numel() for p in model.parameters() if p.data_ptr() not in embeddings)


def kv_bytes_per_token(arch: ModelArchConfig, dtype_bytes: int) -> int:
    """K and V of one token in every layer."""
    return arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * dtype_bytes


def attention_flops(arch: ModelArchConfig, length: int) -> float:
    """Causal prefill of one sequence: QK^T and PV, each 2 * heads * head_dim * L(L+1)/2."""
    return arch.num_layers * 2 * (2 * arch.num_heads * arch.head_dim * length * (length + 1) / 2)


def prefill_flops(arch: ModelArchConfig, num_params: float, num_seqs: int, length: int) -> float:
    return num_seqs * (2 * num_params * length + attention_flops(arch, length))


def roofline_seconds(
    arch: ModelArchConfig,
    weight_bytes: int,
    dtype_bytes: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    max_num_seqs: int,
    copy_gbps: float,
    matmul_tflops: float,
) -> float:
    """Lower bound on the time of num_prompts prompts of input_len tokens, output_len each.

    T = F / (matmul_tflops * 1e12) + D / (copy_gbps * 1e9), with P = weight_bytes / dtype_bytes:
      F = num_prompts * (2 * P * input_len + num_layers * 2 * heads * head_dim * I * (I + 1))
          (2P FLOPs per prompt token plus causal attention, I = input_len);
      decode runs in W = ceil(num_prompts / max_num_seqs) waves of at most max_num_seqs
      sequences, each of S = output_len - 1 steps (prefill samples the first token). Step j
      (1..S) reads the weights once plus, for every sequence of the wave, the KV of its
      I + j tokens: K = num_layers * 2 * kv_heads * head_dim * dtype_bytes per token. Summed
      over every step of every wave:
      D = W * S * weight_bytes + num_prompts * K * (S * I + S * (S + 1) / 2).
    """
    num_params = weight_bytes / dtype_bytes
    flops = prefill_flops(arch, num_params, num_prompts, input_len)
    num_waves = math.ceil(num_prompts / max_num_seqs)
    steps = max(0, output_len - 1)
    context_sum = steps * input_len + steps * (steps + 1) / 2
    decode_bytes = num_waves * steps * weight_bytes + (
        num_prompts * kv_bytes_per_token(arch, dtype_bytes) * context_sum
    )
    return flops / (matmul_tflops * 1e12) + decode_bytes / (copy_gbps * 1e9)


# Checks of the cases against the engine flags.


def _decode_max_tokens(args: argparse.Namespace, batch: int, context: int) -> int:
    """Enough new tokens that no sequence ends before the timed steps do: the earliest
    prefilled ones decode during every later prefill step (at most `prefill_bound`)."""
    prefill_tokens_per_step = args.max_num_batched_tokens - batch + 1
    prefill_bound = math.ceil(batch * context / prefill_tokens_per_step)
    return prefill_bound + args.warmup_steps + args.steps + 1


def check_flags(args: argparse.Namespace) -> None:
    """Checks that need no engine: the step budget and the batch cap."""
    if args.steps < 1 or args.prefill_repeats < 1 or args.warmup_steps < 0:
        raise CaseError("--steps and --prefill-repeats must be >= 1, --warmup-steps >= 0")
    if torch.device(args.device).type != "cuda" and not args.smoke:
        raise CaseError("the ceilings are timed with CUDA events; on this device pass --smoke")
    for batch, context in args.decode_cases:
        name = f"decode case {batch}x{context}"
        if batch > args.max_num_seqs:
            raise CaseError(f"{name} runs {batch} sequences: raise --max-num-seqs to {batch}")
        if batch > args.max_num_batched_tokens:
            raise CaseError(f"{name} decodes {batch} tokens a step: raise --max-num-batched-tokens")
        if args.no_chunked_prefill and context > args.max_num_batched_tokens:
            raise CaseError(f"{name}: raise --max-num-batched-tokens to {context}")
    for seqs, length in args.prefill_cases:
        name = f"prefill case {seqs}x{length}"
        if seqs * length > args.max_num_batched_tokens:
            raise CaseError(
                f"{name} is {seqs * length} tokens in one step: raise --max-num-batched-tokens "
                f"to {seqs * length}"
            )
        if seqs > args.max_num_seqs:
            raise CaseError(f"{name} runs {seqs} sequences: raise --max-num-seqs to {seqs}")


def check_engine_fits(args: argparse.Namespace, core: EngineCore) -> None:
    """Every case's KV fits the pool and its longest sequence fits the context."""
    pool = core.pool.num_blocks
    needs = [
        (f"decode case {b}x{c}", b, c + _decode_max_tokens(args, b, c))
        for b, c in args.decode_cases
    ] + [(f"prefill case {s}x{n}", s, n + 1) for s, n in args.prefill_cases]
    for name, num_seqs, num_tokens in needs:
        if num_tokens > core.max_model_len:
            raise CaseError(
                f"{name} reaches {num_tokens} tokens a sequence, the context is "
                f"{core.max_model_len}: raise --max-model-len"
            )
        blocks = num_seqs * core.blocks.blocks_needed(num_tokens)
        if blocks > pool:
            gib = blocks * core.kv_cache[0].nbytes / 2**30
            fix = (
                f"--num-blocks to {blocks}"
                if args.num_blocks
                else f"--kv-cache-memory-gib to {gib:.3g}"
            )
            raise CaseError(f"{name} needs {blocks} KV blocks, the pool has {pool}: raise {fix}")


# Timed cases.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _add_random(
    core: EngineCore, ids: list[str], length: int, rng: random.Random, params: SamplingParams
) -> None:
    vocab = core.arch.vocab_size
    for rid in ids:
        core.add_request(rid, [rng.randrange(vocab) for _ in range(length)], params)


def _count_outputs(outputs: list[StepOutput], counts: dict[str, int]) -> None:
    for out in outputs:
        if out.finished:
            raise RuntimeError(f"{out.request_id} finished ({out.finish_reason}) mid-case")
        counts[out.request_id] += len(out.new_token_ids)


def _prefill_all(core: EngineCore, counts: dict[str, int], context: int, max_steps: int) -> int:
    """Step until every request in `counts` has its first token; returns the steps taken."""
    before = core.stats()
    num_steps = 0
    while min(counts.values()) == 0:
        if num_steps == max_steps:
            raise RuntimeError(f"prefill of {len(counts)} x {context} not done in {max_steps}")
        _count_outputs(core.step(), counts)
        num_steps += 1
    computed = core.stats().prompt_tokens_computed - before.prompt_tokens_computed
    if computed != len(counts) * context:
        raise RuntimeError(f"computed {computed} prompt tokens, not {len(counts) * context}")
    return num_steps


def time_decode(
    core: EngineCore, args: argparse.Namespace, batch: int, context: int, rng: random.Random
) -> dict[str, Any]:
    """One decode case; returns its row. Raises if a timed step was not B decodes."""
    max_tokens = _decode_max_tokens(args, batch, context)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"decode-{batch}x{context}-{i}" for i in range(batch)]
    counts = dict.fromkeys(ids, 0)
    _add_random(core, ids, context, rng, params)
    num_prefill_steps = _prefill_all(core, counts, context, max_steps=max_tokens)
    for _ in range(args.warmup_steps):
        _count_outputs(core.step(), counts)
    attended, sizes = 0, []
    timed_before = core.stats()
    _sync(core.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        attended += sum(context + n for n in counts.values())
        outputs = core.step()
        sizes.append(len(outputs))
        _count_outputs(outputs, counts)
    _sync(core.device)
    elapsed = time.perf_counter() - start
    timed_after = core.stats()
    for rid in ids:
        core.abort(rid)
    if core.stats().num_running != 0:
        raise RuntimeError("requests still running after the aborts")
    decode_only = (
        sizes == [batch] * args.steps
        and timed_after.prompt_tokens_computed == timed_before.prompt_tokens_computed
        and timed_after.num_preemptions == timed_before.num_preemptions
        and timed_after.num_steps - timed_before.num_steps == args.steps
    )
    if not decode_only:
        raise RuntimeError(f"decode {batch}x{context}: a timed step was not {batch} decodes")
    return {
        "kind": "decode",
        "case": f"decode {batch}x{context}",
        "batch": batch,
        "context": context,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "num_prefill_steps": num_prefill_steps,
        "ms_per_step": elapsed * 1e3 / args.steps,
        "mean_context": attended / (batch * args.steps),
        "timed_step_batch_sizes": sizes,
        "decode_only": decode_only,
    }


def time_prefill(
    core: EngineCore, args: argparse.Namespace, seqs: int, length: int, rng: random.Random
) -> dict[str, Any]:
    """One prefill case: a warm-up step, then the median of the timed ones."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times_ms = []
    for rep in range(args.prefill_repeats + 1):
        ids = [f"prefill-{seqs}x{length}-{rep}-{i}" for i in range(seqs)]
        _add_random(core, ids, length, rng, params)
        before = core.stats()
        _sync(core.device)
        start = time.perf_counter()
        outputs = core.step()
        _sync(core.device)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        after = core.stats()
        computed = after.prompt_tokens_computed - before.prompt_tokens_computed
        hits = after.prefix_cache_hits - before.prefix_cache_hits
        done = len(outputs) == seqs and all(o.finished for o in outputs)
        if not done or computed != seqs * length or hits or after.num_running:
            raise RuntimeError(
                f"prefill {seqs}x{length}: one step computed {computed} prompt tokens "
                f"({hits} cached) for {len(outputs)} sequences"
            )
        if rep:
            times_ms.append(elapsed_ms)
    return {
        "kind": "prefill",
        "case": f"prefill {seqs}x{length}",
        "seqs": seqs,
        "length": length,
        "repeats": args.prefill_repeats,
        "ms_per_step": statistics.median(times_ms),
        "ms_all": times_ms,
        "prompt_tokens_computed_per_step": seqs * length,
    }


# Rows against the ceilings.


def score_decode(row: dict[str, Any], model: dict[str, Any], ceil: dict[str, float]) -> None:
    kv_bytes = row["batch"] * row["mean_context"] * model["kv_bytes_per_token"]
    step_bytes = model["weight_bytes"] + kv_bytes
    gbps = step_bytes / row["ms_per_step"] / 1e6
    floor_ms = model["weight_bytes"] / ceil["copy_gbps"] / 1e6
    row.update(
        kv_bytes_per_step=kv_bytes,
        bytes_per_step=step_bytes,
        achieved_gbps=gbps,
        fraction_of_copy=gbps / ceil["copy_gbps"],
        floor_ms=floor_ms,
        ratio_to_floor=row["ms_per_step"] / floor_ms,
    )
    row["target"], row["met"] = None, None
    if row["batch"] == 1:
        row["target"] = f"ratio_to_floor <= {BATCH1_MAX_RATIO_TO_FLOOR}"
        row["met"] = row["ratio_to_floor"] <= BATCH1_MAX_RATIO_TO_FLOOR
    elif row["batch"] >= DECODE_TARGET_MIN_BATCH:
        row["target"] = f"fraction_of_copy >= {DECODE_MIN_FRACTION_OF_COPY}"
        row["met"] = row["fraction_of_copy"] >= DECODE_MIN_FRACTION_OF_COPY


def score_prefill(row: dict[str, Any], model: dict[str, Any], ceil: dict[str, float]) -> None:
    flops = prefill_flops(model["arch"], model["num_params"], row["seqs"], row["length"])
    tflops = flops / row["ms_per_step"] / 1e9
    row.update(flops=flops, achieved_tflops=tflops)
    row["fraction_of_matmul"] = tflops / ceil["matmul_tflops"]
    # The stricter count: the embedding is a lookup and the LM head runs on one row per
    # sequence, so only the other parameters cost 2 FLOPs per prompt token.
    strict = (
        prefill_flops(model["arch"], model["num_params_non_embedding"], row["seqs"], row["length"])
        + row["seqs"] * 2 * model["arch"].vocab_size * model["arch"].hidden_size
    )
    row["achieved_tflops_non_embedding"] = strict / row["ms_per_step"] / 1e9
    row["fraction_of_matmul_non_embedding"] = (
        row["achieved_tflops_non_embedding"] / ceil["matmul_tflops"]
    )
    row["target"] = f"fraction_of_matmul >= {PREFILL_MIN_FRACTION_OF_MATMUL}"
    row["met"] = row["fraction_of_matmul"] >= PREFILL_MIN_FRACTION_OF_MATMUL


def format_table(result: dict[str, Any]) -> str:
    ceil = result["ceilings"]
    lines = [
        f"device: {result['provenance']['device']}  weights {result['weight_bytes'] / 1e9:.2f} GB"
        f"  copy {ceil['copy_gbps']:.0f} GB/s  matmul {ceil['matmul_tflops']:.1f} TFLOP/s",
        f"{'case':<22} {'ms':>9} {'achieved':>15} {'ceiling':>15} {'fraction':>8}  "
        f"{'target':<40} met",
    ]
    for row in result["rows"]:
        if row["kind"] == "decode":
            achieved, unit = row["achieved_gbps"], "GB/s"
            ceiling, frac = ceil["copy_gbps"], row["fraction_of_copy"]
        else:
            achieved, unit = row["achieved_tflops"], "TFLOP/s"
            ceiling, frac = ceil["matmul_tflops"], row["fraction_of_matmul"]
        target = row["target"] or "-"
        if row["kind"] == "decode" and row["batch"] == 1:
            target += f" ({row['ratio_to_floor']:.2f}x {row['floor_ms']:.2f} ms)"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(
            f"{row['case']:<22} {row['ms_per_step']:>9.3f} {f'{achieved:.1f} {unit}':>15} "
            f"{f'{ceiling:.1f} {unit}':>15} {frac:>8.1%}  {target:<40} {met}"
        )
    return "\n".join(lines)


def engine_flags(args: argparse.Namespace, core: EngineCore) -> dict[str, Any]:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "resolved_dtype": str(core.dtype).removeprefix("torch."),
        "enforce_eager": getattr(args, "enforce_eager", False),
        "attention_backend": args.attention_backend,
        "block_size": args.block_size,
        "num_blocks": core.pool.num_blocks,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "prefix_caching": not args.no_prefix_caching,
        "chunked_prefill": not args.no_chunked_prefill,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine, check the cases fit, measure the ceilings, time every case."""
    from splitserve.engine.core import EngineCore

    check_flags(args)
    core = EngineCore(engine_config_from_args(args))
    check_engine_fits(args, core)
    device = torch.device(args.device)
    ceilings = measure_ceilings(device, Timer(args.smoke), args.smoke)
    dtype_bytes = core.dtype.itemsize
    wbytes = weight_bytes(core.model)
    model = {
        "arch": core.arch,
        "weight_bytes": wbytes,
        "num_params": wbytes / dtype_bytes,
        "num_params_non_embedding": non_embedding_params(core.model),
        "kv_bytes_per_token": kv_bytes_per_token(core.arch, dtype_bytes),
    }
    rng = random.Random(args.seed)
    rows = []
    for batch, context in args.decode_cases:
        rows.append(time_decode(core, args, batch, context, rng))
        score_decode(rows[-1], model, ceilings)
    for seqs, length in args.prefill_cases:
        rows.append(time_prefill(core, args, seqs, length, rng))
        score_prefill(rows[-1], model, ceilings)
    arch = core.arch
    command = shlex.join(["python", "-m", "splitserve.benchmarks.engine_steps", *sys.argv[1:]])
    return {
        "provenance": {**provenance(args.device), "command": command},
        "engine": engine_flags(args, core),
        "arch": {
            "num_layers": arch.num_layers,
            "num_heads": arch.num_heads,
            "num_kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size,
            "vocab_size": arch.vocab_size,
        },
        "ceilings": ceilings,
        "weight_bytes": wbytes,
        "dtype_bytes": dtype_bytes,
        "kv_bytes_per_token": model["kv_bytes_per_token"],
        "rows": rows,
        "versions": {"torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_scheduler_args(args)  # the cases are checked against the step's limits
    try:
        result = run(args)
    except CaseError as exc:
        parser.error(str(exc))
    write_result(args.out, result)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
