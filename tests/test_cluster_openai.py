"""The official `openai` client against `splitserve up` (Redis, router, one prefill and one
decode node as processes, the tiny llama on CPU): the API surface, and greedy output equal
to the engine's offline output for the same prompt."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.processes import ManagedProcess

# Real node processes (or two NIXL processes): `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

MODEL = "tiny"
LONG_PROMPT = " ".join(
    f"The harbour lights were counted one by one, number {i}." for i in range(30)
)


@pytest.fixture(scope="module")
def up_process(tiny_llama):
    proc = ManagedProcess.splitserve(
        "up",
        "up",
        "--model",
        str(tiny_llama),
        "--served-model-name",
        MODEL,
        "--port",
        "0",
        "--cpu",
        "--node-arg=--dtype=float32",
        ready_pattern=re.compile(r"OpenAI API: (\S+)/v1"),
    ).start(timeout_s=240)
    yield proc
    assert proc.stop(timeout_s=60) == 0


@pytest.fixture(scope="module")
def up(up_process) -> str:
    return up_process.address


@pytest.fixture(scope="module")
def client(up) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{up}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32")


def offline_text(llm: LLM, prompt_ids: list[int], max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate([prompt_ids], params)[0].outputs[0].text


def chat_ids(llm: LLM, content: str) -> list[int]:
    ids = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_models_and_health(up, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{up}/health").json()
    assert health["status"] == "ok" and health["redis"] == "up"
    assert health["num_prefill_nodes"] == 1 and health["num_decode_nodes"] == 1


def test_up_prints_every_metrics_endpoint(up_process) -> None:
    line = next(line for line in up_process.lines if line.strip().startswith("metrics:"))
    urls = re.findall(r"(router|prefill-0|decode-0) (http://\S+/metrics)", line)
    assert [name for name, _ in urls] == ["router", "prefill-0", "decode-0"], line
    for _, url in urls:
        assert "splitserve_" in httpx.get(url.rstrip(","), timeout=10).text


@pytest.mark.parametrize("content", ["What is the tide like?", LONG_PROMPT])
def test_chat_greedy_matches_offline_engine(client, offline, content) -> None:
    expected = offline_text(offline, chat_ids(offline, content), 16)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(chat_ids(offline, content))
    assert reply.usage.completion_tokens == 16 or reply.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_greedy_stream_and_not(client, offline) -> None:
    prompt = "The fishing boats came back at dawn"
    ids = list(offline.get_tokenizer()(prompt)["input_ids"])
    expected = offline_text(offline, ids, 12)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.total_tokens == len(ids) + 12
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected


def test_n_2_and_seeded_sampling(client) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="A quiet morning", max_tokens=10, n=2, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.choices[0].text != reply.choices[1].text
    again = client.completions.create(
        model=MODEL, prompt="A quiet morning", max_tokens=10, n=2, temperature=1.0, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]


def test_stop_string_cuts_the_text(client) -> None:
    base = (
        client.completions.create(
            model=MODEL, prompt="Rain over the hills", max_tokens=24, temperature=0
        )
        .choices[0]
        .text
    )
    stop = next((base[i : i + 2] for i in range(3, len(base) - 2) if base[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("greedy text too short to carve a stop string from")
    reply = client.completions.create(
        model=MODEL, prompt="Rain over the hills", max_tokens=24, temperature=0, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == base[: base.index(stop)]


def test_logprobs_in_openai_shapes(client) -> None:
    comp = client.completions.create(
        model=MODEL, prompt="Sunset", max_tokens=4, temperature=0, logprobs=2
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


def test_bad_input_is_a_4xx_and_the_cluster_keeps_serving(client, up) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=2)
    bad_json = httpx.post(
        f"{up}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    ok = client.completions.create(model=MODEL, prompt="Still here", max_tokens=3)
    assert ok.choices[0].text is not None


def test_bench_tool_against_the_cluster(up, tmp_path) -> None:
    """`splitserve bench run` end to end against our own cluster: every request completes,
    output tokens come from the server's usage, and the files and plots are written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "splitserve.launch.cli",
        "bench",
        "run",
        "--url",
        up,
        "--model",
        MODEL,
        "--workload",
        "shared-prefix",
        "--num-prefixes",
        "2",
        "--prefix-len",
        "64",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--num-requests",
        "16",
        "--arrival",
        "poisson",
        "--rate",
        "8",
        "--seed",
        "1",
        "--ignore-eos",
        "--slo",
        "ttft=5s,tpot=1s",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["num_completed"] == 16 and counts["num_failed"] == 0
    assert counts["output_token_sources"] == {"usage": 16}
    assert summary["throughput"]["num_output_tokens"] == 16 * 8
    assert summary["metrics"]["ttft_ms"]["p50"]["value"] > 0
    assert summary["slo"]["attainment"] == 1.0
    assert (out / "requests.jsonl").read_text().count("\n") == 16
    assert (out / "latency_cdf.png").stat().st_size > 0
