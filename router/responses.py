"""OpenAI response bodies from decode-node messages: whole responses and SSE chunks.

Choice index = prompt index × n + the node's completion index (prompt-major). Logprobs use
the exact OpenAI shapes: completions `{tokens, token_logprobs, top_logprobs, text_offset}`
(top_logprobs maps token text to logprob and always holds the sampled token; text_offset
counts characters of the token strings), chat `{content: [{token, logprob, bytes,
top_logprobs}]}`. Token strings come from the router's tokenizer (one token decoded alone).
A chat request with a `ToolPlan` reads each choice's text as tool calls
(router/tool_stream.py): `message.tool_calls` or `delta.tool_calls`, and finish_reason
"tool_calls" when the choice stopped with calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.protocol import node_pb2 as pb
from splitserve.router.prepare import PreparedRequest
from splitserve.router.tokenizer import RouterTokenizer
from splitserve.router.tool_parsers import make_output_parser
from splitserve.router.tool_stream import ToolCallStream

# JSON has no -inf; OpenAI-compatible servers report impossible tokens with this floor.
MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _logprob(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else float(value)


def stop_reason(delta: pb.CompletionDelta) -> str | int | None:
    which = delta.WhichOneof("stop_reason")
    return None if which is None else getattr(delta, which)


def response_id(prepared: PreparedRequest) -> str:
    prefix = "chatcmpl-" if prepared.kind == "chat" else "cmpl-"
    return prefix + prepared.request_id


def completion_logprobs(
    tokenizer: RouterTokenizer, lps: Sequence[pb.TokenLogprob], top_k: int, offset: int
) -> tuple[dict[str, Any], int]:
    """The completions logprobs object for `lps`, and the text offset after them."""
    out: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for lp in lps:
        text = tokenizer.token_str(lp.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(_logprob(lp.logprob))
        top = {tokenizer.token_str(t.token_id): _logprob(t.logprob) for t in lp.top[:top_k]}
        top.setdefault(text, _logprob(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def _chat_token(tokenizer: RouterTokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.token_str(token_id)
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    tokenizer: RouterTokenizer, lps: Sequence[pb.TokenLogprob], top_k: int
) -> list[dict[str, Any]]:
    return [
        {
            **_chat_token(tokenizer, lp.token_id, lp.logprob),
            "top_logprobs": [_chat_token(tokenizer, t.token_id, t.logprob) for t in lp.top[:top_k]],
        }
        for lp in lps
    ]


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_offset: int = 0  # completions logprobs: characters of token strings so far
    tools: ToolCallStream | None = None  # chat with tools: the output read as calls

    def output_finish_reason(self) -> str | None:
        """What the client sees: "tool_calls" for a choice that stopped with calls."""
        is_call = self.tools is not None and self.tools.num_final_calls > 0
        return "tool_calls" if is_call and self.finish_reason == "stop" else self.finish_reason


class UsageTally:
    """Per-prompt usage: the node's numbers when it sent them, counted tokens otherwise."""

    def __init__(self, prompts: Sequence[Sequence[int]]) -> None:
        self.prompt_tokens = [len(p) for p in prompts]
        self.cached_tokens = [0] * len(prompts)
        self.completion_tokens = [0] * len(prompts)

    def add(self, prompt_index: int, msg: pb.GenerateResponse) -> None:
        count = 0
        for delta in msg.deltas:
            count += len(delta.token_ids)
        self.completion_tokens[prompt_index] += count
        if msg.HasField("usage"):
            usage = msg.usage
            if usage.prompt_tokens:
                self.prompt_tokens[prompt_index] = usage.prompt_tokens
            self.cached_tokens[prompt_index] = usage.cached_tokens
            self.completion_tokens[prompt_index] = max(
                usage.completion_tokens, self.completion_tokens[prompt_index]
            )

    def json(self) -> dict[str, Any]:
        prompt, completion = sum(self.prompt_tokens), sum(self.completion_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens)},
        }


class ResponseBuilder:
    """Accumulates node messages for one request; renders whole responses or chunks."""

    def __init__(self, prepared: PreparedRequest, tokenizer: RouterTokenizer) -> None:
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.choices = [ChoiceState() for _ in range(prepared.num_choices)]
        plan = prepared.tool_plan
        if plan is not None:
            for state in self.choices:
                state.tools = ToolCallStream(make_output_parser(plan), None if plan.parallel else 1)
        self.usage = UsageTally(prepared.prompts)
        # echo: what each choice's text starts with, until its first chunk is sent.
        self.echo_pending = [self._echo_of(i) for i in range(prepared.num_choices)]
        self.id = response_id(prepared)
        self.top_k = prepared.params[0].logprobs or 0
        self.has_logprobs = prepared.params[0].logprobs is not None
        # A stream's chunks are rendered as they go: no text or logprobs kept for a whole
        # response.
        self._keeps_outputs = not prepared.stream
        kind = "chat.completion.chunk" if prepared.kind == "chat" else "text_completion"
        # Every chunk's JSON up to its choices, as json.dumps writes the whole chunk.
        self._frame_head = "data: " + json.dumps(self._header(kind), ensure_ascii=False)[:-1]

    def _echo_of(self, index: int) -> str:
        """echo=true: the prompt text choice `index` starts with; "" otherwise."""
        echo = self.prepared.echo
        return echo[index // self.prepared.n] if echo else ""

    def _header(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.prepared.created,
            "model": self.prepared.model,
        }

    def add(self, prompt_index: int, msg: pb.GenerateResponse) -> list[dict[str, Any]]:
        """Record `msg`; returns the chunk choices it makes (deltas with something to say)."""
        self.usage.add(prompt_index, msg)
        chunk_choices = []
        for delta in msg.deltas:
            index = prompt_index * self.prepared.n + delta.index
            state = self.choices[index]
            if self._keeps_outputs:
                state.text.append(delta.text)
                state.logprobs.extend(delta.logprobs)
            if delta.HasField("finish_reason"):
                state.finish_reason = delta.finish_reason
                state.stop_reason = stop_reason(delta)
            if delta.text or delta.token_ids or delta.HasField("finish_reason"):
                choice = self._chunk_choice(index, delta)
                if choice is not None:
                    chunk_choices.append(choice)
        return chunk_choices

    def _chunk_choice(self, index: int, delta: pb.CompletionDelta) -> dict[str, Any] | None:
        """The chunk choice of `delta`; None when a tool-call stream holds its text back."""
        state = self.choices[index]
        finish = delta.finish_reason if delta.HasField("finish_reason") else None
        stop = stop_reason(delta) if finish else None
        logprobs: Any = None
        if self.prepared.kind == "chat":
            body = self._chat_delta(state, delta.text, finish is not None)
            if body is None:
                return None
            if self.has_logprobs:
                logprobs = {"content": chat_logprobs(self.tokenizer, delta.logprobs, self.top_k)}
            return {
                "index": index,
                "delta": body,
                "logprobs": logprobs,
                "finish_reason": state.output_finish_reason() if finish else None,
                "stop_reason": stop,
            }
        if self.has_logprobs:
            logprobs, state.text_offset = completion_logprobs(
                self.tokenizer, delta.logprobs, self.top_k, state.text_offset
            )
        echo, self.echo_pending[index] = self.echo_pending[index], ""
        return {
            "index": index,
            "text": echo + delta.text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop,
        }

    def _chat_delta(self, state: ChoiceState, text: str, is_last: bool) -> dict[str, Any] | None:
        if state.tools is None or not self.prepared.stream:
            return {"content": text} if text else {}
        content, calls = state.tools.finish(text) if is_last else state.tools.feed(text)
        if not (content or calls or is_last or self.has_logprobs):
            return None
        body: dict[str, Any] = {"content": content} if content else {}
        if calls:
            body["tool_calls"] = calls
        return body

    def chunk_frame(self, choices: list[dict[str, Any]], with_usage: bool = False) -> str:
        """The SSE frame of one chunk: `sse({id, object, created, model, choices[, usage]})`,
        the same text, with the header rendered once per request instead of once per
        frame (the streaming path: a frame per token of every request)."""
        body = json.dumps(choices, ensure_ascii=False)
        usage = f', "usage": {json.dumps(self.usage.json())}' if with_usage else ""
        return f'{self._frame_head}, "choices": {body}{usage}}}\n\n'

    def role_frame(self) -> str:
        """A chat stream's first frame: each choice's assistant role."""
        choices = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.prepared.num_choices)
        ]
        return self.chunk_frame(choices)

    def usage_frame(self) -> str:
        """A stream's last frame before [DONE] when usage was asked for: no choices."""
        return self.chunk_frame([], with_usage=True)

    def failed_choice(self) -> ChoiceState | None:
        """A choice the node ended with finish_reason error/abort (non-streaming: an error)."""
        return next((c for c in self.choices if c.finish_reason in ("error", "abort")), None)

    def response(self) -> dict[str, Any]:
        choices = [self._final_choice(i, c) for i, c in enumerate(self.choices)]
        kind = "chat.completion" if self.prepared.kind == "chat" else "text_completion"
        return {**self._header(kind), "choices": choices, "usage": self.usage.json()}

    def _final_choice(self, index: int, state: ChoiceState) -> dict[str, Any]:
        text = "".join(state.text)
        out: dict[str, Any] = {"index": index}
        logprobs: Any = None
        if self.prepared.kind == "chat":
            if self.has_logprobs:
                logprobs = {"content": chat_logprobs(self.tokenizer, state.logprobs, self.top_k)}
            out["message"] = self._message(state, text)
        else:
            if self.has_logprobs:
                logprobs, _ = completion_logprobs(self.tokenizer, state.logprobs, self.top_k, 0)
            out["text"] = self._echo_of(index) + text
        out.update(
            logprobs=logprobs,
            finish_reason=state.output_finish_reason(),
            stop_reason=state.stop_reason,
        )
        return out

    def _message(self, state: ChoiceState, text: str) -> dict[str, Any]:
        if state.tools is None:
            return {"role": "assistant", "content": text}
        content, calls = state.tools.final(text)
        if not calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": content, "tool_calls": calls}
