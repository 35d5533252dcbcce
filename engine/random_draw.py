"""Where a sampled row's randomness comes from, and the fused draw that uses it.

`RowGenerator`: a seeded sequence's own source of randomness. `RequestIntake` makes one
per sequence of a request with a seed (seed + the sequence's index) and passes the same
object in its `SamplingRow` at every step. The torch draw (`Sampler._draw`) takes its
noise from `torch_generator`; the fused draw keys Philox with `key` and counts its draws
in `draws`. A row without one shares the sampler's default source.

`FusedDraw`: on CUDA (the "triton" kernel backend, kernels/registry.py) the sampler hands
it the rows that sample from their whole distribution (no top-k, top-p or min-p), and it
draws their tokens in one pass over the logits (kernels/gumbel_sample.py). Each row gets
its Philox key (its generator's, else the default one) and a counter whose high 32 bits
are its draw number (the generator's `draws`, else the default source's, advanced once per
row), so a seeded row's tokens depend on its seed and how many tokens it drew, never on
the batch. Other rows keep the torch draw. The two draws pick tokens with the same
probabilities, from different random numbers: a seed gives the same tokens on every run
of the same kernel backend, not across backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels.device_copy import arrays_to_device
from splitserve.kernels.registry import DrawOp

if TYPE_CHECKING:
    from splitserve.engine.sampler import SamplingRow

_MASK64 = (1 << 64) - 1
# Keys stay non-negative int64 (the kernel reads them from an int64 tensor).
_KEY_BITS = (1 << 63) - 1
# Mixed into the default source's key so it differs from a request seeded alike.
_DEFAULT_SOURCE = 0x5DEECE66D
# Draw numbers fill the counter's high 32 bits of an int64: the default source takes a
# new key after this many draws.
_MAX_DRAWS = 1 << 31


def philox_key(seed: int) -> int:
    """splitmix64 of `seed` (any Python int), as a non-negative int64: nearby seeds get
    unrelated keys."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _KEY_BITS


class RowGenerator:
    """A seeded sequence's randomness: a torch generator and a Philox key with its count of
    fused draws."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.torch_generator = torch.Generator(device=torch.device(device))
        self.torch_generator.manual_seed(seed)
        self.key = philox_key(seed)
        self.draws = 0


def is_plain(params: SamplingParams, vocab_size: int) -> bool:
    """Whether a random row samples from its whole distribution at its temperature."""
    return (
        (params.top_k <= 0 or params.top_k >= vocab_size)
        and params.top_p >= 1.0
        and params.min_p <= 0.0
    )


class FusedDraw:
    """The fused draw for plain random rows, with the default source's key and count."""

    def __init__(self, kernel: DrawOp, seed: int) -> None:
        self._kernel = kernel
        self._key = philox_key(seed ^ _DEFAULT_SOURCE)
        self._draws = 0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """One token per row of `logits` (rows all plain and random); nothing waits."""
        keys: list[int] = []
        counters: list[int] = []
        for row in rows:
            generator = row.generator
            if generator is None:
                if self._draws == _MAX_DRAWS:
                    self._key, self._draws = philox_key(self._key), 0
                keys.append(self._key)
                counters.append(self._draws << 32)
                self._draws += 1
            else:
                keys.append(generator.key)
                counters.append(generator.draws << 32)
                generator.draws += 1
        # One copy for the three, each 16-byte aligned, as Triton specialises pointers on
        # (a misaligned one would compile another variant mid-serving).
        seeds, offsets, inv_temps = arrays_to_device(
            [
                np.array(keys, dtype=np.int64),
                np.array(counters, dtype=np.int64),
                np.array([1.0 / r.params.temperature for r in rows], dtype=np.float32),
            ],
            logits.device,
        )
        return self._kernel(logits, inv_temps, seeds, offsets)
