"""The engine on a CUDA GPU with the Triton attention backend: in fp32 (full-precision
kernel dots) greedy tokens are identical to transformers and to the CPU reference path,
chunked and cached modes included; in bf16, logprobs stay within a stated tolerance of
the fp32 path."""

from __future__ import annotations

import importlib
import pkgutil
import random
import time
from typing import Any

import pytest
import torch
from engine_outputs import assert_same_tokens

from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
NUM_NEW = 24
# Each engine's KV pool: several engines share the GPU in one test process, so none takes
# the default share of its memory.
KV_GIB = 2.0


def gpu_llm(model_dir: Any, **kwargs: Any) -> LLM:
    """An engine on the GPU with a KV pool of KV_GIB."""
    return LLM(str(model_dir), device="cuda", kv_cache_memory_gib=KV_GIB, **kwargs)


GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
MODES = {
    "one_batch": dict(max_num_batched_tokens=16384, enable_prefix_caching=False),
    "chunked_64": dict(max_num_batched_tokens=64, enable_prefix_caching=False),
    "prefix_cache": dict(max_num_batched_tokens=512),
}


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(vocab) for _ in range(200)]
    lengths = [1, 15, 16, 17, 100, 255, 400, 600]
    out = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    return out + [shared + [rng.randrange(vocab) for _ in range(n)] for n in (10, 60, 150)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", list(MODES))
def test_fp32_greedy_on_gpu_matches_transformers_and_cpu(
    tiny_model_factory, hf_greedy, arch: str, mode: str
) -> None:
    model_dir = tiny_model_factory(arch)
    gpu = gpu_llm(model_dir, dtype="float32", **MODES[mode])
    assert (
        type(gpu.engine.model.model.layers[0].self_attn.backend).__name__ == "TritonPagedAttention"
    )
    batch = prompts(gpu.engine.arch.vocab_size)
    got = [o.outputs[0].token_ids for o in gpu.generate(batch, GREEDY)]
    if mode == "prefix_cache":
        again = [o.outputs[0].token_ids for o in gpu.generate(batch, GREEDY)]
        assert again == got and gpu.engine.stats().prefix_cache_hits > 0
    cpu = LLM(str(model_dir), dtype="float32", **MODES[mode])
    assert got == [o.outputs[0].token_ids for o in cpu.generate(batch, GREEDY)]
    assert got == hf_greedy(model_dir, batch, NUM_NEW)


def test_bf16_logprobs_close_to_fp32(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama")
    prompt = prompts(1024)[5]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    ref = gpu_llm(model_dir, dtype="float32").generate([prompt], params)
    low = gpu_llm(model_dir, dtype="bfloat16").generate([prompt], params)
    ref_top = dict(ref[0].outputs[0].logprobs[0].top)
    low_top = dict(low[0].outputs[0].logprobs[0].top)
    # bf16 weights and activations: log-probabilities agree to 0.15 nats.
    for token, logprob in ref_top.items():
        if token in low_top:
            assert abs(low_top[token] - logprob) < 0.15
    assert len(set(ref_top) & set(low_top)) >= 3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_graph_decode_matches_eager(tiny_model_factory, arch: str) -> None:
    """Requests of different lengths finish at different steps, so the graph-replayed
    decode batch shrinks through several captured sizes (with padding rows)."""
    model_dir = tiny_model_factory(arch)
    graphs = gpu_llm(model_dir, dtype="float32", cuda_graph_max_batch=8)
    eager = gpu_llm(model_dir, dtype="float32", enforce_eager=True)
    batch = prompts(graphs.engine.arch.vocab_size)
    rng = random.Random(3)
    params = [
        SamplingParams(
            temperature=0 if i % 3 else 0.8,
            seed=i,
            max_tokens=rng.randint(1, 40),
            ignore_eos=True,
            logprobs=2,
        )
        for i in range(len(batch))
    ]
    got = graphs.generate(batch, params)
    want = eager.generate(batch, params)
    assert graphs.engine.stats().num_graph_steps > 0
    assert eager.engine.stats().num_graph_steps == 0
    assert_same_tokens(got, want)


def _jit_kernels() -> list[Any]:
    import triton.runtime.jit as triton_jit

    import splitserve.kernels as kernels_pkg

    found = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"splitserve.kernels.{info.name}")
        found += [v for v in vars(module).values() if isinstance(v, triton_jit.JITFunction)]
    return found


def test_no_kernel_compiles_after_start_up(tiny_model_factory) -> None:
    """Steps of every shape serving meets (chunked prefill mixed with decode rows, eager
    decode batches past the graphs, short and long contexts, cached prefixes) compile no
    Triton kernel once the engine has started: the warm-up compiled them all."""
    import triton

    for kernel in _jit_kernels():  # what earlier tests compiled must not count
        kernel.device_caches.clear()
    model_dir = tiny_model_factory("llama")
    llm = gpu_llm(model_dir, dtype="bfloat16", max_num_batched_tokens=96, cuda_graph_max_batch=4)
    compiled: list[str] = []

    def count(**kwargs: Any) -> bool:
        compiled.append(kwargs["repr"])
        return False

    triton.knobs.runtime.jit_post_compile_hook = count
    try:
        rng = random.Random(5)
        vocab = llm.engine.arch.vocab_size
        lengths = [1, 2, 15, 16, 17, 31, 33, 100, 255, 256, 257, 500, 900, 1500, 1900]
        batch = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
        params = [
            SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, max_tokens=rng.randint(1, 60))
            for i in range(len(batch))
        ]
        llm.generate(batch, params)
        llm.generate(batch[::3], SamplingParams(temperature=0, max_tokens=8))  # cached
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
    assert compiled == []


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_piecewise_graph_steps_match_eager(tiny_model_factory, arch: str) -> None:
    """Chunked prefill with decode rows in the same steps: every prefill and mixed step
    replays the piecewise graphs of its padded token count around eager attention."""
    model_dir = tiny_model_factory(arch)
    common = dict(dtype="float32", max_num_batched_tokens=96)
    pieced = gpu_llm(model_dir, **common)
    eager = gpu_llm(model_dir, enforce_eager=True, **common)
    batch = prompts(pieced.engine.arch.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=2)
    got = pieced.generate(batch, params)
    want = eager.generate(batch, params)
    assert pieced.engine.stats().num_piecewise_steps > 0
    assert eager.engine.stats().num_piecewise_steps == 0
    assert_same_tokens(got, want)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_steps_never_wait_for_the_stream(tiny_model_factory, temperature: float) -> None:
    """Overlapped decode steps (graphs, sampling at random or greedy) queue the next step
    before reading this one back, and nothing on the way synchronises the stream: torch's
    sync debug mode turns any such call (a pageable copy to the device, a blocking read)
    into an error. The tokens are read through an event, which it does not count."""
    model_dir = tiny_model_factory("llama")
    llm = gpu_llm(model_dir, dtype="bfloat16", cuda_graph_max_batch=8)
    core = llm.engine
    assert core.overlap
    rng = random.Random(3)
    vocab = core.arch.vocab_size
    params = SamplingParams(temperature=temperature, max_tokens=40, ignore_eos=True)
    for i in range(6):
        core.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(30 + i)], params)
    for _ in range(4):  # the prefills, then decode rows only
        core.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            assert len(core.step()) == 6
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert core.runner.num_graph_steps >= 10


def test_forward_passes_are_timed_on_the_device(tiny_model_factory) -> None:
    """Every pass of a run is read back from its CUDA events by kind, and the device time
    they add up to fits in the run's wall time."""
    llm = gpu_llm(tiny_model_factory("llama"), dtype="bfloat16")
    batch = prompts(llm.engine.arch.vocab_size)
    started = time.perf_counter()
    llm.generate(batch, GREEDY)
    wall_s = time.perf_counter() - started
    torch.cuda.synchronize()
    stats = llm.engine.stats()
    assert stats.forwards_prefill >= 1 and stats.forwards_decode >= NUM_NEW - 1
    assert stats.forward_rows_decode >= stats.forwards_decode
    assert stats.forward_device_s_prefill > 0 and stats.forward_device_s_decode > 0
    assert stats.forward_device_s_prefill + stats.forward_device_s_decode <= wall_s


def _captured_graphs(count: int) -> list[torch.cuda.CUDAGraph]:
    x = torch.zeros(4, device="cuda")
    graphs = []
    for _ in range(count):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.add_(1)
        graphs.append(graph)
    return graphs


def test_capture_survives_older_graphs_left_in_garbage_cycles(tiny_model_factory, monkeypatch):
    """Each capture begins by dropping an older captured graph into an unreachable cycle,
    and the collector runs at every allocation: had it freed one there, the graph's
    destructor would fail the capture (an engine built after another in one process). The
    engine's captures collect first and keep the collector off until they end."""
    import gc

    old_graphs = _captured_graphs(400)
    real_graph = torch.cuda.graph

    class DropsAnOldGraph(real_graph):  # type: ignore[misc, valid-type]
        def __enter__(self) -> None:
            super().__enter__()
            if old_graphs:
                cycle: list[Any] = [old_graphs.pop()]
                cycle.append(cycle)  # only the collector frees it

    monkeypatch.setattr(torch.cuda, "graph", DropsAnOldGraph)
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        llm = gpu_llm(
            tiny_model_factory("llama"), dtype="bfloat16", max_num_batched_tokens=96,
            cuda_graph_max_batch=8,
        )  # fmt: skip
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()  # the dropped graphs, now that no capture runs
    vocab = llm.engine.arch.vocab_size
    out = llm.generate([[i % vocab for i in range(40)]] * 3, GREEDY)
    assert [len(o.outputs[0].token_ids) for o in out] == [NUM_NEW] * 3
    assert llm.engine.runner.num_graph_steps > 0 and llm.engine.stats().num_piecewise_steps > 0
