"""`CausalLM`: the Llama-family model (Llama, Mistral, Qwen2, Qwen3) over the paged KV pool.

The model runner calls, once per step:

    hidden = model(input_ids, positions, kv_cache, meta)   # [T, hidden], stores K/V too
    logits = model.compute_logits(hidden[sample_rows])     # [N, vocab] float32

Layer i hands the view `kv_cache[:, i]` to the attention backend of its `ModelKernels`,
which stores the step's
K/V rows at `meta.slot_mapping` before attending. Build the model in the dtype it will
run in (the rope table stays float32); do not `.to(dtype)` it afterwards.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.layers import DecoderLayer, Embedding, LMHead, RMSNorm, RotaryEmbedding
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.registry import ModelKernels


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig, kernels: ModelKernels, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, kernels, dtype) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, kernels)
        self.rotary_emb = RotaryEmbedding(arch, kernels)


class CausalLM(nn.Module):
    def __init__(
        self,
        arch: ModelArchConfig,
        kernels: ModelKernels,
        dtype: torch.dtype = torch.float32,
        tie_word_embeddings: bool | None = None,
    ):
        """`tie_word_embeddings` overrides the config's (the loader ties when a checkpoint
        has no `lm_head.weight`). Parameters are uninitialised until loaded."""
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.model = LlamaModel(arch, kernels, dtype)
        tie = arch.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        self.is_tied = tie
        tied = self.model.embed_tokens.weight if tie else None
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, dtype, tied)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x = self.model.embed_tokens(input_ids)
        rotary = self.model.rotary_emb
        residual = None
        # Each layer stores its K/V with its rotary (one kernel on the Triton backend), so
        # its attention only attends.
        stored = dataclasses.replace(meta, kv_stored=True)
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, rotary, kv_cache, stored)
        if residual is None:
            return self.model.norm(x)
        return self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return self.lm_head(hidden)
