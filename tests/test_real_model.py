"""The real model by default (the built-in SmolLM2-135M-Instruct, dequantized to fp32), in
the engine.

Fidelity: greedy tokens identical to transformers `generate` on the same weights for 16
prompts (chat-templated and raw, 1 to 1,500 tokens, 64 new tokens) in every engine mode
(one batch, chunked prefill, warm prefix cache, preemption; 1P1D through the router is in
tests/test_real_model_serving.py); logprobs within 1e-4; perplexity within 1e-3 relative.
The model is converted once per test run (the `smollm2` fixture); the transformers
reference once per run too (`smollm2_case`, tests/real_model_case.py).
"""

from __future__ import annotations

import gc
import math
from typing import Any

import pytest
import torch
from real_model_case import NUM_NEW, PASSAGE, load_hf_model

from splitserve.engine.llm import LLM
from splitserve.engine.model_runner import build_batch
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledChunk

GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model(smollm2) -> Any:
    return load_hf_model(smollm2[1])


def make_llm(smollm2, **kwargs: Any) -> LLM:
    gc.collect()  # the previous test's engine and its KV pool
    return LLM(str(smollm2[1]), dtype="float32", **kwargs)


def generate_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def test_one_batch_then_warm_prefix_cache(smollm2, smollm2_case, hf_model) -> None:
    """Every prompt in one step (tokens and logprobs), then the same prompts again with
    their prefixes cached (most of the prompt is not recomputed; tokens unchanged)."""
    prompts, expected = smollm2_case
    llm = make_llm(smollm2, max_num_batched_tokens=16384)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=3)
    outs = generate_tokens(llm, prompts, params)
    assert [o.token_ids for o in outs] == expected
    for index in (0, 5, 13):  # a chat prompt, a 257-token and a 700-token raw one
        prompt, out = prompts[index], outs[index]
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + out.token_ids])).logits[0]
        ref = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 :]
        assert out.logprobs is not None and len(out.logprobs) == NUM_NEW
        for step, entry in enumerate(out.logprobs):
            assert entry.logprob == pytest.approx(ref[step, entry.token_id].item(), abs=1e-4)
            top_vals, top_ids = ref[step].topk(3)
            got_ids = [t for t, _ in entry.top]
            # Near-ties among the alternatives may order either way; their values may not.
            for token_id, lp in entry.top:
                assert lp == pytest.approx(ref[step, token_id].item(), abs=1e-4)
            assert got_ids[0] == top_ids[0].item()
            assert [lp for _, lp in entry.top] == pytest.approx(top_vals.tolist(), abs=1e-4)
    before = llm.engine.stats()
    assert [o.token_ids for o in generate_tokens(llm, prompts)] == expected
    after = llm.engine.stats()
    assert after.prefix_cache_hits > before.prefix_cache_hits
    computed = after.prompt_tokens_computed - before.prompt_tokens_computed
    assert computed < sum(map(len, prompts)) // 4
    llm.engine.check_invariants()
    assert llm.engine.pool.usage == 0.0


def test_chunked_prefill_with_preemption(smollm2, smollm2_case) -> None:
    """512-token steps (the 700- and 1,500-token prompts take several chunks) in a pool too
    small for every request at once (some are preempted and recomputed)."""
    prompts, expected = smollm2_case
    llm = make_llm(smollm2, max_num_batched_tokens=512, num_blocks=160)
    assert [o.token_ids for o in generate_tokens(llm, prompts)] == expected
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.prompt_tokens_computed >= sum(map(len, prompts))
    llm.engine.check_invariants()
    assert llm.engine.pool.usage == 0.0


class _Passage:
    """The one request of a perplexity pass, as build_batch reads it."""

    def __init__(self, token_ids: list[int], block_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.block_ids = block_ids
        self.num_tokens = len(token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        return self.token_ids[start:end]


def engine_passage_logprobs(llm: LLM, ids: list[int], chunk: int) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) from the engine's model over its paged KV pool, in
    prefill chunks of `chunk` tokens (the pool must be idle)."""
    core = llm.engine
    num_blocks = -(-len(ids) // core.block_size)
    request = _Passage(ids, list(range(num_blocks)))
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            step = ScheduledChunk(request, start, min(chunk, len(ids) - start))
            batch = build_batch([step], core.block_size, core.device)
            hidden = core.model(batch.input_ids, batch.positions, core.kv_cache, batch.meta)
            rows.append(torch.log_softmax(core.model.compute_logits(hidden), dim=-1))
    logprobs = torch.cat(rows)[:-1]
    return logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_perplexity_matches_transformers(smollm2, hf_model) -> None:
    llm = make_llm(smollm2, enable_prefix_caching=False)
    ids = llm.get_tokenizer().encode(PASSAGE, add_special_tokens=False)
    assert 250 <= len(ids) <= 600
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1))
    ref_ppl = math.exp(-ref.mean().item())
    got_ppl = math.exp(-engine_passage_logprobs(llm, ids, chunk=96).mean().item())
    assert 1.0 < ref_ppl < 100.0  # English to a real model, not noise
    assert got_ppl == pytest.approx(ref_ppl, rel=1e-3)


# --- Through `splitserve up` (1 prefill + 1 decode node, router, Redis) with `openai` ---
