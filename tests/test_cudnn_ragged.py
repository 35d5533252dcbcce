"""A run of long fresh prompts in one ragged cuDNN call (kernels/cudnn_ragged.py): the
bucket and plan arithmetic, the buffer rows a step's q/k/v are, and the backend taking the
call for a run it has a plan for, matching the torch backend, with the run's starts as
rows of the prepared buffers.

On the CPU a plain-torch ragged attention stands in for cuDNN's call, at a smaller bucket
and threshold; on an sm90 GPU the `gpu`-marked test runs cuDNN itself at model shapes.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import cudnn_prefill, cudnn_ragged
from splitserve.kernels.attention_torch import TorchPagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 32
SCALE = HEAD_DIM**-0.5


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global TritonPagedAttention, make_paged_batch, backend_module
    import splitserve.kernels.backend as backend_module
    from splitserve.kernels.backend import TritonPagedAttention
    from splitserve.kernels.testing import make_paged_batch


def test_buckets_and_sequences() -> None:
    """The longest prompt rounds up to a power of two from MIN_BUCKET; a bucket's runs hold
    one prompt over half of it and the rest at cuDNN's shortest."""
    assert [cudnn_ragged.ragged_bucket(n) for n in (768, 1024, 1025, 2048, 3000)] == [
        1024,
        1024,
        2048,
        2048,
        4096,
    ]
    assert cudnn_ragged.max_sequences(1024, 8192) == 10  # 10 x 768 rows
    assert cudnn_ragged.max_sequences(2048, 8192) == 1 + (8192 - 1025) // 768
    assert cudnn_ragged.max_sequences(8192, 8192) == 1 + (8192 - 4097) // 768
    assert cudnn_ragged.max_sequences(16384, 8192) == 0


def test_first_row_is_the_row_of_the_prepared_buffers() -> None:
    """Row slices of the prepared views give their first row; a copy, or q and k from
    different rows, give None."""
    fused = torch.zeros(64, HEADS + 2 * KV_HEADS, HEAD_DIM)
    q, k, v = fused.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    rows = cudnn_ragged.RaggedRows(q, k, v, frozenset())
    assert rows.first_row(q[10:40], k[10:40], v[10:40]) == 10
    assert rows.first_row(q[:64], k[:64], v[:64]) == 0
    assert rows.first_row(q[10:40].clone(), k[10:40], v[10:40]) is None
    assert rows.first_row(q[10:40], k[11:41], v[10:40]) is None


class RaggedStandIn:
    """Plain-torch causal attention of each sequence over its own rows of the whole
    buffers, standing in for cuDNN's ragged call; records each call's starts and bucket."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []

    def __call__(self, rows, starts, bucket: int, scale: float) -> torch.Tensor:
        bounds = starts.tolist()
        self.calls.append((bounds, bucket))
        out = torch.full_like(rows.q, float("nan"))  # rows of no sequence: unset
        for start, end in itertools.pairwise(bounds):
            heads = (
                x[start:end].transpose(0, 1).unsqueeze(0).float() for x in (rows.q, rows.k, rows.v)
            )
            result = F.scaled_dot_product_attention(
                *heads, is_causal=True, scale=scale, enable_gqa=True
            )
            out[start:end] = result[0].transpose(0, 1).to(out.dtype)
        return out


@pytest.fixture
def small_shapes(monkeypatch) -> RaggedStandIn:
    """cuDNN's threshold at 32 rows and the smallest bucket at 32, so that CPU shapes stay
    small; the ragged call in plain torch, float32 standing in for the 16-bit dtypes."""
    monkeypatch.setattr(cudnn_prefill, "BUCKET_ROWS", 16)
    monkeypatch.setattr(cudnn_prefill, "MIN_ROWS", 32)
    monkeypatch.setattr(cudnn_ragged, "MIN_BUCKET", 32)
    monkeypatch.setattr(cudnn_ragged, "ragged_supported", lambda: True)
    monkeypatch.setattr(backend_module, "FLASH_DTYPES", (torch.float32,))
    stand_in = RaggedStandIn()
    monkeypatch.setattr(cudnn_ragged, "attend_ragged", stand_in)
    return stand_in


def _prepared(ragged: bool, per_prompt: list[int]):
    """A backend prepared over a 160-row fused buffer; its per-prompt calls recorded."""

    def attend(q, k, v, scale: float) -> torch.Tensor:
        per_prompt.append(q.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out

    attention = TritonPagedAttention(
        flash_fresh_prefill=True,
        cudnn_fresh_prefill=True,
        dense_attend=attend,
        cudnn_ragged_prompts=ragged,
    )
    fused = torch.randn(160, HEADS + 2 * KV_HEADS, HEAD_DIM)
    q, k, v = fused.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    attention.prepare(q, k, v, SCALE, max_rows=160)
    per_prompt.clear()
    return attention, (q, k, v)


@pytest.mark.parametrize("ragged", [True, False])
def test_a_run_of_prompts_takes_one_ragged_call_and_matches_the_torch_backend(
    small_shapes, ragged
) -> None:
    """Two decode rows, then fresh prompts of 40 and 33 rows: with the ragged call, one call
    for the run (bucket 64, starts after the decode rows) on each layer and none a prompt;
    without it, a call a prompt. Both match the torch backend; preparing built a plan for
    every (prompts, bucket) pair the buffer holds."""
    per_prompt: list[int] = []
    attention, (q, k, v) = _prepared(ragged, per_prompt)
    prepared = small_shapes.calls[:]
    if ragged:
        expected = {(n, 32) for n in range(1, 6)} | {(n, 64) for n in range(1, 5)}
        expected |= {(n, 128) for n in range(1, 4)} | {(1, 256)}
        assert {(len(starts) - 1, bucket) for starts, bucket in prepared} == expected
    else:
        assert prepared == []
    small_shapes.calls.clear()
    batch = make_paged_batch(
        [(16, 1), (20, 1), (0, 40), (0, 33)],
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        16,
        torch.float32,
        DEVICE,
        seed=4,
    )
    meta = dataclasses.replace(batch.meta, num_decodes=2)
    rows = batch.q.shape[0]
    for view, src in zip((q, k, v), (batch.q, batch.k, batch.v), strict=True):
        view[:rows].copy_(src)
    ref = TorchPagedAttention().forward(
        q[:rows], k[:rows], v[:rows], batch.pool.clone()[:, 1], meta, SCALE
    )
    for _layer in range(2):
        out = attention.forward(q[:rows], k[:rows], v[:rows], batch.kv_cache, meta, SCALE)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if ragged:
        assert small_shapes.calls == [([2, 42, 75], 64)] * 2 and per_prompt == []
    else:
        assert small_shapes.calls == [] and per_prompt == [48, 48, 48, 48]


@pytest.mark.gpu
@pytest.mark.skipif(
    not (cudnn_prefill.cudnn_prefill_supported(DEVICE.type) and cudnn_ragged.ragged_supported()),
    reason="needs cuDNN's ragged attention on an sm90+ GPU",
)
@pytest.mark.parametrize("fresh", [[900, 800], [2100, 2200], [1024, 1024, 1024]])
def test_cudnn_ragged_matches_the_torch_backend_at_model_shapes(monkeypatch, fresh) -> None:
    """cuDNN itself, bf16, Llama-8B heads: decode rows, the rest of a prompt over its cached
    context, then fresh prompts in one ragged call (none a prompt), against the torch
    backend."""
    heads, kv_heads, dim = 32, 8, 128
    cases = [(700, 1)] * 3 + [(1000, 300)] + [(0, n) for n in fresh]
    batch = make_paged_batch(cases, heads, kv_heads, dim, 16, torch.bfloat16, DEVICE, seed=6)
    meta = dataclasses.replace(batch.meta, num_decodes=3)
    rows = batch.q.shape[0]
    fused = torch.zeros(rows + 128, heads + 2 * kv_heads, dim, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)
    for view, src in zip((q, k, v), (batch.q, batch.k, batch.v), strict=True):
        view[:rows].copy_(src)
    ragged_calls: list[int] = []
    ragged = cudnn_ragged.attend_ragged

    def counted(*args, **kwargs):
        ragged_calls.append(1)
        return ragged(*args, **kwargs)

    per_prompt: list[int] = []

    def attend(q, k, v, scale: float) -> torch.Tensor:
        per_prompt.append(q.shape[2])
        return cudnn_prefill.cudnn_attend(q, k, v, scale)

    attention = TritonPagedAttention(
        flash_fresh_prefill=True,
        cudnn_fresh_prefill=True,
        dense_attend=attend,
        cudnn_ragged_prompts=True,
    )
    attention.prepare(q, k, v, dim**-0.5, max_rows=rows)
    per_prompt.clear()
    monkeypatch.setattr(cudnn_ragged, "attend_ragged", counted)
    ref = TorchPagedAttention().forward(
        q[:rows], k[:rows], v[:rows], batch.pool.clone()[:, 1], meta, dim**-0.5
    )
    out = attention.forward(q[:rows], k[:rows], v[:rows], batch.kv_cache, meta, dim**-0.5)
    assert ragged_calls == [1] and per_prompt == [] and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
