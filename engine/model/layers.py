"""Building blocks of the Llama-family forward over a flattened batch of T tokens.

Every op with more than one implementation (norm, rotary, activation, attention) comes
from the `ModelKernels` the model is built with (kernels/registry.py), chosen once by
configuration; layers never look at the device. Parameters are created with `torch.empty`
(no init) on the current default device in the dtype given at construction; the loader
(or the dummy initialiser) fills them. q/k/v and gate/up are fused into one matmul each
(`qkv_proj`, `gate_up_proj`); the loader writes the HF checkpoint's separate tensors into
their row slices. Each layer writes its K/V into the pool before its attention, with its
rotary (one kernel on the Triton backend), and attends with `kv_stored` metadata.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.model.arch import ModelArchConfig, RopeScaling
from splitserve.kernels import torch_ops
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.registry import ModelKernels, torch_kernels

# (k, v, one layer's pool view, slot_mapping) -> None: the attention backend's `store`.
StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`out` ([T, out_features], for a 2-D x): written with the result, and returned."""
        if out is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)


class Embedding(nn.Module):
    """Token embedding table [vocab, hidden]; also the LM head's weight when tied."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = empty_param(num_embeddings, dim, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden -> float32 logits; shares `tied_weight` when given."""

    def __init__(
        self, vocab_size: int, dim: int, dtype: torch.dtype, tied_weight: nn.Parameter | None
    ):
        super().__init__()
        if tied_weight is None:
            tied_weight = empty_param(vocab_size, dim, dtype=dtype)
        self.weight = tied_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim; the statistics are taken in float32."""

    def __init__(
        self, size: int, eps: float, dtype: torch.dtype, kernels: ModelKernels | None = None
    ):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype)
        self.kernels = kernels if kernels is not None else torch_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return torch_ops.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor, residual_out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the decoder's residual add and the next norm
        (one fused kernel with the Triton backend); the sum goes into `residual_out` if
        given."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps, residual_out)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with llama3 or linear scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths divided by factor, short kept, a smooth blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rope (rotate halves). cos/sin are tabulated in float32 for every position
    and cast to the activations' dtype when applied. q and k are rotated in place."""

    def __init__(self, arch: ModelArchConfig, kernels: ModelKernels | None = None):
        super().__init__()
        self.kernels = kernels if kernels is not None else torch_kernels()
        inv_freq = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        positions = torch.arange(arch.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # [max_position, 2, head_dim] float32; not saved with the weights.
        self.cos_sin: torch.Tensor
        self.register_buffer(
            "cos_sin", torch.stack((emb.cos(), emb.sin()), dim=1), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, KVH, D], positions: [T]; both rotated in place and returned.
        self.kernels.rotary_(positions, q, k, self.cos_sin)
        return q, k

    def rotate_and_store(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # one layer's pool view
        slot_mapping: torch.Tensor,
        store: StoreKV,
    ) -> None:
        """Rotate q and k in place and write the rotated k and v at `slot_mapping` (-1
        skipped): one kernel where the kernels have it (Triton), else the rotation and
        then `store` (the attention backend's)."""
        if self.kernels.rotary_store_ is not None:
            self.kernels.rotary_store_(positions, q, k, v, self.cos_sin, kv_cache, slot_mapping)
            return
        self.kernels.rotary_(positions, q, k, self.cos_sin)
        store(k, v, kv_cache, slot_mapping)

    def reference(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Out of place, plain torch (what tests compare against)."""
        return torch_ops.rotary(positions, q, k, self.cos_sin)


class Attention(nn.Module):
    """The projection, rotary and K/V store (`project`), attention (`attend`) and output
    projection (`o_proj`) that `DecoderLayer.pre` and `.post` call in turn."""

    def __init__(
        self, arch: ModelArchConfig, layer_idx: int, kernels: ModelKernels, dtype: torch.dtype
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = kernels.attention
        self.num_heads, self.num_kv_heads = arch.num_heads, arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size, self.kv_size = arch.q_size, arch.kv_size
        self.scale = arch.head_dim**-0.5
        qkv_out = arch.q_size + 2 * arch.kv_size
        self.qkv_proj = Linear(arch.hidden_size, qkv_out, arch.attention_bias, dtype)
        self.o_proj = Linear(arch.q_size, arch.hidden_size, arch.o_proj_bias, dtype)
        self.q_norm, self.k_norm = None, None
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, kernels)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, kernels)

    def project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [T], -1: not stored
        qkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, KVH, D]: projected, normed (qk-norm models), rotated,
        and k and v written into this layer's pool at `slot_mapping`
        (`RotaryEmbedding.rotate_and_store`); `attend` then takes metadata with
        `kv_stored`. With `qkv_out` ([T, q_size + 2 * kv_size]) the projection is written
        there, and q, k and v are views of it, except q and k of qk-norm models (the norm
        makes new ones)."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, out=qkv_out)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        kv = kv_cache[:, self.layer_idx]
        rotary.rotate_and_store(positions, q, k, v, kv, slot_mapping, self.backend.store)
        return q, k, v

    def prepare_backend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_rows: int
    ) -> None:
        """Tell the attention backend (shared by every layer) that steps will take q/k/v
        as row slices of these static buffers, of at least `max_rows` rows."""
        self.backend.prepare(q, k, v, self.scale, max_rows)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, H, D]
        """Store k/v into this layer's pool (unless `meta.kv_stored`) and attend over each
        sequence's context (into `out` when given)."""
        kv = kv_cache[:, self.layer_idx]
        return self.backend.forward(q, k, v, kv, meta, self.scale, out=out)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused."""

    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype, kernels: ModelKernels):
        super().__init__()
        self.activation = kernels.silu_mul
        self.gate_up_proj = Linear(
            arch.hidden_size, 2 * arch.intermediate_size, arch.mlp_bias, dtype
        )
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, arch.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: ModelArchConfig, layer_idx: int, kernels: ModelKernels, dtype: torch.dtype
    ):
        super().__init__()
        eps = arch.rms_norm_eps
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, dtype, kernels)
        self.self_attn = Attention(arch, layer_idx, kernels, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, dtype, kernels)
        self.mlp = MLP(arch, dtype, kernels)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried unsummed: the layer gets the previous layer's
        output `x` and the stream before it (`residual`, None for the first layer), and
        returns its MLP output with the stream before that; the next norm adds them.
        The layer stores its K/V with its rotary (`pre`, at `meta.slot_mapping`), so its
        attention only attends (with metadata that says `kv_stored`: the caller's when it
        says so already, as the model's forward makes it once a step)."""
        q, k, v, residual = self.pre(x, residual, positions, rotary, kv_cache, meta.slot_mapping)
        if not meta.kv_stored:
            meta = dataclasses.replace(meta, kv_stored=True)
        return self.post(self.self_attn.attend(q, k, v, kv_cache, meta), residual)

    def pre(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        qkv_out: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before attention, K/V stored (`Attention.project`): (q, k, v, residual
        stream). The projection goes into `qkv_out` and the residual sum into
        `residual_out` when given (the piecewise graphs' static buffers); the first layer's
        residual stream is `x` itself."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual, residual_out)
        attn = self.self_attn
        return (*attn.project(h, positions, rotary, kv_cache, slot_mapping, qkv_out), residual)

    def post(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after attention (`attn`: [T, H, D]): (MLP output, residual stream)."""
        h = self.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual
