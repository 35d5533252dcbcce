"""The sampler's fused draw (engine/random_draw.py over kernels/gumbel_sample.py): which
rows take it, seeded rows' independence of the batch, masks applied before it, and the
kernel registry handing it to the engine's sampler.

CPU: Triton interpreter (see conftest's `triton_interpreter`).
"""

from __future__ import annotations

import pytest
import torch
from test_sampler import _seeded_tokens

from splitserve.engine.random_draw import FusedDraw, is_plain, philox_key
from splitserve.engine.sampler import Sampler, SamplingRow
from splitserve.engine.sampling_params import SamplingParams

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    global gumbel_argmax
    from splitserve.kernels.gumbel_sample import gumbel_argmax


class _Counted:
    """The fused kernel, counting the rows it drew."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, logits, inv_temps, seeds, counters):  # type: ignore[no-untyped-def]
        self.rows.append(logits.shape[0])
        return gumbel_argmax(logits, inv_temps, seeds, counters)


def _row(params: SamplingParams, generator=None, output=None) -> SamplingRow:  # type: ignore[no-untyped-def]
    return SamplingRow(params, generator, [1, 2], list(output or []), frozenset({0}))


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_plain_random_rows_take_the_fused_draw_and_truncated_rows_the_torch_one() -> None:
    counted = _Counted()
    sampler = Sampler(VOCAB, DEVICE, seed=0, draw=counted)
    logits = _logits(5, 0)
    best = logits.argmax(dim=-1).tolist()
    rows = [
        _row(SamplingParams()),  # plain
        _row(SamplingParams(top_k=1)),  # torch draw: top-1 is the argmax
        _row(SamplingParams(temperature=0.0)),  # greedy
        _row(SamplingParams(temperature=0.7, top_k=VOCAB)),  # plain (top_k keeps all)
        _row(SamplingParams(top_p=0.5, min_p=0.9)),  # torch draw
    ]
    tokens = sampler(logits, rows).token_ids
    assert counted.rows == [2]  # rows 0 and 3, in one call
    assert tokens[1] == best[1] and tokens[2] == best[2]
    assert all(0 <= t < VOCAB for t in tokens)
    counted.rows.clear()
    sampler(logits[:2], [_row(SamplingParams()), _row(SamplingParams(temperature=1.5))])
    assert counted.rows == [2]
    plain = [is_plain(r.params, VOCAB) for r in rows if not r.params.is_greedy]
    assert plain == [True, False, True, False]


def test_a_seeded_row_draws_the_same_tokens_wherever_it_sits_in_any_batch() -> None:
    device = DEVICE.type
    alone = _seeded_tokens(device, 0, [], sampler_seed=0, draw=gumbel_argmax)
    others = [
        _row(SamplingParams()),
        _row(SamplingParams(seed=3), Sampler.make_generator(3, DEVICE)),
        _row(SamplingParams(top_p=0.9)),
    ]
    for position in (0, 2, 3):
        batched = _seeded_tokens(device, position, others, sampler_seed=99, draw=gumbel_argmax)
        assert batched == alone
    # Its draws move on from step to step: they do not all draw one token.
    assert len(set(alone)) > 1


def test_unseeded_rows_draw_fresh_noise_at_every_step() -> None:
    sampler = Sampler(VOCAB, DEVICE, seed=0, draw=gumbel_argmax)
    logits = torch.zeros(1, VOCAB, device=DEVICE)  # uniform over the vocabulary
    tokens = {sampler(logits, [_row(SamplingParams())]).token_ids[0] for _ in range(8)}
    assert len(tokens) > 1


def test_min_tokens_and_logit_bias_apply_before_the_fused_draw() -> None:
    sampler = Sampler(VOCAB, DEVICE, seed=0, draw=gumbel_argmax)
    logits = torch.zeros(6, VOCAB, device=DEVICE)
    logits[:, 0] = 50.0  # eos (id 0) would always win
    held = SamplingParams(min_tokens=3)
    biased = SamplingParams(logit_bias=((7, 100.0),))
    rows = [_row(held) for _ in range(3)] + [_row(biased) for _ in range(3)]
    tokens = sampler(logits, rows).token_ids
    assert 0 not in tokens[:3]
    assert tokens[3:] == [7, 7, 7]


def test_default_source_keys_differ_from_a_request_seeded_alike() -> None:
    draw = FusedDraw(gumbel_argmax, seed=5)
    assert draw._key != philox_key(5)
    assert philox_key(5) != philox_key(6)
    assert 0 <= philox_key(-1) < 2**63


def _seeded_generation(model_dir, seeds: list[int]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Each seed's tokens from an engine on the "triton" kernel backend (on the CPU torch
    attention, so the interpreter runs only the element-wise kernels and the draw; on a
    CUDA machine the engine runs there, where Triton kernels need their tensors)."""
    from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from splitserve.engine.core import EngineCore

    model = ModelConfig(
        str(model_dir), dtype="float32", kernel_backend="triton", device=DEVICE.type
    )
    core = EngineCore(EngineConfig(model, CacheConfig(block_size=16, num_blocks=32)))
    assert core.sampler._fused_draw is not None
    for i, seed in enumerate(seeds):
        params = SamplingParams(seed=seed, max_tokens=6, ignore_eos=True)
        core.add_request(f"r{i}", [3, 5, 7, 9 + i], params)
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[f"r{i}"] for i in range(len(seeds))]


def test_an_engine_on_the_triton_backend_draws_seeded_tokens_reproducibly(tiny_llama) -> None:
    first = _seeded_generation(tiny_llama, [7, 7, 8])
    again = _seeded_generation(tiny_llama, [7])
    assert again[0] == first[0]
    assert all(len(t) == 6 for t in first)


def test_seeds_and_counters_reach_the_kernel_16_byte_aligned() -> None:
    """Triton specialises pointer arguments on 16-byte alignment: the counters must be
    aligned at every batch size, or an odd one would compile a second variant mid-serving
    (the warm-up compiles the aligned one)."""
    seen: list[tuple[int, int]] = []

    def draw(logits, inv_temps, seeds, counters):  # type: ignore[no-untyped-def]
        seen.append((seeds.data_ptr() % 16, counters.data_ptr() % 16))
        return gumbel_argmax(logits, inv_temps, seeds, counters)

    sampler = Sampler(VOCAB, DEVICE, seed=0, draw=draw)
    for rows in (1, 2, 3, 5):
        sampler(_logits(rows, rows), [_row(SamplingParams()) for _ in range(rows)])
    assert seen == [(0, 0)] * 4
