"""`dummy:<preset>` models: random weights of a real shape, for benchmarks without weights.

Weights are drawn straight on the target device in the target dtype, seeded by
`ModelConfig.seed`, as `ModelConfig.dummy_weights` says: "normal", N(0, 0.02) with norm
scales 1 and biases 0 (a trained checkpoint's scale); "uniform", every parameter from
U(-1e-3, 1e-3), vLLM's and SGLang's dummy draw. The presets and the in-memory tokenizer live in
engine/model/dummy_presets.py (torch-free, shared with the router).
"""

from __future__ import annotations

import logging

import torch

from splitserve.engine.config import DummyWeights, ModelConfig
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.dummy_presets import build_dummy_tokenizer, dummy_arch
from splitserve.engine.model.llama import CausalLM
from splitserve.engine.model.loader import (
    LoadedModel,
    resolve_dtype,
    resolve_max_model_len,
)
from splitserve.kernels.registry import ModelKernels

logger = logging.getLogger(__name__)

INIT_STD = 0.02
# "uniform": every parameter from U(-UNIFORM_BOUND, UNIFORM_BOUND).
UNIFORM_BOUND = 1e-3


def load_dummy_model(config: ModelConfig, kernels: ModelKernels) -> LoadedModel:
    arch = dummy_arch(config.model)
    dtype = resolve_dtype(config.dtype, arch.torch_dtype)
    max_model_len = resolve_max_model_len(config.max_model_len, arch)
    model = random_model(config.model, arch, kernels, dtype, config)
    model.eval()
    tokenizer = build_dummy_tokenizer(arch)
    return LoadedModel(model, arch, tokenizer, frozenset(arch.eos_token_ids), max_model_len, dtype)


def random_model(
    name: str,
    arch: ModelArchConfig,
    kernels: ModelKernels,
    dtype: torch.dtype,
    config: ModelConfig,
) -> CausalLM:
    """A model of `arch` with random weights (init_dummy_weights) on config.device: a
    `dummy:<preset>`, or any source under `--load-format dummy` (engine/model/loader.py)."""
    with torch.device(config.device):
        model = CausalLM(arch, kernels, dtype)
    init_dummy_weights(model, config.seed, config.dummy_weights)
    logger.info(
        "built %s with random weights (%s, %s, seed %d)",
        name,
        dtype,
        config.dummy_weights,
        config.seed,
    )
    return model


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int, draw: DummyWeights) -> None:
    """With `draw` "normal": norm scales 1, biases 0, everything else N(0, INIT_STD);
    "uniform": every parameter U(-UNIFORM_BOUND, UNIFORM_BOUND). Drawn on the params'
    device."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(param.device).manual_seed(seed)
        generator = generators[param.device]
        if draw == "uniform":
            param.uniform_(-UNIFORM_BOUND, UNIFORM_BOUND, generator=generator)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, INIT_STD, generator=generator)
