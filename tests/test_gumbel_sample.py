"""The fused random draw (kernels/gumbel_sample.py) against torch given the same uniforms,
its distribution, its masks and its argument checks.

CPU: Triton interpreter (see conftest's `triton_interpreter`); GPU: the same tests.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global gumbel_argmax, gumbel_argmax_reference, philox_uniforms
    from splitserve.kernels.gumbel_sample import (
        gumbel_argmax,
        gumbel_argmax_reference,
        philox_uniforms,
    )


def _keys(seeds: list[int], draws: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    seed_t = torch.tensor(seeds, dtype=torch.int64, device=DEVICE)
    counters = torch.tensor([d << 32 for d in draws], dtype=torch.int64, device=DEVICE)
    return seed_t, counters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [7, 2048, 5000])
def test_draw_is_the_argmax_of_logits_over_temperature_plus_its_gumbel_noise(
    vocab: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(vocab)
    # A strided view: rows of the logits are further apart than the vocabulary.
    wide = torch.randn(6, vocab + 3, generator=gen).to(DEVICE, dtype)
    logits = wide[:, :vocab]
    inv_temps = torch.tensor([1.0, 0.5, 2.0, 1.0, 10.0, 0.1], device=DEVICE)
    seeds, counters = _keys([1, 2, 3, 4, 2**62 + 5, 0], [0, 1, 5, 0, 2**30, 77])
    tokens = gumbel_argmax(logits, inv_temps, seeds, counters)
    uniforms = philox_uniforms(seeds, counters, vocab)
    expected = gumbel_argmax_reference(logits, inv_temps, uniforms)
    assert tokens.tolist() == expected.tolist()
    # The same keys draw the same tokens; another draw number draws others.
    assert gumbel_argmax(logits, inv_temps, seeds, counters).tolist() == tokens.tolist()
    later = philox_uniforms(seeds, counters + (1 << 32), vocab)
    assert not torch.equal(later, uniforms)


def test_uniforms_are_uniform_and_below_one() -> None:
    seeds, counters = _keys([9], [3])
    u = philox_uniforms(seeds, counters, 400_000)[0].double()
    assert u.min().item() >= 0.0 and u.max().item() <= 1.0
    assert abs(u.mean().item() - 0.5) < 3e-3
    assert abs(u.var().item() - 1 / 12) < 2e-3
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 43.8  # 19 degrees of freedom, p = 0.001


def test_draws_follow_softmax_of_logits_over_temperature() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    temperature = 0.5
    # logits / T = log p: each draw picks token i with probability p_i.
    logits = (probs.log() * temperature).repeat(400, 1).to(DEVICE)
    inv_temps = torch.full((400,), 1 / temperature, device=DEVICE)
    seeds, counters = _keys([11] * 400, list(range(400)))
    tokens = gumbel_argmax(logits, inv_temps, seeds, counters).cpu()
    counts = torch.bincount(tokens, minlength=4).double()
    expected = probs.double() * 400
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_masked_tokens_are_never_drawn() -> None:
    vocab = 3000
    logits = torch.full((8, vocab), float("-inf"), device=DEVICE)
    allowed = [5, 2047, 2048, 2999]  # both sides of a block edge
    logits[:, allowed] = torch.tensor([30.0, -30.0, 0.0, 1.0], device=DEVICE)
    seeds, counters = _keys(list(range(8)), [0] * 8)
    tokens = gumbel_argmax(logits, torch.full((8,), 1.0, device=DEVICE), seeds, counters)
    assert set(tokens.tolist()) <= set(allowed)


def test_bad_arguments_say_what_to_fix() -> None:
    logits = torch.zeros(2, 10, device=DEVICE)
    seeds, counters = _keys([1, 2], [0, 0])
    inv_temps = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="one entry per logits row"):
        gumbel_argmax(logits, inv_temps[:1], seeds, counters)
    with pytest.raises(ValueError, match="one entry per logits row"):
        gumbel_argmax(logits, inv_temps, seeds[:1], counters)
    with pytest.raises(ValueError, match="dtype"):
        gumbel_argmax(logits, inv_temps, seeds.int(), counters)
    with pytest.raises(ValueError, match="no columns"):
        gumbel_argmax(logits[:, :0], inv_temps, seeds, counters)
    assert gumbel_argmax(logits[:0], inv_temps[:0], seeds[:0], counters[:0]).numel() == 0
