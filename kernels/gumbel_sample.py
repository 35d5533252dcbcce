"""Fused random draw: one token per row from softmax(logits / T), reading the logits once.

    token = argmax_i(logits_i / T + G_i),   G_i = -log(-log(U_i)),   U_i ~ Uniform[0, 1)

picks token i with probability softmax(logits / T)_i (the Gumbel-max trick). The
sampler's torch draw (`Sampler._draw`: argmax(p / E) with E ~ Exp(1), the same race in
another form) runs a temperature pass, a softmax, the noise, a division and an argmax over
the float32 [rows, vocab] logits, each a kernel of its own, and the softmax and argmax run
one row per thread block, so a step of a few dozen rows leaves most of the device idle.
Here each (row, block of columns) is one program.

Randomness: row r's uniforms are Philox (`tl.rand4x`, four uniforms a call) keyed by
`seeds[r]`, at counters from `offsets[r]` on (`_block_uniforms` maps the columns to
them). That is a quarter of the Philox calls of `tl.rand`, whose integer work would
otherwise outlast reading the logits. The sampler gives each row its own key and puts
the row's draw number in the counter's high 32 bits, so a row's tokens depend on its key
and draw number only, never on what else is in the batch or where the row sits
(engine/random_draw.py).

    gumbel_argmax(logits [R, V] fp32/bf16/fp16, inv_temps [R] fp32, seeds [R] int64,
                  offsets [R] int64) -> token ids [R] int64

`tl.rand4x` rounds its largest draws up to 1.0, so the uniforms are clamped to the largest
float32 below 1 (noise of at most 16.6, a value whose probability is about 6e-8): left
at 1.0, one column in a few hundred draws over a 128k vocabulary would win whatever its
logit.

Grid: (R, cdiv(V, BLOCK)) programs each write their block's best score and column, then
one program per row reduces its blocks. Ties go to the lowest column. `philox_uniforms`
returns the uniforms a call draws, so `gumbel_argmax_reference` recomputes its choice with
torch ops (tests/test_gumbel_sample.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import FLOAT_DTYPES, check_launchable, check_tensor

# Columns per program of the first pass (fewer when the vocabulary is smaller).
MAX_BLOCK = 2048
# The largest float32 below 1: uniforms are clamped to it (see `_quarter_best`).
LARGEST_BELOW_ONE = 1.0 - 2.0**-24
U_MAX: tl.constexpr = tl.constexpr(LARGEST_BELOW_ONE)


@triton.jit
def _block_uniforms(seed_ptr, offset_ptr, row, block, QUARTER: tl.constexpr):
    """The uniforms of one block of columns, one Philox call per four of them: quarter k
    of the block (columns block * 4 * QUARTER + k * QUARTER + i) takes output k of the
    call at counter offset + block * QUARTER + i."""
    counter = tl.load(offset_ptr + row) + (block * QUARTER + tl.arange(0, QUARTER)).to(tl.int64)
    return tl.rand4x(tl.load(seed_ptr + row), counter)


@triton.jit
def _quarter_best(logits_ptr, stride_row, inv_temp, row, cols, u, vocab):
    """Best Gumbel-perturbed score among `cols` of row `row`, and its column (the lowest
    on a tie; -inf past the vocabulary)."""
    mask = cols < vocab
    x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf"))
    # tl.rand4x rounds its largest values to 1.0, whose noise would be +inf: the winner
    # whatever its logit. Keep below 1 (the largest float32 under 1 gives noise 16.6).
    gumbel = -tl.log(-tl.log(tl.minimum(u, U_MAX)))
    scores = tl.where(mask, x.to(tl.float32) * inv_temp + gumbel, float("-inf"))
    best, at = tl.max(scores, axis=0, return_indices=True, return_indices_tie_break_left=True)
    return best, tl.min(cols) + at


@triton.jit
def _later_wins(best, col, other, other_col):
    """The better of two (score, column) pairs; `other` covers later columns."""
    take = other > best
    return tl.where(take, other, best), tl.where(take, other_col, col)


@triton.jit
def _block_best_kernel(
    logits_ptr,
    stride_row,
    inv_temp_ptr,
    seed_ptr,
    offset_ptr,
    best_val_ptr,
    best_col_ptr,
    vocab,
    num_blocks,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    QUARTER: tl.constexpr = BLOCK // 4
    u0, u1, u2, u3 = _block_uniforms(seed_ptr, offset_ptr, row, block, QUARTER)
    inv_temp = tl.load(inv_temp_ptr + row)
    cols = block * BLOCK + tl.arange(0, QUARTER)
    best, col = _quarter_best(logits_ptr, stride_row, inv_temp, row, cols, u0, vocab)
    b, c = _quarter_best(logits_ptr, stride_row, inv_temp, row, cols + QUARTER, u1, vocab)
    best, col = _later_wins(best, col, b, c)
    b, c = _quarter_best(logits_ptr, stride_row, inv_temp, row, cols + 2 * QUARTER, u2, vocab)
    best, col = _later_wins(best, col, b, c)
    b, c = _quarter_best(logits_ptr, stride_row, inv_temp, row, cols + 3 * QUARTER, u3, vocab)
    best, col = _later_wins(best, col, b, c)
    tl.store(best_val_ptr + row * num_blocks + block, best)
    tl.store(best_col_ptr + row * num_blocks + block, col)


@triton.jit
def _row_best_kernel(best_val_ptr, best_col_ptr, out_ptr, num_blocks, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.arange(0, BLOCKS)
    mask = blocks < num_blocks
    vals = tl.load(best_val_ptr + row * num_blocks + blocks, mask=mask, other=float("-inf"))
    _, at = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    col = tl.load(best_col_ptr + row * num_blocks + at)
    tl.store(out_ptr + row, col.to(tl.int64))


@triton.jit
def _uniforms_kernel(seed_ptr, offset_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    QUARTER: tl.constexpr = BLOCK // 4
    u0, u1, u2, u3 = _block_uniforms(seed_ptr, offset_ptr, row, block, QUARTER)
    cols = block * BLOCK + tl.arange(0, QUARTER)
    out = out_ptr + row * vocab
    tl.store(out + cols, u0, mask=cols < vocab)
    tl.store(out + cols + QUARTER, u1, mask=cols + QUARTER < vocab)
    tl.store(out + cols + 2 * QUARTER, u2, mask=cols + 2 * QUARTER < vocab)
    tl.store(out + cols + 3 * QUARTER, u3, mask=cols + 3 * QUARTER < vocab)


def _block_size(vocab: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 64)))


def _check_keys(seeds: torch.Tensor, offsets: torch.Tensor, rows: int, device) -> None:
    check_tensor("seeds", seeds, 1, (torch.int64,), device)
    check_tensor("offsets", offsets, 1, (torch.int64,), device)
    if seeds.shape[0] != rows or offsets.shape[0] != rows:
        raise ValueError(
            f"seeds and offsets need one entry per logits row ({rows}), got "
            f"{seeds.shape[0]} and {offsets.shape[0]}"
        )


def gumbel_argmax(
    logits: torch.Tensor, inv_temps: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """One token per row of `logits`, drawn from softmax(logits * inv_temps[row])."""
    device = logits.device
    check_launchable(device)
    check_tensor("logits", logits, 2, FLOAT_DTYPES, device)
    rows, vocab = logits.shape
    check_tensor("inv_temps", inv_temps, 1, (torch.float32,), device)
    if inv_temps.shape[0] != rows:
        raise ValueError(
            f"inv_temps needs one entry per logits row ({rows}), got {inv_temps.shape[0]}"
        )
    _check_keys(seeds, offsets, rows, device)
    out = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return out
    if vocab == 0:
        raise ValueError("logits have no columns: there is no token to draw")
    block = _block_size(vocab)
    num_blocks = triton.cdiv(vocab, block)
    best_val = torch.empty(rows, num_blocks, dtype=torch.float32, device=device)
    best_col = torch.empty(rows, num_blocks, dtype=torch.int32, device=device)
    _block_best_kernel[(rows, num_blocks)](
        logits, logits.stride(0), inv_temps, seeds, offsets, best_val, best_col,
        vocab, num_blocks, BLOCK=block,
    )  # fmt: skip
    blocks = triton.next_power_of_2(num_blocks)
    _row_best_kernel[(rows,)](best_val, best_col, out, num_blocks, BLOCKS=blocks)
    return out


def philox_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32: the uniforms `gumbel_argmax` draws for these keys."""
    device = seeds.device
    check_launchable(device)
    _check_keys(seeds, offsets, seeds.shape[0], device)
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.float32, device=device)
    if out.numel():
        block = _block_size(vocab)
        _uniforms_kernel[(seeds.shape[0], triton.cdiv(vocab, block))](
            seeds, offsets, out, vocab, BLOCK=block
        )
    return out


def gumbel_argmax_reference(
    logits: torch.Tensor, inv_temps: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """What `gumbel_argmax` picks, given the uniforms it draws (`philox_uniforms`)."""
    gumbel = -torch.log(-torch.log(uniforms.clamp(max=LARGEST_BELOW_ONE)))
    return (logits.float() * inv_temps.unsqueeze(1) + gumbel).argmax(dim=-1)
