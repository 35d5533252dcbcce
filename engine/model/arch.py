"""Model architecture parsed from a Hugging Face `config.json` dict.

`ModelArchConfig.from_hf_config(d)` accepts transformers-4 style configs (`rope_theta`,
`rope_scaling`, `torch_dtype` at the top level) and transformers-5 style ones (rope
parameters under `rope_parameters`, `dtype`). Only what the Llama-family forward needs is
kept; anything that would silently change the math (an unknown rope scaling, a partial
rotary factor, an activation other than SiLU) is rejected with a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

Architecture = Literal["llama", "mistral", "qwen2", "qwen3"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
ROPE_SCALING_TYPES = ("llama3", "linear")

# HF `architectures` entries and `model_type` values we run.
_HF_CLASSES: dict[str, Architecture] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_SUPPORTED_HINT = "supported: " + ", ".join(f"{c} ({a})" for c, a in _HF_CLASSES.items())


@dataclass(frozen=True)
class RopeScaling:
    # "llama3" (Llama 3.1 frequency-dependent scaling) or "linear" (position interpolation).
    rope_type: str
    factor: float
    # llama3 only: wavelength band edges as fractions of the pre-training context.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArchConfig:
    """Shapes and options of one Llama-family model.

    Mistral's sliding window: when `sliding_window` is set and smaller than
    `max_position_embeddings`, the usable context (`max_context_len`) is capped at the
    window, so full causal attention over the context equals sliding-window attention and
    no window mask is ever needed. Qwen2/Qwen3 only count a window when
    `use_sliding_window` is true.
    """

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Bias on q/k/v projections (qwen2 always; llama/qwen3 when `attention_bias`).
    attention_bias: bool = False
    # Bias on o_proj (llama/qwen3 `attention_bias`; never on qwen2 or mistral).
    o_proj_bias: bool = False
    # Bias on gate/up/down projections (llama `mlp_bias`).
    mlp_bias: bool = False
    # Per-head RMSNorm of q and k before rope (qwen3).
    qk_norm: bool = False
    # Attention window in tokens; None: full attention.
    sliding_window: int | None = None
    # Checkpoint dtype name ("bfloat16", ...); None when the config has none.
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def max_context_len(self) -> int:
        """Longest sequence the model runs: max_position_embeddings, capped by the window."""
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            return self.sliding_window
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArchConfig:
        arch = _architecture(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; only 'silu' is")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope(cfg)
        bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or (arch != "mistral" and bias),
            o_proj_bias=arch in ("llama", "qwen3") and bias,
            mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_window=int(window) if window else None,
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )


def _architecture(cfg: dict[str, Any]) -> Architecture:
    for name in cfg.get("architectures") or ():
        if name in _HF_CLASSES:
            return _HF_CLASSES[name]
    names = cfg.get("architectures")
    model_type = cfg.get("model_type")
    if not names and model_type in ARCHITECTURES:
        return model_type  # type: ignore[return-value]
    raise ValueError(
        f"unsupported model architecture (architectures={names}, model_type={model_type!r}); "
        f"{_SUPPORTED_HINT}"
    )


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_theta`/`rope_scaling` or transformers-5 `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_TYPES:
        raise ValueError(
            f"rope scaling {rope_type!r} is not supported; supported: none (default), "
            + ", ".join(ROPE_SCALING_TYPES)
        )
    factor = float(merged["factor"])
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    original = merged.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192)
    )
    return theta, RopeScaling(
        "llama3",
        factor,
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
