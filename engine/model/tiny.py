"""Tiny seeded test models in exact Hugging Face format.

`make_tiny_model(out_dir, arch, seed)` writes config.json, model.safetensors (float32),
generation_config.json and a byte-level BPE tokenizer (trained on `tiny_corpus.txt`) that
transformers loads offline. Same seed, same bytes. Weights are drawn with a wide spread
(std 0.4 for embeddings and most projections, norm scales around 1) so the logits' top-1
and top-2 sit far apart (median gap ~0.7) and float32 reduction-order noise (~3e-6 between
two implementations) cannot flip a greedy argmax. q/k projections get std 0.2: sharper
attention scores only amplify that noise.

Per architecture: llama has llama3 rope scaling and untied embeddings; mistral a sliding
window of 1024 (the usable context); qwen2 q/k/v biases and tied embeddings; qwen3 an
explicit head_dim, q/k norms, tied embeddings and a transformers-5 style config.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from splitserve.engine.model.arch import ARCHITECTURES, ModelArchConfig

logger = logging.getLogger(__name__)

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEIGHT_STD = 0.4
QK_STD = 0.2
NORM_STD = 0.2
BIAS_STD = 0.1

_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def make_tiny_model(out_dir: str | Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny `arch` model to `out_dir` (created if needed); returns the directory."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; pick one of {ARCHITECTURES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    config = tiny_hf_config(arch, vocab, bos, eos)
    weights = tiny_weights(ModelArchConfig.from_hf_config(config), seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    logger.info("wrote tiny %s model (vocab %d, seed %d) to %s", arch, vocab, seed, out)
    return out


def train_tokenizer() -> Any:
    """Byte-level BPE with VOCAB_SIZE entries (specials included) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = resources.files("splitserve.engine.model").joinpath("tiny_corpus.txt").read_text()
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        # Explicit, so that model-specific tokenizer classes (transformers picks
        # Qwen2Tokenizer for qwen2 whatever tokenizer_class says) add no tokens of their own.
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def tiny_hf_config(arch: str, vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": [_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": arch in ("qwen2", "qwen3"),
    }
    if arch == "qwen3":
        # transformers-5 layout: rope parameters nested, `dtype` instead of `torch_dtype`.
        config.update(
            dtype="float32",
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=3,
        )
        return config
    config.update(torch_dtype="float32", rope_theta=10000.0)
    if arch == "llama":
        config.update(
            attention_bias=False,
            mlp_bias=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        )
    elif arch == "mistral":
        config.update(sliding_window=1024)
    else:
        config.update(use_sliding_window=False, sliding_window=2048, max_window_layers=3)
    return config


def tiny_weights(arch: ModelArchConfig, seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors drawn in a fixed order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, mean: float = 0.0, std: float = WEIGHT_STD) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    hidden, inter = arch.hidden_size, arch.intermediate_size
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(arch.vocab_size, hidden)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = normal(hidden, mean=1.0, std=NORM_STD)
        for name, rows in (("q", arch.q_size), ("k", arch.kv_size), ("v", arch.kv_size)):
            std = QK_STD if name in ("q", "k") else WEIGHT_STD
            out[p + f"self_attn.{name}_proj.weight"] = normal(rows, hidden, std=std)
            if arch.attention_bias:
                out[p + f"self_attn.{name}_proj.bias"] = normal(rows, std=BIAS_STD)
        out[p + "self_attn.o_proj.weight"] = normal(hidden, arch.q_size)
        if arch.qk_norm:
            out[p + "self_attn.q_norm.weight"] = normal(arch.head_dim, mean=1.0, std=NORM_STD)
            out[p + "self_attn.k_norm.weight"] = normal(arch.head_dim, mean=1.0, std=NORM_STD)
        out[p + "post_attention_layernorm.weight"] = normal(hidden, mean=1.0, std=NORM_STD)
        out[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        out[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        out[p + "mlp.down_proj.weight"] = normal(hidden, inter)
    out["model.norm.weight"] = normal(hidden, mean=1.0, std=NORM_STD)
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = normal(arch.vocab_size, hidden)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
