"""The kernel registry picks every op's implementation from configuration, and the model's
layers behave alike whichever implementation runs (rotary rotates in place on both)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.layers import RotaryEmbedding
from splitserve.kernels import torch_ops
from splitserve.kernels.attention_torch import TorchPagedAttention
from splitserve.kernels.registry import select_kernels, torch_kernels


@pytest.mark.parametrize(
    ("device", "kernel", "attention", "want_kernel", "want_attention"),
    [
        ("cpu", "auto", "auto", "torch", "torch"),
        ("cuda", "auto", "auto", "triton", "triton"),
        # --attention-backend torch on CUDA runs plain torch throughout.
        ("cuda", "auto", "torch", "torch", "torch"),
        ("cuda", "torch", "triton", "torch", "triton"),
        ("cpu", "triton", "torch", "triton", "torch"),
    ],
)
def test_backends_follow_configuration_not_tensors(
    triton_interpreter,
    device: str,
    kernel: str,
    attention: str,
    want_kernel: str,
    want_attention: str,
) -> None:
    # Choosing Triton imports its kernel modules (the interpreter is chosen then).
    kernels = select_kernels(device, kernel, attention)
    assert (kernels.backend, kernels.attention_backend) == (want_kernel, want_attention)
    is_torch_attention = isinstance(kernels.attention, TorchPagedAttention)
    assert is_torch_attention == (want_attention == "torch")
    assert (kernels.rms_norm is torch_ops.rms_norm) == (want_kernel == "torch")
    # The sampler's fused draw comes with the Triton kernels.
    assert (kernels.draw is None) == (want_kernel == "torch")


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        select_kernels("cpu", "cutlass", "auto")


def test_rotary_rotates_in_place_and_matches_the_reference() -> None:
    arch = ModelArchConfig(
        architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=64,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    rope = RotaryEmbedding(arch, torch_kernels())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 16, generator=gen)
    k = torch.randn(5, 2, 16, generator=gen)
    positions = torch.tensor([0, 3, 7, 8, 63])
    want_q, want_k = rope.reference(positions, q.clone(), k.clone())
    out_q, out_k = rope(positions, q, k)
    assert out_q is q and out_k is k
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)


def _greedy_tokens(model_dir, kernel_backend: str) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return _greedy_run(model_dir, kernel_backend)[0]


def _greedy_run(  # type: ignore[no-untyped-def]
    model_dir,
    kernel_backend: str,
    attention_backend: str = "torch",
    short_rest_rows: int = 0,
    split_context_prefill: bool = False,
) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy tokens of a small batch (two prompts over several steps, one in 8-token
    chunks) from an engine with `attention_backend` and `kernel_backend`, on the GPU
    where there is one (Triton kernels need their tensors there), else on the CPU; and
    the engine's prefill runs by path."""
    from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ModelConfig(
        str(model_dir), dtype="float32", device=device, attention_backend=attention_backend,
        kernel_backend=kernel_backend, enforce_eager=True,  # no graph captures: a quick test
        short_rest_rows=short_rest_rows, split_context_prefill=split_context_prefill,
    )  # fmt: skip
    sched = SchedulerConfig(max_num_batched_tokens=8)
    core = EngineCore(EngineConfig(model, CacheConfig(block_size=16, num_blocks=32), sched))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 1]]
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    stats = core.stats()
    runs = {"context": stats.prefill_runs_context, "rows": stats.prefill_runs_rows}
    return [tokens[f"r{i}"] for i in range(len(prompts))], runs


def test_triton_kernels_generate_the_torch_kernels_tokens(triton_interpreter, tiny_llama) -> None:
    """The Triton element-wise kernels, the K/V stored by the rotary's kernel among them
    (read back by attention on every later step and chunk), give the plain-torch kernels'
    greedy tokens."""
    assert select_kernels("cpu", "triton", "torch").rotary_store_ is not None
    assert torch_kernels().rotary_store_ is None
    assert _greedy_tokens(tiny_llama, "triton") == _greedy_tokens(tiny_llama, "torch")


def test_short_rests_on_the_decode_kernel_generate_the_torch_attention_tokens(
    triton_interpreter, tiny_llama
) -> None:
    """The Triton attention with chunks over cached context attended a row at a time by
    the decode kernel (every chunk after a prompt's first is at most 8 rows at this step
    budget, beside the other request's decode rows) gives plain torch attention's greedy
    tokens, as it does with those chunks on the prefill kernel."""
    want = _greedy_tokens(tiny_llama, "torch")
    tokens, runs = _greedy_run(tiny_llama, "triton", "triton", short_rest_rows=16)
    assert tokens == want and runs["rows"] > 0
    tokens, runs = _greedy_run(tiny_llama, "triton", "triton", short_rest_rows=0)
    assert tokens == want and runs == {"context": runs["context"], "rows": 0}


def test_split_contexts_generate_the_torch_attention_tokens(
    triton_interpreter, tiny_llama, monkeypatch
) -> None:
    """The Triton attention with chunks over cached context attended with their context
    split across programs (partitions of 4 tokens and any grid allowed, so that the tiny
    model's contexts split) gives plain torch attention's greedy tokens."""
    from splitserve.kernels import backend, prefill_attention, prefill_split

    want = _greedy_tokens(tiny_llama, "torch")
    monkeypatch.setattr(prefill_split, "MIN_PARTITION_TOKENS", 4)
    monkeypatch.setattr(prefill_split, "MAX_FILL_FRACTION", 64.0)  # as on a large device
    calls: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["num_splits"])
        return prefill_attention.prefill_attention(*args, **kwargs)

    monkeypatch.setattr(backend, "prefill_attention", counted)
    tokens, runs = _greedy_run(tiny_llama, "triton", "triton", split_context_prefill=True)
    assert tokens == want and runs["context"] > 0 and max(calls) > 1


def test_short_rest_rows_must_not_be_negative_in_the_config() -> None:
    from splitserve.engine.config import ModelConfig

    with pytest.raises(ValueError, match="short_rest_rows must be >= 0"):
        ModelConfig("dummy:llama-3.1-8b", short_rest_rows=-1)
