"""HTTP client for any OpenAI-compatible server: /v1/completions and /v1/chat/completions.

The runner calls `build_body` for each turn (with the session's history so far), then
`send_request`, which fills a `RequestRecord` with the send time and the arrival time of
every chunk. Times come from one monotonic clock (seconds after the benchmark start).

Streaming requests ask for ``stream_options.include_usage`` so the server's own token
counts arrive in a final chunk with ``"choices": []``. A chunk is a *content chunk* when a
choice carries non-empty ``delta.content`` (or ``reasoning_content``/``reasoning``) for
chat, or non-empty ``text`` for completions; a chat chunk that only sets the role, empty
chunks, the usage chunk and ``data: [DONE]`` are not content chunks. The request id goes
out in the ``X-Request-Id`` header. Errors (HTTP status, timeout, connection, an
``{"error": ...}`` event, a response with neither text nor output tokens) are recorded,
never dropped; an HTTP error keeps the server's own message (an OpenAI error object's
``message``). A response whose text is empty but whose usage counts output tokens (a model
whose tokens decode to nothing) is a success, marked `is_textless`; its times come from the
chunks that carry choices.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp

from splitserve.benchmarks.workloads import Session

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class TargetConfig:
    base_url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is removed)
    endpoint: Endpoint = "completions"
    model: str = ""
    stream: bool = True
    api_key: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    extra_body: tuple[tuple[str, Any], ...] = ()  # merged into every request body last
    ignore_eos: bool = True  # benchmarks want the asked-for output length
    temperature: float | None = None  # None: the server's default
    max_tokens_field: str = "max_tokens"  # or max_completion_tokens (newer OpenAI chat)
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"--endpoint {self.endpoint!r}: choose completions or chat")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--url {self.base_url!r} must start with http:// or https://")
        root = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", root[:-3] if root.endswith("/v1") else root)

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.base_url}/v1/{path}"


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds after the benchmark start."""

    request_id: str
    session_id: str
    turn_index: int
    max_tokens: int
    num_expected_prompt_tokens: int  # client-side count when the prompt was built
    intended_send_s: float = 0.0  # when the arrival process wanted it sent
    send_s: float = 0.0  # just before the HTTP request was written
    queue_wait_s: float = 0.0  # of send - intended: time spent waiting for a concurrency slot
    first_event_s: float | None = None  # first chunk with choices (a role-only chunk counts)
    last_event_s: float | None = None  # last chunk with choices
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each content chunk
    response_end_s: float | None = None  # stream closed / body read
    is_streamed: bool = True
    status: int | None = None
    error: str | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None  # server usage.prompt_tokens
    num_cached_tokens: int | None = None  # server usage.prompt_tokens_details.cached_tokens
    num_output_tokens: int | None = None  # usage.completion_tokens, else counted by tokenizer
    output_tokens_source: str | None = None  # usage | tokenizer | approx
    generated_text: str = ""
    is_textless: bool = False  # no text, but usage counted output tokens (a success)
    num_shared_prefix_tokens: int = 0  # prompt tokens the workload shares with earlier ones

    @property
    def is_success(self) -> bool:
        return self.error is None and (bool(self.chunk_times_s) or self.is_textless)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_body(
    target: TargetConfig, session: Session, turn_index: int, history: list[tuple[str, str]]
) -> dict[str, Any]:
    """Request body for a session's turn; `history` holds earlier (prompt, answer) pairs."""
    turn = session.turns[turn_index]
    body: dict[str, Any] = {"model": target.model, target.max_tokens_field: turn.max_tokens}
    if target.endpoint == "chat":
        messages = [{"role": "system", "content": session.system}] if session.system else []
        for user, answer in history:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]
        messages.append({"role": "user", "content": turn.text or ""})
        body["messages"] = messages
    elif turn.prompt_ids is not None:
        body["prompt"] = list(session.system_ids or ()) + list(turn.prompt_ids)
    else:
        prompt = f"{session.system}\n\n" if session.system else ""
        for user, answer in history:
            prompt += f"{user}{answer}\n\n"
        body["prompt"] = prompt + (turn.text or "")
    if target.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.temperature is not None:
        body["temperature"] = target.temperature
    body.update(dict(target.extra_body))
    return body


def choice_text(choice: dict[str, Any], is_chat: bool) -> str:
    """Generated text a choice carries ('' for role-only or empty chunks)."""
    if not is_chat:
        text = choice.get("text")
        return text if isinstance(text, str) else ""
    part = choice.get("delta") or choice.get("message") or {}
    pieces = (part.get("reasoning_content"), part.get("reasoning"), part.get("content"))
    return "".join(p for p in pieces if isinstance(p, str))


def apply_event(record: RequestRecord, payload: dict[str, Any], t: float, is_chat: bool) -> None:
    """Fold one parsed SSE `data:` object (or a whole non-streamed body) into the record."""
    if "error" in payload:
        err = payload["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        record.error = f"stream error: {message}"
        return
    usage = payload.get("usage")
    if isinstance(usage, dict):
        record.num_prompt_tokens = usage.get("prompt_tokens", record.num_prompt_tokens)
        if usage.get("completion_tokens") is not None:
            record.num_output_tokens = int(usage["completion_tokens"])
            record.output_tokens_source = "usage"
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            record.num_cached_tokens = int(details["cached_tokens"])
    for choice in payload.get("choices") or []:
        if record.first_event_s is None:
            record.first_event_s = t
        record.last_event_s = t
        text = choice_text(choice, is_chat)
        if text:
            record.chunk_times_s.append(t)
            record.generated_text += text
        if choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])


class StreamParser:
    """Folds an SSE byte stream into a record: `feed` each network read with its arrival time.

    Only `data:` lines matter (comments and other SSE fields are skipped); events that arrive
    in one read share its time. `feed` returns True once the stream is over (``[DONE]`` or
    an error).
    """

    def __init__(self, record: RequestRecord, is_chat: bool) -> None:
        self._record = record
        self._is_chat = is_chat
        self._buf = b""

    def feed(self, data: bytes, t: float) -> bool:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip().decode()
            if payload == "[DONE]":
                return True
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                self._record.error = f"stream error: data is not JSON: {payload[:80]!r}"
                return True
            apply_event(self._record, event, t, self._is_chat)
            if self._record.error:
                return True
        return False


async def _read_stream(
    resp: aiohttp.ClientResponse, record: RequestRecord, clock: Callable[[], float], is_chat: bool
) -> None:
    parser = StreamParser(record, is_chat)
    async for data in resp.content.iter_any():
        if parser.feed(data, clock()):
            return


async def send_request(
    http: aiohttp.ClientSession,
    target: TargetConfig,
    body: dict[str, Any],
    record: RequestRecord,
    clock: Callable[[], float],
) -> None:
    """Send one request and fill `record` in place; never raises for request failures."""
    headers = {"X-Request-Id": record.request_id, **dict(target.headers)}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    record.is_streamed = target.stream
    timeout = aiohttp.ClientTimeout(total=target.request_timeout_s)
    is_chat = target.endpoint == "chat"
    record.send_s = clock()
    try:
        async with http.post(target.url, json=body, headers=headers, timeout=timeout) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {error_message(await resp.text())}"
            elif target.stream:
                await _read_stream(resp, record, clock, is_chat)
            else:
                payload = await resp.json(content_type=None)
                apply_event(record, payload, clock(), is_chat)
    except TimeoutError:
        record.error = f"timeout after {target.request_timeout_s:g} s"
    except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
        record.error = f"connection: {type(exc).__name__}: {exc}"
    record.response_end_s = clock()
    if record.error is None and not record.chunk_times_s:
        if record.num_output_tokens and record.first_event_s is not None:
            record.is_textless = True
        else:
            record.error = "no content: the response carried no generated text"


def error_message(body: str) -> str:
    """The message of an OpenAI error object (`{"error": {"message": ...}}`), else the body."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return body[:300]
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])[:300]
    if isinstance(err, str):
        return err[:300]
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
        return str(payload["detail"])[:300]
    return body[:300]
