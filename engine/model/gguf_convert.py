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
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

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
    try:
        architecture = read_gguf_string(gguf_path, "general.architecture") or ""
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
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


def read_gguf_string(gguf_path: Path, key: str) -> str | None:
    """The string value of one metadata key of a GGUF file, None if absent, read from the
    header alone: the metadata comes before the tensors, and `general.architecture` is
    usually its first key, so this reads a few bytes where `gguf.GGUFReader` parses every
    field (the whole tokenizer vocabulary, seconds for a small model)."""
    with gguf_path.open("rb") as f:
        magic, version = struct.unpack("<4sI", _read(f, 8))
        if magic != b"GGUF" or version not in (1, 2, 3):
            raise ValueError(f"no GGUF header (magic {magic!r}, version {version})")
        wide = "<Q" if version > 1 else "<I"  # counts and string lengths: 64-bit from v2
        _read_int(f, wide)  # tensor count
        for _ in range(_read_int(f, wide)):
            name = _read(f, _read_int(f, wide)).decode("utf-8")
            value_type = _read_int(f, "<I")
            if name == key:
                if value_type != _GGUF_STRING:
                    raise ValueError(f"{key} is of GGUF type {value_type}, not a string")
                return _read(f, _read_int(f, wide)).decode("utf-8")
            _skip_value(f, value_type, wide)
    return None


# GGUF metadata value types: fixed sizes in bytes, and the two that are not fixed.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _skip_value(f: BinaryIO, value_type: int, wide: str) -> None:
    if value_type in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[value_type], os.SEEK_CUR)
    elif value_type == _GGUF_STRING:
        f.seek(_read_int(f, wide), os.SEEK_CUR)
    elif value_type == _GGUF_ARRAY:
        item_type, count = _read_int(f, "<I"), _read_int(f, wide)
        if item_type in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item_type] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item_type, wide)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")


def _read_int(f: BinaryIO, fmt: str) -> int:
    (value,) = struct.unpack(fmt, _read(f, struct.calcsize(fmt)))
    return int(value)


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its GGUF header")
    return data


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
