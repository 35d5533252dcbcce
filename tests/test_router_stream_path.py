"""The router's per-token streaming path: the request's mailbox, the SSE frames rendered
from a prepared header, and one write for what came together."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import node_pb2 as pb
from splitserve.router.mailbox import Mailbox
from splitserve.router.prepare import PreparedRequest
from splitserve.router.responses import ResponseBuilder, sse


def test_mailbox_hands_over_everything_put_in_order_and_waits_when_empty() -> None:
    async def main() -> list[list[int]]:
        box: Mailbox[int] = Mailbox()
        box.put(1)
        box.put(2)
        got = [await box.take_all()]
        consumer = asyncio.create_task(box.take_all())
        await asyncio.sleep(0)  # the consumer now waits on an empty mailbox
        assert not consumer.done()
        box.put(3)
        box.put(4)  # before the consumer runs: the same batch
        got.append(await consumer)
        box.put(5)
        got.append(await box.take_all())
        assert len(box) == 0
        return got

    assert asyncio.run(main()) == [[1, 2], [3, 4], [5]]


def test_mailbox_consumer_cancelled_while_waiting_leaves_it_usable() -> None:
    async def main() -> list[int]:
        box: Mailbox[int] = Mailbox()
        waiting = asyncio.create_task(box.take_all())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        box.put(7)  # no waiter left to wake: it stays for the next take
        return await box.take_all()

    assert asyncio.run(main()) == [7]


def _prepared(kind: str, n: int = 1, num_prompts: int = 1, usage: bool = False) -> PreparedRequest:
    return PreparedRequest(
        kind=kind,  # type: ignore[arg-type]
        request_id="abc",
        model="m-é",
        prompts=tuple((1, 2, 3) for _ in range(num_prompts)),
        params=tuple(SamplingParams(n=n, max_tokens=8) for _ in range(num_prompts)),
        stream=True,
        include_usage=usage,
        continuous_usage=usage,
        arrival_s=time.perf_counter(),
        created=1_800_000_000,
    )


def _message(index: int, ids: list[int], text: str, finish: str | None = None) -> Any:
    delta = pb.CompletionDelta(index=index, token_ids=ids, text=text)
    if finish is not None:
        delta.finish_reason = finish
        delta.stop_token_id = 2
    return pb.GenerateResponse(request_id="r", deltas=[delta], finished=finish is not None)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("usage", [False, True])
def test_chunk_frames_are_the_text_json_dumps_makes_of_the_whole_chunk(
    kind: str, usage: bool
) -> None:
    builder = ResponseBuilder(_prepared(kind, usage=usage), tokenizer=None)  # type: ignore[arg-type]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    header = {"id": builder.id, "object": obj, "created": 1_800_000_000, "model": "m-é"}
    last_choices: list[dict[str, Any]] = []
    for msg in (_message(0, [5], "ü"), _message(0, [6, 7], ' "x"\n', finish="stop")):
        last_choices = builder.add(0, msg)
        expected: dict[str, Any] = {**header, "choices": last_choices}
        if usage:
            expected["usage"] = builder.usage.json()
        assert builder.chunk_frame(last_choices, with_usage=usage) == sse(expected)
    assert last_choices[0]["finish_reason"] == "stop"
    assert json.loads(builder.usage_frame()[len("data: ") :]) == {
        **header,
        "choices": [],
        "usage": builder.usage.json(),
    }


def test_chat_role_frame_names_the_assistant_for_every_choice() -> None:
    builder = ResponseBuilder(_prepared("chat", n=2), tokenizer=None)  # type: ignore[arg-type]
    body = json.loads(builder.role_frame()[len("data: ") :])
    assert body["object"] == "chat.completion.chunk"
    assert [c["delta"] for c in body["choices"]] == [{"role": "assistant", "content": ""}] * 2


def test_a_stream_keeps_no_whole_response_text_but_a_whole_response_does() -> None:
    streamed = ResponseBuilder(_prepared("completion"), tokenizer=None)  # type: ignore[arg-type]
    streamed.add(0, _message(0, [5], "ab", finish="length"))
    assert streamed.choices[0].text == [] and streamed.choices[0].finish_reason == "length"
    whole = ResponseBuilder(
        PreparedRequest(**{**_prepared("completion").__dict__, "stream": False}),
        tokenizer=None,  # type: ignore[arg-type]
    )
    whole.add(0, _message(0, [5], "ab", finish="length"))
    assert whole.response()["choices"][0]["text"] == "ab"


def test_frames_that_came_together_go_out_in_one_write() -> None:
    """Two prompts' messages taken in one batch make one string for the HTTP server, each
    prompt's frame in it; then the usage frame and [DONE]."""
    from types import SimpleNamespace

    from splitserve.protocol.tracing import NO_SPAN
    from splitserve.router.coalesce import StreamItem
    from splitserve.router.handlers import _SSEStream
    from splitserve.router.metrics import RouterMetrics

    prepared = _prepared("completion", num_prompts=2, usage=True)
    batches = [
        [StreamItem(0, _message(0, [5], "a"), None), StreamItem(1, _message(0, [6], "b"), None)],
        [StreamItem(0, _message(0, [7], "c", "stop"), None)],
        [StreamItem(1, _message(0, [8], "d", "stop"), None)],
    ]

    class Streams:
        async def next_items(self) -> list[StreamItem]:
            return batches.pop(0) if batches else []

        async def aclose(self) -> None:
            pass

    service = SimpleNamespace(metrics=RouterMetrics())
    builder = ResponseBuilder(prepared, tokenizer=None)  # type: ignore[arg-type]
    stream = _SSEStream(service, "completions", Streams(), builder, NO_SPAN)  # type: ignore[arg-type]

    async def main() -> list[str]:
        return [text async for text in stream.events()]

    writes = asyncio.run(main())
    assert len(writes) == 5  # the pair, then one frame each, usage, [DONE]
    pair = [json.loads(f[len("data: ") :]) for f in writes[0].split("\n\n") if f]
    assert [(c["index"], c["text"]) for body in pair for c in body["choices"]] == [
        (0, "a"),
        (1, "b"),
    ]
    assert writes[-1] == "data: [DONE]\n\n" and stream.status == 200
