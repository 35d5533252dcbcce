"""Compile every kernel ahead of time for a CUDA target, without a GPU, and report what
the compiler made of it: shared memory, registers, stack (spills), matrix instructions.

    python -m splitserve.kernels.compile_check [--arch 90]

It builds the default launch configurations of the wrappers at Llama-3.1-8B shapes
(bfloat16, and the float32 correctness paths) with Triton's own compiler and reads the
cubins with the `cuobjdump` that Triton ships. CPU CI runs it (tests/test_kernels_compile.py)
so that a kernel which would not compile for the GPU fails before any GPU time is spent.
Needs TRITON_INTERPRET unset: the interpreter replaces the kernels with Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from splitserve.kernels import decode_attention as dec
from splitserve.kernels import decode_reduce as red
from splitserve.kernels import gumbel_sample as gum
from splitserve.kernels import prefill_attention as pre
from splitserve.kernels import prefill_split as spl
from splitserve.kernels import rmsnorm as rms
from splitserve.kernels import rotary as rot
from splitserve.kernels import rotary_store as rst
from splitserve.kernels import store_kv as st

HEAD_DIM, GROUP, KV_BLOCK = 128, 4, 16
# Opt-in shared memory per block on sm_90 (bytes).
SM90_MAX_SHARED = 227 * 1024
# Matrix instructions, async copies, spills, and the fused merge's device-scope ordering.
COUNTED_OPS = ("HGMMA", "HMMA", "LDGSTS", "LDL", "STL", "ATOMG", "MEMBAR.ALL.GPU")


class Spec(NamedTuple):
    label: str
    kernel: Any  # a @triton.jit function
    pointers: dict[str, str]  # pointer argument -> element type ("bf16", "fp32", "i32", ...)
    floats: tuple[str, ...]  # fp32 scalar arguments; the other scalars are i32
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


def _attention_specs(dtype: torch.dtype) -> list[Spec]:
    ty = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    dot = "ieee" if dtype == torch.float32 else "tf32"
    launch = dec.default_launch(dtype, HEAD_DIM)
    dec_ptrs = dict(q_ptr=ty, kv_ptr=ty, table_ptr="i32", seq_lens_ptr="i32", out_ptr=ty)
    dec_ptrs |= dict(part_acc_ptr="fp32", part_m_ptr="fp32", part_l_ptr="fp32")
    dec_ptrs |= dict(counters_ptr="i32")
    block_m, block_n = pre.default_tiles(dtype, HEAD_DIM, torch.device("cuda"))
    pre_ptrs = dict(q_ptr=ty, kv_ptr=ty, table_ptr="i32", seq_lens_ptr="i32")
    pre_ptrs |= dict(query_start_ptr="i32", out_ptr=ty)
    common = dict(HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, KV_BLOCK_SIZE=KV_BLOCK, DOT_PRECISION=dot)
    specs = []
    for single, fused in ((False, False), (False, True), (True, False)):
        consts = dict(common, GROUP_SIZE=GROUP, BLOCK_G=16, BLOCK_N=launch.block_n)
        consts |= dict(MIN_TILES=dec.min_walk_tiles(launch.block_n))
        consts |= dict(IS_SINGLE_SPLIT=single, FUSED_MERGE=fused)
        kind = "single" if single else "split-K, merged inside" if fused else "split-K"
        label = f"decode split ({ty}, {kind})"
        specs.append(
            Spec(label, dec._decode_split_kernel, dec_ptrs, ("qk_scale_log2",), consts,
                 launch.num_warps, launch.num_stages)
        )  # fmt: skip
    consts = dict(common, GROUP_SIZE=GROUP, BLOCK_M=block_m, BLOCK_N=block_n)
    warps = pre.default_num_warps(block_m, dtype)
    split_ptrs = dict(pre_ptrs, part_acc_ptr="fp32", part_m_ptr="fp32", part_l_ptr="fp32")
    split_ptrs |= dict(row_seq_lens_ptr="i32")
    split_m, split_n = spl.default_tiles(dtype, HEAD_DIM, torch.device("cuda"))
    split_consts = dict(common, GROUP_SIZE=GROUP, BLOCK_M=split_m, BLOCK_N=split_n)
    specs.append(
        Spec(f"prefill, context split ({ty})", pre._prefill_kernel, split_ptrs,
             ("qk_scale_log2",), split_consts | dict(IS_SINGLE_SPLIT=False), spl.NUM_WARPS, 2)
    )  # fmt: skip
    single_ptrs = dict(pre_ptrs, part_acc_ptr=ty, part_m_ptr=ty, part_l_ptr=ty)
    single_ptrs |= dict(row_seq_lens_ptr="i32")
    specs.append(
        Spec(f"prefill ({ty})", pre._prefill_kernel, single_ptrs, ("qk_scale_log2",),
             consts | dict(IS_SINGLE_SPLIT=True), warps, 2)
    )  # fmt: skip
    return specs


def all_specs() -> list[Spec]:
    bf16 = "bf16"
    reduce_ptrs = dict(part_acc_ptr="fp32", part_m_ptr="fp32", part_l_ptr="fp32")
    reduce_ptrs |= dict(seq_lens_ptr="i32", out_ptr=bf16)
    norm_ptrs = dict(x_ptr=bf16, residual_ptr=bf16, weight_ptr=bf16, out_ptr=bf16)
    norm_ptrs |= dict(residual_out_ptr=bf16)
    return [
        *_attention_specs(torch.bfloat16),
        *_attention_specs(torch.float32),
        Spec(
            "decode reduce (bf16)", red._decode_reduce_kernel, reduce_ptrs, (),
            dict(HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, SKIP_EMPTY=False), 1, 1,
        ),
        Spec(
            "store_kv (bf16)", st._store_kv_kernel,
            dict(k_ptr=bf16, v_ptr=bf16, kv_ptr=bf16, slot_ptr="i64"), (),
            dict(HEAD_DIM=HEAD_DIM, BLOCK_H=8, BLOCK_D=HEAD_DIM, KV_BLOCK_SIZE=KV_BLOCK), 4, 1,
        ),
        Spec(
            "rmsnorm+residual (bf16, 4096)", rms._rmsnorm_kernel, norm_ptrs, ("eps",),
            dict(BLOCK_N=4096, HAS_RESIDUAL=True), 16, 1,
        ),
        Spec(
            "rotary (bf16, 32+8 heads)", rot._rotary_kernel,
            dict(q_ptr=bf16, k_ptr=bf16, cos_sin_ptr="fp32", positions_ptr="i64"), (),
            dict(HALF_DIM=HEAD_DIM // 2, BLOCK_HALF=HEAD_DIM // 2, BLOCK_HQ=32, BLOCK_HK=8),
            4, 1,
        ),
        Spec(
            "rotary + store (bf16, 32+8 heads)", rst._rotary_store_kernel,
            dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, kv_ptr=bf16, cos_sin_ptr="fp32",
                 positions_ptr="i64", slot_ptr="i64"), (),
            dict(HALF_DIM=HEAD_DIM // 2, BLOCK_HALF=HEAD_DIM // 2, BLOCK_HQ=32, BLOCK_HK=8,
                 KV_BLOCK_SIZE=KV_BLOCK),
            4, 1,
        ),
        Spec(
            "gumbel draw, blocks (fp32 logits, 128256)", gum._block_best_kernel,
            dict(logits_ptr="fp32", inv_temp_ptr="fp32", seed_ptr="i64", offset_ptr="i64",
                 best_val_ptr="fp32", best_col_ptr="i32"), (),
            dict(BLOCK=gum.MAX_BLOCK), 4, 1,
        ),
        Spec(
            "gumbel draw, rows (63 blocks)", gum._row_best_kernel,
            dict(best_val_ptr="fp32", best_col_ptr="i32", out_ptr="i64"), (),
            dict(BLOCKS=64), 1, 1,
        ),
    ]  # fmt: skip


def _signature(spec: Spec) -> dict[str, str]:
    sig = {}
    for name in spec.kernel.arg_names:
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = "*" + spec.pointers[name]
        else:
            sig[name] = "fp32" if name in spec.floats else "i32"
    return sig


def _cuobjdump(args: list[str], cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *args, f.name], capture_output=True, text=True).stdout


def _field(resource_line: str, key: str) -> int | None:
    for part in resource_line.split():
        if part.startswith(key + ":"):
            return int(part.split(":")[1])
    return None


def compile_spec(spec: Spec, arch: int) -> dict[str, Any]:
    src = ASTSource(fn=spec.kernel, signature=_signature(spec), constexprs=spec.constexprs)
    options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    usage = [ln for ln in _cuobjdump(["--dump-resource-usage"], cubin).splitlines() if "REG:" in ln]
    sass = _cuobjdump(["--dump-sass"], cubin)
    return {
        "label": spec.label,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "shared_bytes": int(compiled.metadata.shared),
        "registers": _field(usage[0], "REG") if usage else None,
        "stack_bytes": _field(usage[0], "STACK") if usage else None,
        "ops": {op: sass.count(op) for op in COUNTED_OPS} if sass else {},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    p.add_argument("--json", action="store_true", help="print the reports as one JSON list")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ValueError("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    reports = [compile_spec(spec, args.arch) for spec in all_specs()]
    if args.json:
        print(json.dumps(reports))
    else:
        print(f"triton {triton.__version__}, target sm_{args.arch}")
        print(
            f"{'kernel':<36} {'warps':>5} {'stages':>6} {'smem':>7} {'regs':>5} {'stack':>6}  ops"
        )
        for r in reports:
            ops = " ".join(f"{k}={v}" for k, v in r["ops"].items() if v)
            print(
                f"{r['label']:<36} {r['num_warps']:>5} {r['num_stages']:>6} "
                f"{r['shared_bytes']:>7} {r['registers']!s:>5} {r['stack_bytes']!s:>6}  {ops}"
            )
    too_big = [r["label"] for r in reports if r["shared_bytes"] > SM90_MAX_SHARED]
    if too_big:
        raise ValueError(f"over {SM90_MAX_SHARED} B of shared memory: {', '.join(too_big)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
