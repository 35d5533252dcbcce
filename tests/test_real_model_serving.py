"""The real model through `splitserve up` (Redis, router, one prefill and one decode node)
with the official `openai` client.

`splitserve up` with no --model answers the demo question in English; the chat answer
stops at the end-of-turn token, streamed and not; 16 prompts disaggregated (prefilled on
the prefill node, KV pushed over NIXL) get transformers' greedy tokens (`smollm2_case`,
tests/real_model_case.py); a node started with a corrupt GGUF fails alone.
"""

from __future__ import annotations

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
from real_model_case import NUM_NEW

from splitserve.engine.model.source import DEFAULT_MODEL
from splitserve.launch.processes import ManagedProcess

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


def test_disaggregated_tokens_match_transformers(
    smollm2, up, client: openai.OpenAI, smollm2_case
) -> None:
    """1P1D through the router: each prompt prefilled on the prefill node, its KV pushed
    over NIXL, decoded on the decode node; the tokens are transformers' greedy tokens. A
    mismatch reports the cluster's last output lines (the nodes' warnings: a fall-back to
    a local prefill, a failed push), to tell which path the request took."""
    from transformers import AutoTokenizer

    prompts, expected = smollm2_case
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
    for index, (reply, want) in enumerate(zip(replies, expected, strict=True)):
        choice = reply.choices[0]
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in want], (
            f"prompt {index} ({len(prompts[index])} tokens, request {reply.id}); the "
            f"cluster's last lines:\n{up.tail(80)}"
        )
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
