"""The correctness oracle: greedy tokens identical to transformers `generate` on the same
weights, for every architecture and every engine mode; logprobs equal to transformers'
log-softmax."""

from __future__ import annotations

import random

import pytest
import torch

from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
NUM_NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """16 prompts of 1 to 600 tokens; half of them share a 300-token prefix."""
    rng = random.Random(seed)
    lengths = [1, 2, 15, 16, 17, 33, 64, 100, 129, 200, 255, 256, 257, 400, 511, 600]
    shared = [rng.randrange(vocab) for _ in range(300)]
    prompts = []
    for i, n in enumerate(lengths):
        if i % 2 and n > 300:
            prompts.append(shared + [rng.randrange(vocab) for _ in range(n - 300)])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(n)])
    prompts.append(shared + [rng.randrange(vocab) for _ in range(20)])
    return prompts


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tiny_model_factory, hf_greedy):
    model_dir = tiny_model_factory(request.param)
    llm = LLM(str(model_dir), dtype="float32")
    prompts = make_prompts(llm.engine.arch.vocab_size)
    expected = hf_greedy(model_dir, prompts, NUM_NEW)
    assert all(len(e) == NUM_NEW for e in expected)
    return model_dir, prompts, expected


def generate_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


MODES = {
    "one_batch": dict(max_num_batched_tokens=16384, enable_prefix_caching=False),
    "chunked_64": dict(max_num_batched_tokens=64, enable_prefix_caching=False),
    "prefix_cache": dict(max_num_batched_tokens=512),
    "preemption": dict(max_num_batched_tokens=256, num_blocks=48),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(arch_case, mode: str) -> None:
    model_dir, prompts, expected = arch_case
    llm = LLM(str(model_dir), dtype="float32", **MODES[mode])
    got = generate_tokens(llm, prompts)
    assert got == expected
    if mode == "prefix_cache":
        # Warm: the same prompts again hit the cache and still give identical tokens.
        before = llm.engine.stats()
        assert generate_tokens(llm, prompts) == expected
        after = llm.engine.stats()
        assert after.prefix_cache_hits > before.prefix_cache_hits
        assert (after.prompt_tokens_computed - before.prompt_tokens_computed) < sum(
            len(p) for p in prompts
        ) // 4
    if mode == "preemption":
        assert llm.engine.stats().num_preemptions > 0
    llm.engine.check_invariants()
    assert llm.engine.pool.usage == 0.0


def test_logprobs_match_transformers(tiny_model_factory) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory("llama")
    llm = LLM(str(model_dir), dtype="float32")
    prompt = make_prompts(llm.engine.arch.vocab_size, seed=3)[9]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    comp = llm.generate([prompt], params)[0].outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == 8
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt + comp.token_ids])
        ref = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    for step, entry in enumerate(comp.logprobs):
        row = ref[len(prompt) - 1 + step]
        assert entry.token_id == comp.token_ids[step]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        assert entry.rank == 1
        top_vals, top_ids = row.topk(5)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        for (_, lp), ref_lp in zip(entry.top, top_vals.tolist(), strict=True):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
