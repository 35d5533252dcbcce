"""The router's OpenAI API over real HTTP, against scripted decode nodes on real gRPC and a
real redis-server: responses, streaming, usage, logprobs, routing, errors, disconnects."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from scripted_decode import ScriptedDecodeNode

from splitserve.launch.redis_server import RedisServer
from splitserve.router.config import RouterConfig
from splitserve.router.server import RouterServer
from splitserve.router.tokenizer import RouterTokenizer

MODEL = "tiny"
API_KEY = "sekret"
SUSPECT_S = 0.5  # a node that answered UNAVAILABLE is left out of routing this long


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> RouterTokenizer:
    return RouterTokenizer.load(str(tiny_llama))


@pytest.fixture(scope="module")
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def nodes(
    redis_server: RedisServer, tokenizer: RouterTokenizer, cluster: str
) -> Iterator[list[ScriptedDecodeNode]]:
    started = [
        ScriptedDecodeNode(tokenizer, MODEL).start(redis_server.url, cluster) for _ in range(2)
    ]
    yield started
    for node in started:
        node.stop()


def start_router(
    redis_url: str, tokenizer: RouterTokenizer, cluster: str, api_key: str = "", **kwargs: Any
) -> RouterServer:
    config = RouterConfig(
        redis_url=redis_url,
        tokenizer="unused",
        model=MODEL,
        cluster=cluster,
        port=0,
        api_key=api_key,
        node_cache_s=0.1,
        suspect_s=SUSPECT_S,
        **kwargs,
    )
    return RouterServer(config, tokenizer=tokenizer, log_level="warning").start_in_thread()


@pytest.fixture(scope="module")
def router(
    redis_server: RedisServer,
    tokenizer: RouterTokenizer,
    cluster: str,
    nodes: list[ScriptedDecodeNode],
) -> Iterator[str]:
    server = start_router(redis_server.url, tokenizer, cluster)
    yield server.url
    server.stop_thread()


@pytest.fixture(autouse=True)
def reset_nodes(nodes: list[ScriptedDecodeNode]) -> None:
    for node in nodes:
        node.token_delay_s = 0.0
        node.fail_before_first = False
        node.fail_after_tokens = None


@pytest.fixture(scope="module")
def client(router: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router + "/v1", api_key="any", max_retries=0)


def all_requests(nodes: list[ScriptedDecodeNode]) -> dict[str, tuple[int, Any]]:
    return {r.request_id: (i, r) for i, n in enumerate(nodes) for r in n.requests}


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def reply_text(tokenizer: RouterTokenizer, nodes: list[ScriptedDecodeNode], k: int) -> str:
    return tokenizer.decode(nodes[0].reply_ids[:k])


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == 512  # type: ignore[attr-defined]


def test_completion_text_usage_and_request_id(router: str, tokenizer, nodes) -> None:
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 5, "temperature": 0.0}
    r = httpx.post(router + "/v1/completions", json=body, headers={"X-Request-Id": "req-abc"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc"
    out = r.json()
    assert out["id"] == "cmpl-req-abc" and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == reply_text(tokenizer, nodes, 5)
    assert out["choices"][0]["finish_reason"] == "length"
    prompt_len = len(tokenizer.encode("hello world", True))
    assert out["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 5,
        "total_tokens": prompt_len + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    sent = [r for rid, (_, r) in all_requests(nodes).items() if rid.startswith("req-abc-")]
    assert len(sent) == 1 and list(sent[0].prompt_token_ids) == tokenizer.encode(
        "hello world", True
    )
    generated = httpx.post(router + "/v1/completions", json=body).headers["x-request-id"]
    assert len(generated) == 32


def test_sampling_fields_reach_the_node(client: openai.OpenAI, nodes) -> None:
    client.completions.create(
        model=MODEL,
        prompt=[5, 6, 7],
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "min_tokens": 2,
            "ignore_eos": True,
            "repetition_penalty": 1.1,
            "stop_token_ids": [3],
            "skip_special_tokens": False,
        },
        extra_headers={"X-Request-Id": "fields"},
    )
    (_, req) = next(v for k, v in all_requests(nodes).items() if k.startswith("fields-"))
    sp = req.sampling_params
    assert list(req.prompt_token_ids) == [5, 6, 7] and sp.max_tokens == 3
    assert (sp.top_k, sp.seed, sp.min_tokens, sp.ignore_eos) == (5, 1234, 2, True)
    assert sp.temperature == pytest.approx(0.7) and sp.top_p == pytest.approx(0.9)
    assert sp.min_p == pytest.approx(0.1) and sp.repetition_penalty == pytest.approx(1.1)
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -0.5)
    assert list(sp.stop_token_ids) == [3] and sp.skip_special_tokens is False
    assert not req.HasField("prefill_node")


def test_batch_prompts_and_n_are_prompt_major(client: openai.OpenAI, tokenizer, nodes) -> None:
    out = client.completions.create(model=MODEL, prompt=["one", "two three"], n=2, max_tokens=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    first = reply_text(tokenizer, nodes, 2)
    rotated = tokenizer.decode(nodes[0].reply_ids[1:3])
    assert [c.text for c in out.choices] == [first, rotated, first, rotated]
    prompt_tokens = len(tokenizer.encode("one", True)) + len(tokenizer.encode("two three", True))
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 8
    ids = client.completions.create(model=MODEL, prompt=[[1, 2], [3, 4, 5]], max_tokens=1)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_echo_puts_each_prompt_before_its_choices(client: openai.OpenAI, tokenizer, nodes) -> None:
    out = client.completions.create(
        model=MODEL, prompt=["one", "two three"], n=2, max_tokens=2, echo=True
    )
    first, rotated = reply_text(tokenizer, nodes, 2), tokenizer.decode(nodes[0].reply_ids[1:3])
    assert [c.text for c in out.choices] == [
        "one" + first,
        "one" + rotated,
        "two three" + first,
        "two three" + rotated,
    ]
    assert out.usage.completion_tokens == 8  # the prompt is not counted twice
    stream = client.completions.create(
        model=MODEL, prompt="stream me", max_tokens=3, echo=True, stream=True
    )
    chunks = [c.choices[0].text for c in stream if c.choices]
    ids = client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=1, echo=True)
    assert ids.choices[0].text.startswith(tokenizer.decode([5, 6], skip_special_tokens=False))
    assert chunks[0].startswith("stream me") and "".join(chunks) == "stream me" + reply_text(
        tokenizer, nodes, 3
    )


def test_completion_streaming_with_usage(router: str, tokenizer, nodes) -> None:
    body = {
        "model": MODEL,
        "prompt": "stream me",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", router + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert len(chunks) == 4 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == reply_text(tokenizer, nodes, 4)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]


def test_chat_non_streaming_and_streaming(client: openai.OpenAI, tokenizer, nodes) -> None:
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "x"}],
        },
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reply_text(tokenizer, nodes, 3)
    text = tokenizer.hf.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nx"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert out.usage.prompt_tokens == len(tokenizer.encode(text, False))
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks[1:-1])
        == out.choices[0].message.content
    )
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_logprobs_shapes(client: openai.OpenAI, tokenizer, nodes) -> None:
    out = client.completions.create(model=MODEL, prompt="a", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 3
    ids = nodes[0].reply_ids[:3]
    assert lp.tokens == [tokenizer.token_str(t) for t in ids]
    assert lp.token_logprobs == [-0.5] * 3
    assert all(
        len(top) == 2 and top[s] == -0.5 for top, s in zip(lp.top_logprobs, lp.tokens, strict=True)
    )
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 2 and content[0].token == tokenizer.token_str(ids[0])
    assert content[0].bytes == list(content[0].token.encode()) and content[0].logprob == -0.5
    assert [t.logprob for t in content[0].top_logprobs] == [-0.5, -1.0, -1.5]
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert plain.choices[0].logprobs is None


def test_stop_string_is_propagated(client: openai.OpenAI, nodes) -> None:
    out = client.completions.create(
        model=MODEL, prompt="s", max_tokens=20, stop=["brown"], extra_headers={"X-Request-Id": "st"}
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == "brown"  # type: ignore[attr-defined]
    assert choice.text == " the quick "
    (_, req) = next(v for k, v in all_requests(nodes).items() if k.startswith("st-"))
    assert list(req.sampling_params.stop) == ["brown"]


def test_cache_aware_routing_follows_the_published_prefix(router: str, tokenizer, nodes) -> None:
    prompts = [[100 + (i * 7 + k) % 800 for i in range(200)] for k in range(2)]
    for owner, prompt in zip(nodes, prompts, strict=True):
        owner.publish_prefix(prompt)
    for owner_index, prompt in enumerate(prompts):
        for attempt in range(3):
            rid = f"cache-{owner_index}-{attempt}"
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
            r = httpx.post(router + "/v1/completions", json=body, headers={"X-Request-Id": rid})
            assert r.status_code == 200
            served_by = {i for k, (i, _) in all_requests(nodes).items() if k.startswith(rid + "-")}
            assert served_by == {owner_index}


def tokenize_roundtrip(router: str, tokenizer: RouterTokenizer) -> None:
    r = httpx.post(router + "/tokenize", json={"prompt": "hello there", "return_token_strs": True})
    out = r.json()
    assert out["tokens"] == tokenizer.encode("hello there", True)
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"])
    assert out["max_model_len"] == 512
    back = httpx.post(router + "/detokenize", json={"tokens": out["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(out["tokens"], skip_special_tokens=False)
    chat = httpx.post(router + "/tokenize", json={"messages": [{"role": "user", "content": "q"}]})
    assert chat.status_code == 200 and chat.json()["count"] > 3


def test_tokenize_and_detokenize(router: str, tokenizer) -> None:
    tokenize_roundtrip(router, tokenizer)


def test_health_and_metrics(router: str, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="m", max_tokens=2)
    health = httpx.get(router + "/health")
    assert health.status_code == 200
    assert health.json()["redis"] == "up" and health.json()["num_decode_nodes"] == 2
    text = httpx.get(router + "/metrics").text
    for name in (
        "splitserve_router_time_to_first_token_seconds_bucket",
        "splitserve_router_inter_token_latency_seconds_count",
        "splitserve_router_e2e_request_latency_seconds_count",
        "splitserve_router_routing_decision_seconds_count",
        "splitserve_router_prompt_tokens_total",
        "splitserve_router_generation_tokens_total",
        'splitserve_router_requests_total{endpoint="completions",status="200"}',
        "splitserve_router_node_num_running{",
        "splitserve_router_node_kv_usage{",
        "splitserve_router_node_prefix_cache_hit_rate{",
        "splitserve_router_node_engine_steps_total{",
        "splitserve_router_node_generation_tokens_total{",
    ):
        assert name in text, name
    pools = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("splitserve_router_node_kv_cache_tokens{")
    ]
    assert len(pools) == 2 and all(p > 0 and p % 16 == 0 for p in pools), pools


ERROR_CASES = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [2**32]}, 400, "stop"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temp"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 1e308}, 400, "temp"),
    (
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "repetition_penalty": NaN}',
        400,
        "repetition_penalty",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 2**40}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 2**40}, 400, "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 10**20}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": [2**33]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"1": 1e999}}, 400, None),
    ("/detokenize", {"tokens": [2**40]}, 400, "tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [7] * 600}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5000]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "echo": True},
        400,
        "echo",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {}}, 400, None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot"}]}, 400, None),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema"},
        },
        400,
        "response_format",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "guided_json": "{"}, 400, "guided_json"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]},
        400,
        "guided_choice",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "guided_regex": "a+", "structured_outputs": {"json": {}}},
        400,
        "structured_outputs.json",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]},
        400,
        "tools",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}},
        400,
        "logit_bias",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}},
        400,
        "logit_bias",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "prompt_logprobs": 1},
        400,
        "prompt_logprobs",
    ),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERROR_CASES)
def test_error_matrix(router: str, path: str, body: Any, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(router + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert "internal" not in error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_over_long_prompt_message_names_the_numbers(router: str) -> None:
    r = httpx.post(
        router + "/v1/completions", json={"model": MODEL, "prompt": [7] * 500, "max_tokens": 20}
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "20" in message and "500" in message and "512" in message


def test_openai_client_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    assert info.value.param == "messages"


def test_api_key_is_required_when_set(redis_server, tokenizer, cluster, nodes) -> None:
    server = start_router(redis_server.url, tokenizer, cluster, api_key=API_KEY)
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        missing = httpx.post(server.url + "/v1/completions", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["x-request-id"]
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        assert right.completions.create(**body).choices[0].text  # type: ignore[arg-type]
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop_thread()


def test_no_decode_node_is_503(redis_server, tokenizer) -> None:
    server = start_router(redis_server.url, tokenizer, f"empty{uuid.uuid4().hex[:8]}")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_decode_node"
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["redis"] == "up"
        assert httpx.get(server.url + "/v1/models").json()["data"] == []
    finally:
        server.stop_thread()


def test_node_failures(router: str, nodes) -> None:
    body = {"model": MODEL, "prompt": "fail", "max_tokens": 6}
    nodes[0].fail_before_first = True  # the request is re-routed to the other node
    for _ in range(2):
        assert httpx.post(router + "/v1/completions", json=body).status_code == 200
    nodes[1].fail_before_first = True
    r = httpx.post(router + "/v1/completions", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "node_unavailable"
    with httpx.stream("POST", router + "/v1/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 503
    for node in nodes:
        node.fail_before_first, node.fail_after_tokens = False, 2
    time.sleep(SUSPECT_S + 0.2)
    r = httpx.post(router + "/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    with httpx.stream("POST", router + "/v1/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        events = sse_events(s)
    assert events[-1] == "[DONE]" and "error" in events[-2] and "choices" in events[0]


# How long a test waits for the router's Decode.Abort after its client left.
ABORT_WAIT_S = 15.0


def wait_for_abort(nodes: list[ScriptedDecodeNode], prefix: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hits = [rid for n in nodes for rid in n.aborted if rid.startswith(prefix)]
        if hits:
            return hits[0]
        time.sleep(0.05)
    raise AssertionError(
        f"no Abort for {prefix}* reached a decode node in {timeout_s} s; the nodes had "
        f"{sorted(all_requests(nodes))} and aborted {[n.aborted for n in nodes]}"
    )


def test_client_disconnect_aborts_on_the_decode_node(router: str, nodes) -> None:
    for node in nodes:
        node.token_delay_s = 0.1
    # 200 tokens 0.1 s apart outlast every wait below: on a loaded machine the abort may come
    # late, but an abort that never comes still fails the test.
    body = {"model": MODEL, "prompt": "slow", "max_tokens": 200, "stream": True}
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST", router + "/v1/completions", json=body, headers={"X-Request-Id": "gone1"}
        ) as r,
    ):
        next(line for line in r.iter_lines() if line.startswith("data: "))
    aborted = wait_for_abort(nodes, "gone1-", ABORT_WAIT_S)
    assert aborted in all_requests(nodes)
    # A non-streamed request whose client leaves once a node has it (a raw socket, so the
    # client goes exactly then, not on a timer a loaded machine may beat).
    body["stream"] = False
    payload = json.dumps(body).encode()
    url = httpx.URL(router)
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}\r\nX-Request-Id: gone2\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode() + payload)
        deadline = time.monotonic() + 10
        while not any(rid.startswith("gone2-") for rid in all_requests(nodes)):
            assert time.monotonic() < deadline, "the request never reached a decode node"
            time.sleep(0.02)
    wait_for_abort(nodes, "gone2-", ABORT_WAIT_S)


def test_unknown_fields_are_ignored_logged_and_named(router: str, caplog) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "x"},
        ],
        "max_tokens": 2,
        "reasoning_effort": "low",
        "prompt_cache_key": "k1",
    }
    r = httpx.post(router + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-ignored-fields"] == "reasoning_effort, prompt_cache_key"
    nested = {"model": MODEL, "messages": [{"role": "user", "content": "x", "extra": 1}]}
    r = httpx.post(router + "/tokenize", json=nested)
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "messages.0.extra"


def test_openai_client_with_mainstream_extras(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"}],
        max_tokens=2,
        reasoning_effort="low",
        extra_body={"prompt_cache_key": "abc"},
    )
    assert reply.choices[0].message.content
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_strict_fields_keep_the_400(redis_server, tokenizer, cluster, nodes) -> None:
    server = start_router(redis_server.url, tokenizer, cluster, strict_fields=True)
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "bogus": 1}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    finally:
        server.stop_thread()


def test_http_methods_head_allow_and_unknown_paths(router: str) -> None:
    for path in ("/health", "/v1/models", f"/v1/models/{MODEL}", "/metrics"):
        head = httpx.head(router + path)
        assert head.status_code == 200 and head.content == b"", path
    r = httpx.delete(router + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.post(router + "/health")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = httpx.post(router + "/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.options(router + "/v1/completions").status_code == 405  # no CORS configured
    metrics = httpx.get(router + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")


def test_cors_when_configured(redis_server, tokenizer, cluster, nodes) -> None:
    server = start_router(redis_server.url, tokenizer, cluster, cors_origins=("https://a.example",))
    try:
        headers = {
            "Origin": "https://a.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        }
        pre = httpx.options(server.url + "/v1/chat/completions", headers=headers)
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://a.example"
        r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        other = httpx.get(server.url + "/v1/models", headers={"Origin": "https://b.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop_thread()


def test_openapi_describes_request_and_error_bodies(router: str) -> None:
    doc = httpx.get(router + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "ErrorResponse"):
        assert name in schemas, name
    post = doc["paths"]["/v1/chat/completions"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ChatCompletionRequest")
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    temperature = schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert temperature["minimum"] == 0 and temperature["maximum"] == 100
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_health_is_fresh(redis_server, tokenizer) -> None:
    """/health reads the node list at each call: a node gone from Redis is gone at once."""
    cluster = f"h{uuid.uuid4().hex[:8]}"
    node = ScriptedDecodeNode(tokenizer, MODEL).start(redis_server.url, cluster)
    server = start_router(redis_server.url, tokenizer, cluster)
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        node.stop()  # deregisters from Redis
        time.sleep(0.05)
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.stop_thread()


def test_unknown_fields_with_odd_names_are_escaped_in_the_header(router: str) -> None:
    body = '{"model": "tiny", "prompt": "x", "max_tokens": 1, "\\u00e9\\u0007\\ud835\\udd7f": 1'
    body += ', "": 2, " a ": 3}'
    r = httpx.post(router + "/v1/completions", content=body.encode())
    assert r.status_code == 200, r.text
    assert r.headers["x-ignored-fields"] == '\\xe9\\x07\\U0001d57f, "", \\x20a\\x20'
    r = httpx.post(router + "/tokenize", content=b'{"0": null, "": null, "prompt": ""}')
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == '0, ""', r.text
