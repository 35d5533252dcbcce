"""Piecewise graphs of prefill and mixed steps (engine/piecewise_graphs.py): the bucket
rule, and the pieces' orchestration (static buffers, padding to a bucket, attention
between pieces) run without graphs on the CPU against the plain forward.
tests/test_engine_gpu.py checks the captured graphs against eager steps on a GPU."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from engine_outputs import assert_same_tokens
from torch.utils._python_dispatch import TorchDispatchMode

from splitserve.engine.llm import LLM
from splitserve.engine.piecewise_graphs import PiecewiseGraphs, piecewise_buckets
from splitserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("max_tokens", [1, 16, 100, 512, 2048, 8192, 10000])
def test_buckets_cover_every_step_with_little_padding(max_tokens: int) -> None:
    sizes = piecewise_buckets(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    for tokens in range(1, max_tokens + 1, 7):
        bucket = next(s for s in sizes if s >= tokens)
        assert bucket - tokens < (16 if tokens <= 2048 else tokens / 8 + 1)


def test_buckets_refuse_nothing_to_capture() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        piecewise_buckets(0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pieces_give_the_plain_forward_tokens(tiny_model_factory, arch: str) -> None:
    model_dir = tiny_model_factory(arch)
    plain = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    pieced = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    runner = pieced.engine.runner
    runner.pieces = PiecewiseGraphs(runner.model, runner.kv_cache, 64, capture=False)
    rng = random.Random(1)
    vocab = plain.engine.arch.vocab_size
    batch = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 9, 16, 33, 70, 150)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    want = plain.generate(batch, params)
    got = pieced.generate(batch, params)
    again = pieced.generate(batch[3:], params)  # prefixes now cached
    assert pieced.engine.stats().num_piecewise_steps > 0
    assert_same_tokens(got + again, want + want[3:])


def test_steps_past_the_largest_graph_run_the_pieces_at_their_own_rows(
    tiny_model_factory,
) -> None:
    """Graphs up to 32 tokens, steps up to 64: a larger step runs the pieces over exactly
    its own rows (no bucket padding) and gives the plain forward's tokens."""
    model_dir = tiny_model_factory("llama")
    plain = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    pieced = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    runner = pieced.engine.runner
    pieces = PiecewiseGraphs(runner.model, runner.kv_cache, 32, capture=False, step_tokens=64)
    runner.pieces = pieces
    assert pieces.sizes[-1] == 32 and pieces.can_run(64) and not pieces.can_run(65)
    steps: list[tuple[int, int]] = []  # (step rows, rows the pieces ran)
    run, piece = pieces.run, pieces._piece

    def recording_run(input_ids, positions, meta):
        steps.append((input_ids.shape[0], 0))
        return run(input_ids, positions, meta)

    def recording_piece(index: int, size: int) -> None:
        steps[-1] = (steps[-1][0], size)
        piece(index, size)

    pieces.run, pieces._piece = recording_run, recording_piece  # type: ignore[method-assign]
    rng = random.Random(2)
    vocab = plain.engine.arch.vocab_size
    batch = [[rng.randrange(vocab) for _ in range(n)] for n in (50, 7, 41)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    assert_same_tokens(pieced.generate(batch, params), plain.generate(batch, params))
    large = [(rows, ran) for rows, ran in steps if rows > 32]
    assert large and all(ran == rows for rows, ran in large)
    assert all(ran in pieces.sizes for rows, ran in steps if rows <= 32)


class _CopyTargets(TorchDispatchMode):
    """The storage addresses every `copy_` writes to."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.copy_.default:
            self.targets.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))


def test_pieces_hand_over_without_copies(tiny_model_factory) -> None:
    """A middle piece writes the q/k/v projection and the residual sum straight into the
    static buffers attention and the next piece read (no copy lands on v or the residual:
    the torch rotary's own in-place writes go to q and k), and attention writes its output
    into the static buffer the next piece reads."""
    llm = LLM(str(tiny_model_factory("llama")), dtype="float32", max_num_batched_tokens=64)
    runner = llm.engine.runner
    pieces = PiecewiseGraphs(runner.model, runner.kv_cache, 64, capture=False)
    buf = pieces.buffers
    with _CopyTargets() as copies:
        pieces._piece(1, 32)
    assert copies.targets, "the torch rotary writes q and k in place"
    assert buf.v.data_ptr() not in copies.targets
    assert buf.residual.data_ptr() not in copies.targets

    outs: list[torch.Tensor | None] = []
    attention = runner.model.model.layers[0].self_attn.backend
    forward = attention.forward

    def spy(*args, out=None, **kwargs):  # type: ignore[no-untyped-def]
        outs.append(out)
        return forward(*args, out=out, **kwargs)

    for layer in runner.model.model.layers:
        layer.self_attn.backend = SimpleNamespace(forward=spy, store=attention.store)
    runner.pieces = pieces
    llm.generate([[3, 1, 4, 1, 5, 9, 2, 6]], SamplingParams(temperature=0, max_tokens=1))
    assert outs and all(o is not None and o.data_ptr() == buf.attn.data_ptr() for o in outs)


def test_pieces_store_each_layers_kv_and_attention_only_attends(tiny_model_factory) -> None:
    """Each piece before an attention stores that layer's K/V (once a layer and step, the
    pad rows of the bucket at slot -1), and attention gets metadata saying so."""
    llm = LLM(str(tiny_model_factory("llama")), dtype="float32", max_num_batched_tokens=64)
    runner = llm.engine.runner
    pieces = PiecewiseGraphs(runner.model, runner.kv_cache, 64, capture=False)
    attention = runner.model.model.layers[0].self_attn.backend
    stores: list[torch.Tensor] = []
    stored_flags: list[bool] = []

    def store(k, v, kv_cache, slot_mapping):  # type: ignore[no-untyped-def]
        stores.append(slot_mapping.clone())
        attention.store(k, v, kv_cache, slot_mapping)

    def forward(q, k, v, kv_cache, meta, scale, out=None):  # type: ignore[no-untyped-def]
        stored_flags.append(meta.kv_stored)
        return attention.forward(q, k, v, kv_cache, meta, scale, out=out)

    layers = runner.model.model.layers
    for layer in layers:
        layer.self_attn.backend = SimpleNamespace(forward=forward, store=store)
    runner.pieces = pieces
    llm.generate([[3, 1, 4, 1, 5, 9, 2, 6, 5]], SamplingParams(temperature=0, max_tokens=1))
    assert stored_flags and all(stored_flags)
    assert len(stores) == len(layers)  # the prompt's one step: 9 rows, bucket 16
    for slots in stores:
        assert slots.shape == (16,)
        assert bool((slots[:9] >= 0).all()) and bool((slots[9:] == -1).all())
