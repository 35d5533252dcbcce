"""A run of long fresh prompts in one ragged cuDNN call (kernels/cudnn_ragged.py): the
bucket and shape arithmetic, the views a plan fits, and the backend taking the call for a
run it has a plan for, matching the torch backend, with each prompt's rows given as
element offsets into the run's q/k/v/out.

On the CPU a plain-torch `RaggedAttention` stands in for cuDNN's (its plans and call the
only parts that differ), at a smaller bucket and threshold; on an sm90 GPU the
`gpu`-marked test builds cuDNN's plans through its frontend and runs them at model shapes.
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


def test_buckets_and_shapes() -> None:
    """The longest prompt rounds up to a power of two from MIN_BUCKET; a bucket's runs hold
    one prompt over half of it and the rest at cuDNN's shortest."""
    buckets = [cudnn_ragged.ragged_bucket(n) for n in (768, 1024, 1025, 2048, 3000)]
    assert buckets == [1024, 1024, 2048, 2048, 4096]
    assert cudnn_ragged.max_sequences(1024, 8192) == 10  # 10 x 768 rows
    assert cudnn_ragged.max_sequences(2048, 8192) == 1 + (8192 - 1025) // 768
    assert cudnn_ragged.max_sequences(8192, 8192) == 1 + (8192 - 4097) // 768
    assert cudnn_ragged.max_sequences(16384, 8192) == 0
    shapes = cudnn_ragged.shapes_up_to(3000)
    assert shapes == [
        (1, 1024),
        (2, 1024),
        (3, 1024),
        (1, 2048),
        (2, 2048),
        (3, 2048),
        (1, 4096),
        (2, 4096),
    ]


def test_strides_fit_only_views_like_the_prepared_ones() -> None:
    """Views of the fused buffer with a contiguous output fit; a copied q or an output with
    other row strides do not."""
    fused = torch.zeros(64, HEADS + 2 * KV_HEADS, HEAD_DIM)
    q, k, v = fused.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    strides = cudnn_ragged.Strides.of(q, k, v, HEADS * HEAD_DIM)
    out = torch.zeros(64, HEADS, HEAD_DIM)
    assert strides.fits(q[8:40], k[8:40], v[8:40], out[8:40])
    assert not strides.fits(q[8:40].clone(), k[8:40], v[8:40], out[8:40])
    wide = torch.zeros(64, HEADS, 2 * HEAD_DIM)[:, :, :HEAD_DIM]
    assert not strides.fits(q, k, v, wide)


class TorchRagged(cudnn_ragged.RaggedAttention):
    """cuDNN's ragged call in plain torch: each prompt found from the run's element offsets
    and lengths, attended over its own rows, written at its rows of `out`; records each
    call's prompt rows and bucket."""

    def __init__(self, strides: cudnn_ragged.Strides, scale: float) -> None:
        super().__init__(None, None, strides, scale)
        self.calls: list[tuple[list[int], int]] = []

    def build(self, prompts: int, bucket: int, device: torch.device) -> None:
        self._plans[(prompts, bucket)] = None  # type: ignore[assignment]

    def attend(self, q, k, v, out, inputs, bucket: int) -> None:
        assert (inputs.lens.shape[0], bucket) in self.shapes
        s = self.strides
        rows = (inputs.q.flatten() // s.q).tolist()
        assert rows == (inputs.k.flatten() // s.k).tolist() == (inputs.v.flatten() // s.v).tolist()
        assert rows == (inputs.out.flatten() // s.out).tolist()
        lens = inputs.lens.flatten().tolist()
        assert [end - start for start, end in itertools.pairwise(rows)] == lens
        assert max(lens) <= bucket
        self.calls.append((rows, bucket))
        for start, end in itertools.pairwise(rows):
            heads = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            result = F.scaled_dot_product_attention(
                *heads, is_causal=True, scale=self.scale, enable_gqa=True
            )
            out[start:end] = result[0].transpose(0, 1)


@pytest.fixture
def prepared(monkeypatch) -> list[TorchRagged]:
    """cuDNN's threshold at 32 rows and the smallest bucket at 32, so that CPU shapes stay
    small; the ragged plans in plain torch (each one made listed), float32 standing in for
    the 16-bit dtypes."""
    monkeypatch.setattr(cudnn_prefill, "BUCKET_ROWS", 16)
    monkeypatch.setattr(cudnn_prefill, "MIN_ROWS", 32)
    monkeypatch.setattr(cudnn_ragged, "MIN_BUCKET", 32)
    monkeypatch.setattr(backend_module, "FLASH_DTYPES", (torch.float32,))
    made: list[TorchRagged] = []

    def prepare(q, k, v, scale: float, max_rows: int) -> TorchRagged:
        ragged = TorchRagged(cudnn_ragged.Strides.of(q, k, v, q.shape[1] * q.shape[2]), scale)
        for prompts, bucket in cudnn_ragged.shapes_up_to(min(max_rows, q.shape[0])):
            ragged.build(prompts, bucket, q.device)
        made.append(ragged)
        return ragged

    monkeypatch.setattr(cudnn_ragged, "prepare_ragged", prepare)
    return made


def _backend(ragged: bool, per_prompt: list[int]):
    """A backend prepared over a 160-row fused buffer (the buffer's q/k/v returned); its
    per-prompt cuDNN calls recorded."""

    def attend(q, k, v, scale: float) -> torch.Tensor:
        per_prompt.append(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

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
    prepared, ragged
) -> None:
    """Two decode rows, the rest of a prompt over its cached context, then fresh prompts of
    40 and 33 rows: with the ragged plans, one call for the fresh run on each layer (bucket
    64, the prompts at rows 0 and 40 of the run) and none a prompt; without them, a call a
    prompt. Both match the torch backend."""
    per_prompt: list[int] = []
    attention, (q, k, v) = _backend(ragged, per_prompt)
    assert len(prepared) == (1 if ragged else 0)
    cases = [(16, 1), (20, 1), (30, 5), (0, 40), (0, 33)]
    batch = make_paged_batch(cases, HEADS, KV_HEADS, HEAD_DIM, 16, torch.float32, DEVICE, seed=4)
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
        assert prepared[0].calls == [([0, 40, 73], 64)] * 2 and per_prompt == []
    else:
        assert per_prompt == [48, 48, 48, 48]


def test_views_unlike_the_prepared_ones_keep_a_call_a_prompt(prepared) -> None:
    """q/k/v that are not views with the prepared buffer's strides (an eager step's own
    tensors) take a call a prompt, and match the torch backend."""
    per_prompt: list[int] = []
    attention, _ = _backend(True, per_prompt)
    batch = make_paged_batch(
        [(16, 1), (0, 40), (0, 33)], HEADS, KV_HEADS, HEAD_DIM, 16, torch.float32, DEVICE, seed=5
    )
    meta = dataclasses.replace(batch.meta, num_decodes=1)
    q, k, v = (
        torch.cat([x, torch.randn_like(x[:16])])[: x.shape[0]] for x in (batch.q, batch.k, batch.v)
    )
    ref = TorchPagedAttention().forward(q, k, v, batch.pool.clone()[:, 1], meta, SCALE)
    out = attention.forward(q, k, v, batch.kv_cache, meta, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert prepared[0].calls == [] and per_prompt == [48, 48]


def _has_frontend() -> bool:
    try:
        import cudnn  # noqa: F401  (nvidia-cudnn-frontend)
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(
    not (cudnn_prefill.cudnn_prefill_supported(DEVICE.type) and _has_frontend()),
    reason="needs cuDNN and its frontend (nvidia-cudnn-frontend) on an sm90+ GPU",
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
    ragged = cudnn_ragged.RaggedAttention.attend

    def counted(self, *args, **kwargs):
        ragged_calls.append(1)
        return ragged(self, *args, **kwargs)

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
    monkeypatch.setattr(cudnn_ragged.RaggedAttention, "attend", counted)
    ref = TorchPagedAttention().forward(
        q[:rows], k[:rows], v[:rows], batch.pool.clone()[:, 1], meta, dim**-0.5
    )
    out = attention.forward(q[:rows], k[:rows], v[:rows], batch.kv_cache, meta, dim**-0.5)
    assert ragged_calls == [1] and per_prompt == [] and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
