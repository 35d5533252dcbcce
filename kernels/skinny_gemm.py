"""GEMMs of few rows: out = x W^T (+ b) for a decode step's handful of rows.

    x: [M, K], W: [N, K] (the model's Linear weight), b: [N] or None -> out: [M, N]

With a few dozen rows a projection is bound by reading W once, but cuBLAS runs it as one
row tile over N / 128 or so column tiles: 32 to 48 thread blocks for a Llama-8B q/k/v or
output projection on a GPU of 132 multiprocessors, which then read the weights at well
under the copy rate (docs/kernels.md). This kernel tiles N finer and splits K, so that
every multiprocessor streams its share of W:

    grid (cdiv(N, BLOCK_N), splits): block (n, s) multiplies x[:, K_s] by W[n-tile, K_s]
    over its K range K_s (K / splits columns) with `tl.dot`, all M rows in one tile of
    BLOCK_M = max(16, next power of two >= M).

With one split the block adds the bias and writes its tile of out. With several, each
block writes its float32 partial into `workspace[s]`, then takes a ticket from the
n-tile's counter (an acquire-release atomic after a block barrier); the block that draws
the last ticket sums the partials in split order (deterministic), adds the bias, writes
the tile and resets the counter to 0 for the next call. Nothing is read back on the host,
so the kernel can be captured in a CUDA graph; the workspace and counters are allocated
on first use for a shape (outside any capture: the engine runs every graph's shape once
before capturing it) and reused.

benchmarks/skinny_gemm_tune.py times every configuration against cuBLAS at a model's
shapes (docs/performance.md has what it found). Reference: `torch.nn.functional.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import check_launchable, check_tensor

# float32 runs the dot in IEEE precision (what the CPU interpreter's tests use).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    ticket_ptr,
    M,
    N,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    k0 = pid_s * k_per_split
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + (k0 + ks)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    last = num_splits == 1
    if num_splits > 1:
        tile = rows[:, None] * N + cols[None, :]
        tl.store(ws_ptr + pid_s * BLOCK_M * N + tile, acc, mask=col_ok[None, :])
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        last = ticket == num_splits - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, num_splits):
                part = ws_ptr + s * BLOCK_M * N + tile
                acc += tl.load(part, mask=col_ok[None, :], other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(ticket_ptr + pid_n, 0)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, out, mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch configuration: column tile, K step, K splits, warps and pipeline stages."""

    block_n: int
    block_k: int
    splits: int
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, n: int, k: int) -> bool:
        return k % (self.splits * self.block_k) == 0 and n >= self.block_n


def block_m(rows: int) -> int:
    """The row tile: every row in one tile, at least 16 (the dot's smallest)."""
    return max(16, triton.next_power_of_2(rows))


class _Scratch:
    """Split-K partials and the n-tiles' counters of one (device, N, BLOCK_M, splits)."""

    def __init__(self, device: torch.device, n: int, rows: int, config: SkinnyConfig) -> None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "skinny_gemm: first call for this shape inside a CUDA graph capture; run the "
                "shape once before capturing it"
            )
        size = config.splits * rows * n if config.splits > 1 else 1
        self.workspace = torch.empty(size, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(triton.cdiv(n, config.block_n), dtype=torch.int32, device=device)


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: SkinnyConfig,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scratch: _Scratch | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) with `config`, into `out` ([M, N]) when given."""
    device = x.device
    check_launchable(device)
    check_tensor("x", x, 2, DTYPES, device)
    check_tensor("weight", weight, 2, (x.dtype,), device)
    rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(
            f"weight must be [N, {k}] with unit inner stride, got {tuple(weight.shape)}"
        )
    if not config.fits(n, k):
        raise ValueError(f"config {config} does not fit N={n}, K={k}")
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,), device)
    if out is None:
        out = torch.empty(rows, n, dtype=x.dtype, device=device)
    check_tensor("out", out, 2, (x.dtype,), device)
    if tuple(out.shape) != (rows, n):
        raise ValueError(f"out must be [{rows}, {n}], got {tuple(out.shape)}")
    tile = block_m(rows)
    if scratch is None:
        scratch = _Scratch(device, n, tile, config)
    grid = (triton.cdiv(n, config.block_n), config.splits)
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        scratch.workspace, scratch.tickets,
        rows, n, k // config.splits,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=tile, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
