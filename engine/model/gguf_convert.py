"""GGUF -> safetensors HF directory, once per file, atomically.

`convert_gguf(gguf_path, out_dir)` is called by `source.converted_gguf_dir` when the cache
holds no conversion yet. It checks the file's header (readable GGUF, an architecture the
engine runs), dequantizes the weights to float32 with transformers (`gguf_file=`, as vLLM
and transformers read GGUF), and writes `model.safetensors`, `config.json`,
`generation_config.json` and the tokenizer files, chat template included, taken from
the GGUF metadata.

Atomicity: the files are written into a `.<name>.partial-*` folder beside `out_dir` and
renamed into place only when complete, so an interrupted conversion leaves nothing a
later start trusts. A lock file serialises concurrent conversions of one model (nodes
started together); whoever takes the lock second finds the finished directory, and the
lock holder removes partial folders that killed conversions left behind.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from splitserve.engine.model.source import MODEL_EXTRA_HINT, ModelSourceError

logger = logging.getLogger(__name__)

# GGUF `general.architecture` values the engine runs (Mistral GGUFs say "llama").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_REQUIRED_MODULES = ("gguf", "accelerate")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF directory of `gguf_path` at `out_dir` unless another process did."""
    require_model_extra()
    architecture = gguf_architecture(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "config.json").is_file():
            return
        _remove_partials(out_dir)
        size_mb = gguf_path.stat().st_size / 1e6
        logger.info(
            "converting %s (%s, %.0f MB) to a safetensors model in %s; once, later starts "
            "load it directly",
            gguf_path.name,
            architecture,
            size_mb,
            out_dir,
        )
        start = time.monotonic()
        partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        try:
            write_hf_dir(gguf_path, partial)
            partial.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache
            os.rename(partial, out_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - start)


def require_model_extra() -> None:
    missing = [m for m in _REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelSourceError(f"reading GGUF files needs {', '.join(missing)}; {MODEL_EXTRA_HINT}")


def gguf_architecture(gguf_path: Path) -> str:
    """The file's `general.architecture`; a clear error if unreadable or unsupported."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
        field = reader.get_field("general.architecture")
        architecture = str(field.contents()) if field is not None else ""
    except (ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise ModelSourceError(
            f"{gguf_path} is not a readable GGUF file ({str(exc).splitlines()[0]}); "
            "download it again or pass another --model"
        ) from exc
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelSourceError(
            f"{gguf_path} holds a {architecture or 'unnamed'!r} model, which splitserve does not "
            f"run; pass a model of a supported architecture "
            f"({', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    return architecture


def write_hf_dir(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` to float32 and save it as an HF directory at `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = hf_config_dict(model)
    tied = bool(config.get("tie_word_embeddings"))
    state = {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def hf_config_dict(model: Any) -> dict[str, Any]:
    """The model's config as a plain float32 checkpoint's config.json (no GGUF quantization)."""
    config: dict[str, Any] = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    return config


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_partials(out_dir: Path) -> None:
    """Partial folders of `out_dir` left by killed conversions (we hold the lock)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        logger.info("removing %s, left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)
