"""Model loading: an HF directory (config.json + safetensors + tokenizer) or `dummy:<preset>`.

`load_model(ModelConfig, kernels) -> LoadedModel` is what the engine calls once at
start-up. Other `--model` forms (a .gguf file, a cached ORG/NAME repo id, a built-in name)
are resolved to an HF directory first by `source.resolve_model_source`. HF checkpoints
come as one `model.safetensors` or shards listed in `model.safetensors.index.json`; the
separate q/k/v and gate/up tensors are written into the model's fused projections.
Embeddings are tied when the config says so or the checkpoint has no `lm_head.weight`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from splitserve.engine.config import ModelConfig
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.dummy_presets import DUMMY_PREFIX
from splitserve.engine.model.llama import CausalLM
from splitserve.engine.model.source import resolve_model_source
from splitserve.engine.model.writers import model_writers
from splitserve.kernels.registry import ModelKernels

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}
# HF projection name -> (fused parameter, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DIR_HINT = (
    "pass a local Hugging Face model directory (config.json, *.safetensors, tokenizer files), "
    "e.g. `huggingface-cli download ORG/NAME --local-dir DIR`, make a test model with "
    "`splitserve make-tiny-model DIR`, or use random weights with `dummy:<preset>`"
)


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model directory or one of its required files is missing."""


class LoadedModel(NamedTuple):
    model: CausalLM
    arch: ModelArchConfig
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    max_model_len: int
    dtype: torch.dtype


def load_model(config: ModelConfig, kernels: ModelKernels) -> LoadedModel:
    if config.model.startswith(DUMMY_PREFIX):
        from splitserve.engine.model.dummy import load_dummy_model

        return load_dummy_model(config, kernels)
    model_dir = resolve_model_source(config.model, writers=model_writers())
    hf_config = read_json(model_dir / "config.json")
    arch = ModelArchConfig.from_hf_config(hf_config)
    dtype = resolve_dtype(config.dtype, arch.torch_dtype)
    max_model_len = resolve_max_model_len(config.max_model_len, arch)
    if config.load_format == "dummy":
        from splitserve.engine.model.dummy import random_model

        model = random_model(str(model_dir), arch, kernels, dtype, config)
    else:
        model = _checkpoint_model(model_dir, arch, kernels, dtype, config.device)
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    eos = eos_token_ids(model_dir, arch, tokenizer)
    return LoadedModel(model, arch, tokenizer, eos, max_model_len, dtype)


def _checkpoint_model(
    model_dir: Path, arch: ModelArchConfig, kernels: ModelKernels, dtype: torch.dtype, device: str
) -> CausalLM:
    weight_files = safetensors_files(model_dir)
    names = _tensor_names(weight_files)
    tie = arch.tie_word_embeddings or "lm_head.weight" not in names
    with torch.device(device):
        model = CausalLM(arch, kernels, dtype, tie_word_embeddings=tie)
    load_weights(model, weight_files)
    logger.info(
        "loaded %s (%s, %d layers, %s) from %d file(s)",
        model_dir,
        arch.architecture,
        arch.num_layers,
        dtype,
        len(weight_files),
    )
    return model


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelNotFoundError(f"{path} not found; {_DIR_HINT}")
    with path.open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def resolve_dtype(requested: str, checkpoint_dtype: str | None) -> torch.dtype:
    """ModelConfig.dtype -> torch dtype; "auto" takes the checkpoint's (float32 if none)."""
    name = requested if requested != "auto" else (checkpoint_dtype or "float32")
    name = name.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; pass one of float32, bfloat16, float16")
    return _DTYPES[name]


def resolve_max_model_len(requested: int | None, arch: ModelArchConfig) -> int:
    limit = arch.max_context_len
    if requested is None:
        return limit
    if requested > limit:
        why = f"max_position_embeddings={arch.max_position_embeddings}"
        if limit < arch.max_position_embeddings:
            why += f", capped by sliding_window={arch.sliding_window}"
        raise ValueError(
            f"max_model_len={requested} is more than the model supports ({limit}: {why}); "
            "lower max_model_len or leave it unset"
        )
    return requested


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{model_dir} is missing shard(s) {missing} listed in {index.name}; "
                "download the complete checkpoint"
            )
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir}; only "
        "safetensors checkpoints load (convert .bin/.pt weights with transformers' "
        "save_pretrained(..., safe_serialization=True))"
    )


def _tensor_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


def load_weights(model: CausalLM, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its (slice of a) parameter; raise on gaps."""
    params = dict(model.named_parameters())
    needed = {(n, s) for n in params for s in range(_num_shards(n))}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.is_tied):
                    continue
                target, shard = _map_name(name)
                if target not in params:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has no place in a {model.arch.architecture} "
                        "model; is config.json's architecture right for these weights?"
                    )
                _copy_shard(params[target], target, shard, f.get_tensor(name), model.arch)
                needed.discard((target, shard))
    if needed:
        listed = sorted(f"{n}[{s}]" if _num_shards(n) > 1 else n for n, s in needed)
        raise ValueError(f"the checkpoint lacks weights for {listed[:8]} ({len(listed)} in all)")


def _num_shards(param_name: str) -> int:
    if ".qkv_proj." in param_name:
        return 3
    return 2 if ".gate_up_proj." in param_name else 1


def _map_name(name: str) -> tuple[str, int]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        return ".".join([*parts[:-2], fused, parts[-1]]), shard
    return name, 0


def _copy_shard(
    param: torch.Tensor, name: str, shard: int, tensor: torch.Tensor, arch: ModelArchConfig
) -> None:
    if ".qkv_proj." in name:
        sizes = [arch.q_size, arch.kv_size, arch.kv_size]
    elif ".gate_up_proj." in name:
        sizes = [arch.intermediate_size] * 2
    else:
        sizes = [param.shape[0]]
    start = sum(sizes[:shard])
    dest = param.data[start : start + sizes[shard]]
    if dest.shape != tensor.shape:
        raise ValueError(
            f"weight {name} (shard {shard}) has shape {tuple(tensor.shape)} in the checkpoint "
            f"but config.json implies {tuple(dest.shape)}; config and weights disagree"
        )
    dest.copy_(tensor)


def load_tokenizer(model_dir: Path) -> Any:
    from splitserve.engine.model.tokenizer_files import load_dir_tokenizer

    try:
        return load_dir_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load a tokenizer from {model_dir} ({exc}); the directory needs "
            "tokenizer.json and tokenizer_config.json"
        ) from exc


def eos_token_ids(model_dir: Path, arch: ModelArchConfig, tokenizer: Any) -> frozenset[int]:
    """generation_config.json's eos ids, else config.json's, else the tokenizer's."""
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        value = read_json(gen_path).get("eos_token_id")
        if value is not None:
            return frozenset([value] if isinstance(value, int) else value)
    if arch.eos_token_ids:
        return frozenset(arch.eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos])
