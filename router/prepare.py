"""Validated OpenAI requests -> what the router sends to decode nodes (`PreparedRequest`).

Tokenizes prompts (chat: the model's template, then the text without extra special tokens),
checks the context budget against the nodes' `max_model_len`, and builds one validated
`SamplingParams` (with the request's grammar, router/grammar_spec.py). A chat request with
tools gets its `ToolPlan` (router/tool_request.py): the tools go to the chat template, a
forced call's grammar to the SamplingParams, and a parser that reads special tokens keeps
them in the output text. Every problem is an `APIError` 400 naming the field.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, fields
from typing import Literal

from splitserve.engine.sampling_params import GrammarSpec, SamplingParams
from splitserve.router.errors import bad_request, param_of_value_error
from splitserve.router.grammar_spec import grammar_spec
from splitserve.router.openai_schema import (
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _SamplingFields,
)
from splitserve.router.tokenizer import ChatTemplateError, RouterTokenizer
from splitserve.router.tool_parsers import make_output_parser
from splitserve.router.tool_request import ToolPlan, chat_history, tool_plan

DEFAULT_COMPLETION_MAX_TOKENS = 16
_PARAM_FIELDS = frozenset(f.name for f in fields(SamplingParams))


@dataclass(frozen=True)
class PreparedRequest:
    kind: Literal["completion", "chat"]
    request_id: str
    model: str
    prompts: tuple[tuple[int, ...], ...]
    # One per prompt: they differ only in max_tokens (the room each prompt leaves).
    params: tuple[SamplingParams, ...]
    stream: bool
    include_usage: bool
    continuous_usage: bool
    arrival_s: float  # time.perf_counter() when the request arrived
    created: int  # unix seconds, the response's `created`
    # Chat with tools: how the output is read as calls (router/tool_stream.py).
    tool_plan: ToolPlan | None = None
    # Completions with echo=true: per prompt, the text each of its choices starts with.
    echo: tuple[str, ...] = ()

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def n(self) -> int:
        return self.params[0].n


def _check_neutral_fields(req: _SamplingFields) -> None:
    if req.prompt_logprobs is not None:
        message = "prompt_logprobs is not supported: omit it (or send null)"
        raise bad_request(message, "prompt_logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")


def _max_tokens(
    requested: int | None, default: int | None, prompt_len: int, max_model_len: int, field: str
) -> int | None:
    """The max_tokens to send; 400 when it is out of range or does not fit the context."""
    if requested is not None and requested < 1:
        raise bad_request(f"{field} must be at least 1, got {requested}", field)
    room = max_model_len - prompt_len if max_model_len > 0 else None
    if room is not None and room <= 0:
        raise bad_request(
            f"the prompt has {prompt_len} tokens but the model's context is {max_model_len} "
            "tokens: shorten the prompt",
            "messages" if field == "max_completion_tokens" else "prompt",
        )
    if requested is None:
        return room if default is None or room is None else min(default, room)
    if room is not None and requested > room:
        raise bad_request(
            f"{field} ({requested}) plus the prompt's {prompt_len} tokens exceeds the model's "
            f"context of {max_model_len} tokens: ask for at most {room}",
            field,
        )
    if requested > MAX_TOKENS_LIMIT:
        raise bad_request(f"{field} must be at most {MAX_TOKENS_LIMIT}, got {requested}", field)
    return requested


def _logit_bias(req: _SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; 400 on a key that is not an id of
    this model's vocabulary (the range of the values is SamplingParams')."""
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            message = f"logit_bias keys are token ids written as integers, got {key!r}"
            raise bad_request(message, "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            message = f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})"
            raise bad_request(message, "logit_bias")
        pairs.append((token_id, bias))
    return tuple(pairs)


def _sampling_params(
    req: _SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    grammar: GrammarSpec | None,
    skip_special_tokens: bool,
    vocab_size: int,
) -> SamplingParams:
    stop = req.stop if req.stop is not None else ()
    logit_bias = _logit_bias(req, vocab_size)
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            include_stop_str_in_output=req.include_stop_str_in_output,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
            grammar=grammar,
            logit_bias=logit_bias,
        )
    except ValueError as exc:
        raise bad_request(str(exc), param_of_value_error(str(exc), _PARAM_FIELDS)) from exc


def _check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab_size})", field)


def _prompt_batch(req: CompletionRequest) -> list[str] | list[list[int]]:
    """The prompts as given: texts or token-id lists (one prompt is a batch of one)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]  # type: ignore[list-item,return-value]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    return prompt  # type: ignore[return-value]


def completion_prompts(req: CompletionRequest, tokenizer: RouterTokenizer) -> list[list[int]]:
    """Token ids of every prompt (a text, texts, token ids, or lists of token ids)."""
    out = []
    for item in _prompt_batch(req):
        ids = tokenizer.encode(item, req.add_special_tokens) if isinstance(item, str) else item
        if not ids:
            raise bad_request("prompt must not be empty (it tokenizes to no tokens)", "prompt")
        _check_token_ids(ids, tokenizer.vocab_size, "prompt")
        out.append(list(ids))
    return out


def render_chat_prompt(
    tokenizer: RouterTokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool,
    template_kwargs: dict[str, object] | None,
    tools: tuple[dict[str, object], ...] = (),
) -> list[int]:
    if not messages:
        raise bad_request("messages must hold at least one message", "messages")
    try:
        text = tokenizer.render_chat(
            chat_history(messages),
            add_generation_prompt,
            continue_final_message,
            template_kwargs,  # type: ignore[arg-type]
            list(tools) or None,
        )
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from exc
    ids = tokenizer.encode(text, add_special_tokens)
    if not ids:
        raise bad_request("the chat template made an empty prompt of these messages", "messages")
    return ids


def prepare_completion(
    req: CompletionRequest, tokenizer: RouterTokenizer, request_id: str, max_model_len: int
) -> PreparedRequest:
    _check_neutral_fields(req)
    if req.suffix is not None:
        raise bad_request("suffix is not supported: omit it", "suffix")
    if req.best_of not in (None, 1):
        raise bad_request("best_of is not supported: use n for several completions", "best_of")
    prompts = completion_prompts(req, tokenizer)
    echo = _echo_texts(req, tokenizer)
    grammar = grammar_spec(req)
    params = [
        _sampling_params(
            req,
            _max_tokens(
                req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, len(p), max_model_len, "max_tokens"
            ),
            req.logprobs,
            grammar,
            req.skip_special_tokens,
            tokenizer.vocab_size,
        )
        for p in prompts
    ]
    prepared = _prepared("completion", req, request_id, prompts, params)
    return dataclasses.replace(prepared, echo=echo)


def _echo_texts(req: CompletionRequest, tokenizer: RouterTokenizer) -> tuple[str, ...]:
    """echo=true: each prompt as the output starts with it (a text as sent, token ids
    decoded); () without echo. Prompt log-probabilities are not computed, so echo with
    logprobs is a 400."""
    if not req.echo:
        return ()
    if req.logprobs is not None:
        message = (
            "echo with logprobs needs the prompt's log-probabilities, which are not computed: "
            "drop logprobs or echo"
        )
        raise bad_request(message, "echo")
    return tuple(
        item if isinstance(item, str) else tokenizer.decode(item, skip_special_tokens=False)
        for item in _prompt_batch(req)
    )


def prepare_chat(
    req: ChatCompletionRequest,
    tokenizer: RouterTokenizer,
    request_id: str,
    max_model_len: int,
    tool_call_parser: str = "",
) -> PreparedRequest:
    """`tool_call_parser`: the router's --tool-call-parser ("" when unset)."""
    _check_neutral_fields(req)
    if req.echo:
        raise bad_request("echo is served on /v1/completions only: omit it on chat", "echo")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    grammar = grammar_spec(req)
    plan = tool_plan(req, tool_call_parser, grammar is not None)
    prompt = render_chat_prompt(
        tokenizer,
        req.messages,
        req.add_generation_prompt,
        req.continue_final_message,
        req.add_special_tokens,
        req.chat_template_kwargs,
        () if plan is None else plan.template_tools,
    )
    field, requested = "max_tokens", req.max_tokens
    if req.max_completion_tokens is not None:
        field, requested = "max_completion_tokens", req.max_completion_tokens
    max_tokens = _max_tokens(requested, None, len(prompt), max_model_len, field)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    skip_special_tokens = req.skip_special_tokens
    if plan is not None:
        grammar = plan.grammar or grammar
        skip_special_tokens &= not make_output_parser(plan).keeps_special_tokens
    params = _sampling_params(
        req, max_tokens, logprobs, grammar, skip_special_tokens, tokenizer.vocab_size
    )
    prepared = _prepared("chat", req, request_id, [prompt], [params])
    return dataclasses.replace(prepared, tool_plan=plan)


def _prepared(
    kind: Literal["completion", "chat"],
    req: _SamplingFields,
    request_id: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
) -> PreparedRequest:
    options = req.stream_options
    return PreparedRequest(
        kind=kind,
        request_id=request_id,
        model=req.model,
        prompts=tuple(tuple(p) for p in prompts),
        params=tuple(params),
        stream=req.stream,
        include_usage=options is not None and options.include_usage,
        continuous_usage=options is not None and options.continuous_usage_stats,
        arrival_s=time.perf_counter(),
        created=int(time.time()),
    )
