"""The torch side of model sources: what writes a model directory into the cache.

`source.resolve_model_source` finds model directories and stays torch-free (the router
imports it); the nodes, the offline `LLM` and `splitserve up` pass `model_writers()` so that
a source not in the cache yet (a GGUF file, the tiny model) is written there once.
"""

from __future__ import annotations

from pathlib import Path

from splitserve.engine.model.gguf_convert import convert_gguf
from splitserve.engine.model.source import ModelWriters
from splitserve.engine.model.tiny import make_tiny_model


def _write_tiny_model(out_dir: Path) -> None:
    make_tiny_model(out_dir, arch="llama", seed=0)


def model_writers() -> ModelWriters:
    return ModelWriters(write_tiny_model=_write_tiny_model, convert_gguf=convert_gguf)
