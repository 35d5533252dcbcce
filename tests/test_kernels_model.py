"""A tiny random decoder (RMSNorm -> qkv -> rope -> paged attention -> o_proj, with
residuals) run for three engine-like steps over one paged pool: chunked prefill, a mixed
prefill + decode step, an all-decode step. The Triton path (TritonPagedAttention, fused
RMSNorm, in-place rotary) must give the outputs and the pool of the torch path
(TorchPagedAttention, the model's RMSNorm and RotaryEmbedding modules).
"""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.layers import RMSNorm, RotaryEmbedding
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.attention_torch import TorchPagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global TritonPagedAttention, rmsnorm, apply_rotary_
    from splitserve.kernels.backend import TritonPagedAttention
    from splitserve.kernels.rmsnorm import rmsnorm
    from splitserve.kernels.rotary import apply_rotary_


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 64, 4, 2, 32, 2, 16
PROMPTS = [20, 37, 5]
# Tokens each sequence runs per step: chunked prefill, prefill rest + decodes, decodes.
STEPS = [[20, 16, 5], [1, 21, 1], [1, 1, 1]]


class TinyDecoder:
    def __init__(self, seed: int) -> None:
        gen = torch.Generator(device=DEVICE).manual_seed(seed)

        def rand(*shape: int, scale: float) -> torch.Tensor:
            return scale * torch.randn(*shape, generator=gen, device=DEVICE)

        qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        self.w_qkv = [rand(qkv_out, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
        self.w_o = [rand(HIDDEN, HEADS * HEAD_DIM, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
        self.norms = []
        for _ in range(LAYERS):
            norm = RMSNorm(HIDDEN, 1e-6, torch.float32).to(DEVICE)
            norm.weight.data = 1.0 + rand(HIDDEN, scale=0.1)
            self.norms.append(norm)
        arch = ModelArchConfig(
            architecture="llama", vocab_size=32, hidden_size=HIDDEN, intermediate_size=64,
            num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
            rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
            max_position_embeddings=256, tie_word_embeddings=False,
        )  # fmt: skip
        self.rope = RotaryEmbedding(arch).to(DEVICE)

    def forward(self, x, positions, pool, meta, fused: bool) -> torch.Tensor:
        backend = TritonPagedAttention() if fused else TorchPagedAttention()
        tokens, residual = x.shape[0], None
        for layer in range(LAYERS):
            norm = self.norms[layer]
            if fused and residual is None:
                (h, _), residual = rmsnorm(x, norm.weight, norm.eps), x
            elif fused:
                h, residual = rmsnorm(x, norm.weight, norm.eps, residual)
            else:
                residual = x if residual is None else x + residual
                h = norm(residual)
            q, k, v = (h @ self.w_qkv[layer].T).split(
                [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1
            )
            q = q.view(tokens, HEADS, HEAD_DIM)
            k = k.view(tokens, KV_HEADS, HEAD_DIM)
            v = v.view(tokens, KV_HEADS, HEAD_DIM)
            if fused:
                apply_rotary_(positions, q, k, self.rope.cos_sin)
            else:
                q, k = self.rope(positions, q, k)
            out = backend.forward(q, k, v, pool[:, layer], meta, HEAD_DIM**-0.5)
            x = out.reshape(tokens, HEADS * HEAD_DIM) @ self.w_o[layer].T
        return x + residual


def _step(tables: torch.Tensor, cached: list[int], new: list[int]):
    """Metadata, positions of one step; sequences with 0 new tokens are left out."""
    rows = [b for b, n in enumerate(new) if n > 0]
    positions = torch.cat([torch.arange(cached[b], cached[b] + new[b]) for b in rows])
    seq_of = torch.cat([torch.full((new[b],), b) for b in rows])
    slots = tables.cpu()[seq_of, positions // BLOCK].long() * BLOCK + positions % BLOCK
    query_lens = [new[b] for b in rows]
    seq_lens = [cached[b] + new[b] for b in rows]
    meta = AttentionMetadata(
        slot_mapping=slots.to(DEVICE),
        query_start_loc=torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32).to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables[rows],
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return meta, positions.to(DEVICE)


def test_triton_backend_matches_torch_backend_on_tiny_decoder() -> None:
    _check_tiny_decoder(seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")
def test_triton_backend_matches_torch_backend_on_tiny_decoder_gpu() -> None:
    _check_tiny_decoder(seed=1)


def _check_tiny_decoder(seed: int) -> None:
    model = TinyDecoder(seed=seed)
    max_blocks = -(-(max(PROMPTS) + 2) // BLOCK)
    num_blocks = len(PROMPTS) * max_blocks + 2
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
    tables = order[: len(PROMPTS) * max_blocks].view(len(PROMPTS), max_blocks)
    tables = tables.to(torch.int32).to(DEVICE)
    shape = (num_blocks, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM)
    pools = {fused: torch.full(shape, float("nan"), device=DEVICE) for fused in (False, True)}
    cached = [0] * len(PROMPTS)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    for step, new in enumerate(STEPS):
        meta, positions = _step(tables, cached, new)
        assert meta.is_all_decode == (step == 2)
        x = torch.randn(positions.shape[0], HIDDEN, generator=gen, device=DEVICE)
        ref = model.forward(x, positions, pools[False], meta, fused=False)
        out = model.forward(x, positions, pools[True], meta, fused=True)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pools[True], pools[False], atol=1e-4, rtol=1e-4, equal_nan=True)
        cached = [c + n for c, n in zip(cached, new, strict=True)]
