"""The real-model oracle shared by tests/test_real_model.py (engine modes) and
tests/test_real_model_serving.py (through `splitserve up`): 16 prompts (8 chat-templated,
8 raw, 1 to 1,500 tokens) and transformers' greedy tokens for them, computed once per test
run into the run's shared folder (the first xdist worker to need them computes them under
a file lock, the other waits and reads them), so that the two files can run on different
workers."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import torch

NUM_NEW = 64
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


def load_hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_case(model_dir: Path, shared: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, transformers' greedy tokens), EOS ignored as with ignore_eos: read from
    `shared`, or computed there once under its lock."""
    path = shared / "reference.json"
    with open(shared / "reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            aside = path.with_suffix(".partial")
            aside.write_text(json.dumps(compute_reference(model_dir)))
            os.rename(aside, path)
    data = json.loads(path.read_text())
    return data["prompts"], data["expected"]


def compute_reference(model_dir: Path) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir))
    assert len(prompts) == 16 and min(map(len, prompts)) == 1 and max(map(len, prompts)) == 1500
    hf_model = load_hf_model(model_dir)
    expected: dict[int, list[int]] = {}
    for group in length_groups(prompts):
        outs = hf_generate(hf_model, [prompts[i] for i in group])
        expected.update(zip(group, outs, strict=True))
    return {"prompts": prompts, "expected": [expected[i] for i in range(len(prompts))]}
