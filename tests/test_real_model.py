"""The real model by default (the built-in SmolLM2-135M-Instruct, dequantized to fp32).

Fidelity: greedy tokens identical to transformers `generate` on the same weights for 16
prompts (chat-templated and raw, 1 to 1,500 tokens, 64 new tokens) in every mode (one
batch, chunked prefill, warm prefix cache, preemption, and 1P1D through the router);
logprobs within 1e-4; perplexity within 1e-3 relative. Serving: `splitserve up` with no
--model answers the demo question in English, and through the official `openai` client
the chat answer stops at the end-of-turn token, streamed and not. The model is converted
once per test run (the `smollm2` fixture); the transformers reference is computed once.
"""

from __future__ import annotations

import gc
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from splitserve.engine.llm import LLM
from splitserve.engine.model.source import DEFAULT_MODEL
from splitserve.engine.model_runner import build_batch
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledChunk
from splitserve.launch.processes import ManagedProcess

NUM_NEW = 64
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
RAW_LENGTHS = (1, 9, 16, 17, 100, 257, 700, 1500)
PAD_ID = 2  # SmolLM2's pad token (<|im_end|>), masked out of the reference batches
# Written for this test: plain English, no rare names, a few hundred tokens.
PASSAGE = (
    "When the first railway reached the town, the old coaching inn lost most of its trade "
    "within a year. The landlord, a careful man who kept his accounts in a green ledger, "
    "decided that travellers were not coming back and that he would have to find other "
    "guests. He turned the stables into a workshop for a young carpenter, let the long room "
    "upstairs to a teacher who wanted to open a small school, and planted vegetables where "
    "the coaches had once turned in the yard. People laughed at him at first. They said an "
    "inn without horses was like a church without a bell. But the carpenter was good at his "
    "work, and farmers from the nearby villages began to bring him broken chairs, cart "
    "wheels and doors that no longer closed. While they waited, they ate in the kitchen and "
    "talked about the weather, the price of wheat and the new station, which most of them "
    "had never used. The school did well too. By the second winter there were twenty "
    "children in the long room, and their parents paid the teacher partly in money and "
    "partly in eggs, cheese and firewood, which she shared with the landlord. Ten years "
    "later the railway company built a larger station on the other side of the river, and "
    "the town grew towards it. The inn was no longer on the main road to anywhere, yet it "
    "was busier than it had ever been in the days of the coaches. When a visitor asked the "
    "landlord how he had managed it, he opened the green ledger, turned to the year the "
    "trains arrived, and said that he had simply stopped waiting for the customers he had "
    "lost and started looking after the ones who were already at his door."
)
CHATS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "Name three fruits."},
        {"role": "assistant", "content": "Apples, pears and plums."},
        {"role": "user", "content": "Which of them is the sweetest?"},
    ],
    [{"role": "user", "content": "Explain in simple words how a bicycle stays upright."}],
    [{"role": "user", "content": f"Summarise this story in two sentences.\n\n{PASSAGE}"}],
    [{"role": "user", "content": f"What did the landlord keep his accounts in?\n\n{PASSAGE}"}],
)


def corpus_text() -> str:
    import splitserve.engine.model as model_pkg

    return (Path(model_pkg.__file__).parent / "tiny_corpus.txt").read_text()


def make_prompts(tokenizer: Any) -> list[list[int]]:
    """8 chat-templated and 8 raw prompts, 1 to 1,500 tokens."""
    corpus = tokenizer.encode(corpus_text(), add_special_tokens=False)
    if len(corpus) < max(RAW_LENGTHS):
        raise RuntimeError(f"tiny_corpus.txt has only {len(corpus)} tokens")
    raw = [corpus[i * 37 : i * 37 + n] for i, n in enumerate(RAW_LENGTHS)]
    chats = []
    for messages in CHATS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append(tokenizer.encode(text, add_special_tokens=False))
    return [p for pair in zip(chats, raw, strict=True) for p in pair]


@pytest.fixture(scope="module")
def hf_model(smollm2) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def case(smollm2, hf_model) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, transformers' greedy tokens), EOS ignored as with ignore_eos."""
    from transformers import AutoTokenizer

    prompts = make_prompts(AutoTokenizer.from_pretrained(smollm2[1]))
    assert len(prompts) == 16 and min(map(len, prompts)) == 1 and max(map(len, prompts)) == 1500
    expected: dict[int, list[int]] = {}
    for group in length_groups(prompts):
        outs = hf_generate(hf_model, [prompts[i] for i in group])
        expected.update(zip(group, outs, strict=True))
    return prompts, [expected[i] for i in range(len(prompts))]


def length_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Prompt indices grouped by length (left padding stays under the longest's length)."""
    bounds = (64, 300, 800, 1 << 30)
    groups: list[list[int]] = [[] for _ in bounds]
    for i, prompt in enumerate(prompts):
        groups[next(b for b, top in enumerate(bounds) if len(prompt) <= top)].append(i)
    return [g for g in groups if g]


def hf_generate(hf_model: Any, prompts: list[list[int]]) -> list[list[int]]:
    """transformers `generate`, greedy, one left-padded batch, NUM_NEW tokens each."""
    from transformers import GenerationConfig

    hf_model.generation_config.eos_token_id = None
    config = GenerationConfig(do_sample=False, max_new_tokens=NUM_NEW, pad_token_id=PAD_ID)
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, generation_config=config)
    return [row[width:].tolist() for row in out]


def make_llm(smollm2, **kwargs: Any) -> LLM:
    gc.collect()  # the previous test's engine and its KV pool
    return LLM(str(smollm2[1]), dtype="float32", **kwargs)


def generate_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def test_one_batch_then_warm_prefix_cache(smollm2, case, hf_model) -> None:
    """Every prompt in one step (tokens and logprobs), then the same prompts again with
    their prefixes cached (most of the prompt is not recomputed; tokens unchanged)."""
    prompts, expected = case
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


def test_chunked_prefill_with_preemption(smollm2, case) -> None:
    """512-token steps (the 700- and 1,500-token prompts take several chunks) in a pool too
    small for every request at once (some are preempted and recomputed)."""
    prompts, expected = case
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

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def up(smollm2):
    """`splitserve up --demo` on the default model, every prompt disaggregated."""
    proc = ManagedProcess.splitserve(
        "up",
        "up",
        "--port",
        "0",
        "--cpu",
        "--demo",
        "--node-arg=--dtype=float32",
        "--router-arg=--disagg-min-tokens=0",
        env={"SPLITSERVE_CACHE": str(smollm2[0])},
        ready_pattern=re.compile(r"^reply: "),
    ).start(timeout_s=300)
    yield proc
    assert proc.stop(timeout_s=60) == 0


@pytest.fixture(scope="module")
def client(up) -> openai.OpenAI:
    url = next(m.group(1) for line in up.lines if (m := re.search(r"OpenAI API: (\S+)", line)))
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


def test_up_demo_answers_in_english(up) -> None:
    assert any(
        line.startswith("demo request: 'What is the capital of France?'") for line in up.lines
    )
    reply = next(line for line in up.lines if line.startswith("reply: "))
    assert "Paris" in reply


def test_chat_answer_stops_at_end_of_turn(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=64
    )
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens < 64
    assert "<|im_end|>" not in (choice.message.content or "")


def test_streamed_chat_answer_stops_at_end_of_turn(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert "Paris" in text and finish == ["stop"]


def test_disaggregated_tokens_match_transformers(smollm2, client: openai.OpenAI, case) -> None:
    """1P1D through the router: each prompt prefilled on the prefill node, its KV pushed
    over NIXL, decoded on the decode node; the tokens are transformers' greedy tokens."""
    from transformers import AutoTokenizer

    prompts, expected = case
    tokenizer = AutoTokenizer.from_pretrained(smollm2[1])

    def complete(prompt: list[int]) -> Any:
        return client.completions.create(
            model=DEFAULT_MODEL,
            prompt=prompt,
            temperature=0,
            max_tokens=NUM_NEW,
            logprobs=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent, as the decode node batches
        replies = list(pool.map(complete, prompts))
    for reply, want in zip(replies, expected, strict=True):
        choice = reply.choices[0]
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in want]
        assert choice.text == tokenizer.decode(want)
    metrics = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics", timeout=30).text
    remote = re.search(r'routing_decisions_total\{[^}]*prefill="remote"[^}]*\} (\S+)', metrics)
    assert remote is not None and float(remote.group(1)) >= len(prompts)


def test_bad_model_node_fails_alone(smollm2, up, client: openai.OpenAI, tmp_path: Path) -> None:
    """A node started with a corrupt GGUF exits with one line naming the fix; the cluster
    it tried to join keeps serving."""
    redis_url = next(m.group(1) for line in up.lines if (m := re.search(r"Redis (\S+)", line)))
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"not a gguf" * 100)
    argv = ["decode", "--model", str(bad), "--redis", redis_url]
    done = subprocess.run(
        [sys.executable, "-m", "splitserve.launch.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SPLITSERVE_CACHE": str(smollm2[0])},
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [line for line in done.stderr.splitlines() if line.startswith("splitserve")]
    assert len(errors) == 1 and "not a readable GGUF file" in errors[0]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=64
    )
    assert "Paris" in (reply.choices[0].message.content or "")
