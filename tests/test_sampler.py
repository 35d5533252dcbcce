"""Sampler: greedy, truncation supports, seeded reproducibility, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.random_draw import RowGenerator
from splitserve.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    scale_and_truncate,
)
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels.registry import DrawOp

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


def _row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset(),
    generator: RowGenerator | None = None,
) -> SamplingRow:
    return SamplingRow(params, generator, prompt or [], output or [], eos)


def _logits_from_probs(probs: list[float], device: str) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], device=device)


def _frequencies(tokens: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).double() / len(tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_and_ties_take_lowest_id(device: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50, device=device)
    logits[3, 7] = logits[3, 11] = logits[3].max() + 1.0
    sampler = Sampler(50, torch.device(device))
    rows = [_row(SamplingParams(temperature=0.0)) for _ in range(8)]
    out = sampler(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[3] == 7
    assert out.logprobs == [None] * 8


def test_greedy_uses_penalized_logits() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    sampler = Sampler(4, torch.device("cpu"))
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert sampler(logits, [_row(params)]).token_ids == [0]
    assert sampler(logits, [_row(params, prompt=[0])]).token_ids == [1]


def test_penalties_match_hand_computed_values() -> None:
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, -3.0, 1.0, 0.0],
            [2.0, -1.0, 0.5, -3.0, 1.0, 0.0],
            [2.0, -1.0, 0.5, -3.0, 1.0, 0.0],
        ]
    )
    original = logits.clone()
    rows = [
        _row(
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            prompt=[0, 1],
            output=[2, 2, 3],
        ),
        _row(SamplingParams(), prompt=[0, 1], output=[2, 2, 3]),
        # Negative presence penalty favours tokens already generated; prompt does not count.
        _row(SamplingParams(presence_penalty=-1.0), prompt=[5], output=[4, 4]),
    ]
    out = apply_penalties(logits, rows)
    expected = torch.tensor(
        [
            # rep on {0,1,2,3}: [1, -2, 0.25, -6]; token 2: 0.25 - 0.5*2 - 0.25; token 3: -6.75
            [1.0, -2.0, -1.0, -6.75, 1.0, 0.0],
            [2.0, -1.0, 0.5, -3.0, 1.0, 0.0],
            [2.0, -1.0, 0.5, -3.0, 2.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits, original)


def test_no_penalties_returns_input_unchanged() -> None:
    logits = torch.randn(2, 10)
    rows = [_row(SamplingParams(), output=[1, 2]), _row(SamplingParams(temperature=0))]
    assert apply_penalties(logits, rows) is logits


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(4, 8)
    eos = frozenset({7})
    rows = [
        _row(SamplingParams(min_tokens=3, stop_token_ids=(5,)), output=[1], eos=eos),
        _row(SamplingParams(min_tokens=3, stop_token_ids=(5,), ignore_eos=True), eos=eos),
        _row(SamplingParams(min_tokens=2, stop_token_ids=(5,)), output=[1, 2], eos=eos),
        # Stop ids outside the vocabulary cannot be sampled and are ignored.
        _row(SamplingParams(min_tokens=1, stop_token_ids=(100,)), eos=eos),
    ]
    out = apply_penalties(logits, rows)
    inf = float("-inf")
    assert out[0].tolist() == [0, 0, 0, 0, 0, inf, 0, inf]
    assert out[1].tolist() == [0, 0, 0, 0, 0, inf, 0, 0]
    assert out[2].tolist() == [0.0] * 8
    assert out[3].tolist() == [0, 0, 0, 0, 0, 0, 0, inf]


def test_min_tokens_keeps_eos_from_being_sampled() -> None:
    logits = torch.tensor([[0.0, 0.0, 10.0, 0.0]]).repeat(2, 1)
    sampler = Sampler(4, torch.device("cpu"))
    rows = [
        _row(SamplingParams(temperature=0.0, min_tokens=2), eos=frozenset({2})),
        _row(SamplingParams(temperature=0.0, min_tokens=2), output=[0, 1], eos=frozenset({2})),
    ]
    assert sampler(logits, rows).token_ids == [0, 2]


def _sample_many(
    device: str, logits: torch.Tensor, params: SamplingParams, num: int = 4000
) -> list[int]:
    sampler = Sampler(logits.shape[-1], torch.device(device), seed=1234)
    return sampler(logits.repeat(num, 1), [_row(params) for _ in range(num)]).token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_support_and_frequencies(device: str) -> None:
    logits = torch.tensor([1.0, 3.0, 0.5, 2.5, -1.0, 2.0], device=device)
    tokens = _sample_many(device, logits, SamplingParams(top_k=3))
    assert set(tokens) <= {1, 3, 5}
    expected = torch.zeros(6, dtype=torch.float64)
    expected[[1, 3, 5]] = torch.softmax(logits[[1, 3, 5]].double().cpu(), dim=0)
    torch.testing.assert_close(_frequencies(tokens, 6), expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_support_and_frequencies(device: str) -> None:
    probs = [0.05, 0.5, 0.1, 0.2, 0.15]
    # Best first: 0.5, 0.2, 0.15 (mass before it 0.7 < 0.8 stays), 0.1 (0.85 >= 0.8 goes).
    tokens = _sample_many(device, _logits_from_probs(probs, device), SamplingParams(top_p=0.8))
    assert set(tokens) == {1, 3, 4}
    expected = torch.tensor([0, 0.5, 0, 0.2, 0.15], dtype=torch.float64) / 0.85
    torch.testing.assert_close(_frequencies(tokens, 5), expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("device", DEVICES)
def test_min_p_support(device: str) -> None:
    probs = [0.05, 0.5, 0.1, 0.2, 0.15]
    # Floor 0.25 * 0.5 = 0.125 keeps 0.5, 0.2, 0.15.
    tokens = _sample_many(device, _logits_from_probs(probs, device), SamplingParams(min_p=0.25))
    assert set(tokens) == {1, 3, 4}


def test_temperature_frequencies() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    tokens = _sample_many("cpu", logits, SamplingParams(temperature=2.0), num=6000)
    expected = torch.softmax(logits.double() / 2.0, dim=0)
    torch.testing.assert_close(_frequencies(tokens, 4), expected, rtol=0, atol=0.03)


def test_scale_and_truncate_applies_top_k_then_top_p_then_min_p() -> None:
    logits = _logits_from_probs([0.3, 0.25, 0.2, 0.15, 0.1], "cpu").repeat(3, 1)
    params = [
        # top-k 4 renormalises to 0.333, 0.278, 0.222, 0.167; top-p 0.6 keeps the first two.
        SamplingParams(top_k=4, top_p=0.6),
        # temperature 0.5 squares the probabilities: 0.09, 0.0625, 0.04, ...; min_p 0.5 floor 0.045.
        SamplingParams(temperature=0.5, min_p=0.5),
        SamplingParams(top_k=-1),
    ]
    out = scale_and_truncate(logits, params)
    supports = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]
    assert supports == [{0, 1}, {0, 1}, {0, 1, 2, 3, 4}]
    torch.testing.assert_close(out[1, :2], logits[1, :2] / 0.5)


def _seeded_tokens(
    device: str,
    position: int,
    others: list[SamplingRow],
    sampler_seed: int,
    seed: int = 42,
    draw: DrawOp | None = None,
) -> list[int]:
    """Tokens of a seeded row at `position` among `others`, over several steps, from a
    sampler with `draw` (tests/test_sampler_fused_draw.py passes the fused one)."""
    vocab_size, num_steps = 1000, 6
    sampler = Sampler(vocab_size, torch.device(device), seed=sampler_seed, draw=draw)
    target = _row(SamplingParams(seed=seed), generator=Sampler.make_generator(seed, device))
    logits_gen = torch.Generator().manual_seed(7)
    step_logits = [torch.randn(vocab_size, generator=logits_gen) for _ in range(num_steps)]
    tokens = []
    for step in range(num_steps):
        rows = [*others]
        rows.insert(position, target)
        logits = torch.randn(len(rows), vocab_size).to(device)
        logits[position] = step_logits[step].to(device)
        token = sampler(logits, rows).token_ids[position]
        target.output_token_ids.append(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_is_batch_independent(device: str) -> None:
    alone = _seeded_tokens(device, 0, [], sampler_seed=0)
    others = [
        _row(SamplingParams()),
        _row(SamplingParams(seed=3), generator=Sampler.make_generator(3, device)),
        _row(SamplingParams(temperature=0.0)),
    ]
    for position in (0, 2, 3):
        batched = _seeded_tokens(device, position, others, sampler_seed=99)
        assert batched == alone
    assert _seeded_tokens(device, 0, [], sampler_seed=0, seed=43) != alone


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_from_raw_logits(device: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30, device=device)
    rows = [
        _row(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.7), prompt=[3, 4]),
        _row(SamplingParams(temperature=0.7, top_k=10, logprobs=0)),
        _row(SamplingParams(logprobs=None)),
        _row(SamplingParams(temperature=1.3, logprobs=2, frequency_penalty=1.0), output=[1]),
    ]
    out = Sampler(30, torch.device(device))(logits, rows)
    raw = torch.log_softmax(logits.double().cpu(), dim=-1)
    assert out.logprobs[2] is None
    for i, k in ((0, 5), (1, 0), (3, 2)):
        entry = out.logprobs[i]
        assert entry is not None
        token = out.token_ids[i]
        assert entry.token_id == token
        assert abs(entry.logprob - raw[i, token].item()) < 1e-6
        assert entry.rank == int((raw[i] > raw[i, token]).sum()) + 1
        top_lp, top_ids = raw[i].topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert all(abs(a - b) < 1e-6 for (_, a), b in zip(entry.top, top_lp.tolist(), strict=True))


def test_logit_bias_moves_the_choice_but_not_the_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5], [0.0, 3.0, 1.0, 0.5], [0.0, 3.0, 1.0, 0.5]])
    rows = [
        _row(SamplingParams(temperature=0.0, logit_bias={1: -100.0}, logprobs=0)),
        _row(SamplingParams(temperature=0.9, logit_bias={3: 100.0})),
        _row(SamplingParams(temperature=0.0, logit_bias={2: 2.5})),  # 1 + 2.5 beats 3
    ]
    out = Sampler(4, torch.device("cpu"))(logits, rows)
    assert out.token_ids == [2, 3, 2]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0] is not None
    assert abs(out.logprobs[0].logprob - raw[2].item()) < 1e-6  # the unbiased distribution
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias=((1, 1.0), (1, 2.0)))


def test_rejects_mismatched_logits() -> None:
    sampler = Sampler(10, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"got \(1, 12\)"):
        sampler(torch.zeros(1, 12), [_row(SamplingParams())])
    with pytest.raises(ValueError, match=r"got \(2, 10\)"):
        sampler(torch.zeros(2, 10), [_row(SamplingParams())])
    assert sampler(torch.zeros(0, 10), []).token_ids == []


@pytest.mark.parametrize("device", DEVICES)
def test_temperatures_near_zero_sample_greedily(device: str) -> None:
    """Below 1e-5 a temperature is greedy: dividing the logits by 1e-40 would overflow
    them into inf and NaN, and argmax is what a temperature approaching 0 draws."""
    torch.manual_seed(3)
    logits = torch.randn(4, 50, device=device)
    sampler = Sampler(50, torch.device(device))
    for temperature in (1e-40, 1e-6):
        rows = [_row(SamplingParams(temperature=temperature)) for _ in range(4)]
        assert sampler(logits, rows).token_ids == logits.argmax(dim=-1).tolist()
    assert not SamplingParams(temperature=1e-5).is_greedy
