"""`dummy:<preset>` models: random weights of a real shape, for benchmarks without weights.

Weights are drawn straight on the target device in the target dtype (std 0.02, norm
scales 1), seeded by `ModelConfig.seed`. The tokenizer is built in memory: a byte-level
BPE whose vocabulary covers every id of the preset (the 256 byte symbols, bos/eos at the
preset's ids, then letter strings "ab", " ab", "abc", ... with the merges that build them),
so any sampled id decodes to a non-empty string and ordinary text encodes.
"""

from __future__ import annotations

import itertools
import logging
import string
from collections.abc import Iterator
from typing import Any

import torch

from splitserve.engine.attention import AttentionBackend
from splitserve.engine.config import ModelConfig
from splitserve.engine.model.arch import ModelArchConfig, RopeScaling
from splitserve.engine.model.llama import CausalLM
from splitserve.engine.model.loader import (
    DUMMY_PREFIX,
    LoadedModel,
    resolve_dtype,
    resolve_max_model_len,
)

logger = logging.getLogger(__name__)

DUMMY_PRESETS: dict[str, ModelArchConfig] = {
    "llama-3.1-8b": ModelArchConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "qwen3-0.6b": ModelArchConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        torch_dtype="bfloat16",
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
    ),
    "tiny": ModelArchConfig(
        architecture="llama",
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        # Long enough for the long-prompt benchmarks (8k and more tokens).
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_ids=(1,),
    ),
}
INIT_STD = 0.02
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def dummy_arch(model: str) -> ModelArchConfig:
    """`dummy:<preset>` (or the bare preset name) -> its architecture."""
    name = model.removeprefix(DUMMY_PREFIX)
    if name not in DUMMY_PRESETS:
        raise ValueError(
            f"unknown dummy preset {name!r}; pick one of "
            + ", ".join(DUMMY_PREFIX + p for p in DUMMY_PRESETS)
        )
    return DUMMY_PRESETS[name]


def load_dummy_model(config: ModelConfig, attn_backend: AttentionBackend) -> LoadedModel:
    arch = dummy_arch(config.model)
    dtype = resolve_dtype(config.dtype, arch.torch_dtype)
    max_model_len = resolve_max_model_len(config.max_model_len, arch)
    with torch.device(config.device):
        model = CausalLM(arch, attn_backend, dtype)
    init_dummy_weights(model, config.seed)
    model.eval()
    tokenizer = build_dummy_tokenizer(arch)
    logger.info("built %s with random weights (%s, seed %d)", config.model, dtype, config.seed)
    return LoadedModel(model, arch, tokenizer, frozenset(arch.eos_token_ids), max_model_len, dtype)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Norm scales 1, biases 0, everything else N(0, INIT_STD), drawn on the params' device."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            if param.device not in generators:
                generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            param.normal_(0.0, INIT_STD, generator=generators[param.device])


def byte_symbols() -> list[str]:
    """The byte-level alphabet: byte b -> a printable character (GPT-2's mapping)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def _letter_tokens() -> Iterator[tuple[str, str, str]]:
    """(token, left, right) for "Ġa".., "ab", "Ġab", "abc", ...; left is always emitted
    (or a byte symbol) before the token that extends it."""
    space = byte_symbols()[ord(" ")]
    letters = string.ascii_lowercase
    for c in letters:
        yield space + c, space, c
    for length in itertools.count(2):
        for combo in itertools.product(letters, repeat=length):
            word = "".join(combo)
            yield word, word[:-1], word[-1]
            yield space + word, space + word[:-1], word[-1]


def build_dummy_tokenizer(arch: ModelArchConfig) -> Any:
    """PreTrainedTokenizerFast with exactly arch.vocab_size ids, all decodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials: dict[int, str] = {}
    if arch.bos_token_id is not None:
        specials[arch.bos_token_id] = "<|bos|>"
    for i, eos in enumerate(arch.eos_token_ids):
        specials.setdefault(eos, "<|eos|>" if i == 0 else f"<|eos_{i}|>")
    free_ids = (i for i in range(arch.vocab_size) if i not in specials)
    vocab: dict[str, int] = {tok: i for i, tok in specials.items()}
    vocab.update(zip(byte_symbols(), free_ids, strict=False))
    merges: list[tuple[str, str]] = []
    for token_id, (token, left, right) in zip(free_ids, _letter_tokens(), strict=False):
        vocab[token] = token_id
        merges.append((left, right))
    if len(vocab) != arch.vocab_size:
        raise ValueError(f"dummy vocabulary has {len(vocab)} ids, expected {arch.vocab_size}")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None if arch.bos_token_id is None else specials[arch.bos_token_id],
        eos_token=specials[arch.eos_token_ids[0]] if arch.eos_token_ids else None,
        model_max_length=arch.max_context_len,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(set(specials.values()))})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
