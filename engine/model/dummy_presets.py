"""`dummy:<preset>` names, the presets' architectures and their in-memory tokenizer.

Torch-free, so that the router builds the same tokenizer as the nodes without loading the
model code. The tokenizer is a byte-level BPE whose vocabulary covers every id of the
preset (the 256 byte symbols, bos/eos at the preset's ids, then letter strings "ab", " ab",
"abc", ... with the merges that build them), so any sampled id decodes to a non-empty
string and ordinary text encodes. Weights: engine/model/dummy.py.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator
from typing import Any

from splitserve.engine.model.arch import ModelArchConfig, RopeScaling

DUMMY_PREFIX = "dummy:"
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
