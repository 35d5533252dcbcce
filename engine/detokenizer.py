"""Incremental detokenizer: turns one output sequence's token ids into streamed text.

Who calls what, in order: whoever streams a sequence's text creates one
`IncrementalDetokenizer` when the sequence starts generating, then after every engine
step calls `step(new_token_ids)` with the tokens the sequence gained and sends
`text_delta` on. When a step reports `stop_str`, the sequence is finished (finish_reason
"stop", stop_reason = that string): stop generating and do not call `step` again. When the
sequence finishes for any other reason (eos, a stop token id, length, abort), call
`flush()` once and send what it returns: the text held back so far.

Stop token ids and eos are the engine's job. Pass the terminating eos/stop-token id to
`step` only when its text belongs in the output (vLLM leaves it out unless
include_stop_str_in_output; special tokens vanish anyway under skip_special_tokens).

Decoding keeps two offsets into the ids (as vLLM does): text is emitted only when the
decoded tail does not end in U+FFFD, so a UTF-8 character split across byte-level tokens
is released whole. A few prompt tokens are decoded as left context, so the first output
token gets the spacing it has inside the full text.

Each new token costs two decodes: the window before it and the window with it. The window
before it is usually the one token read at the step before, so an engine shares a
`TokenTexts` per tokenizer and special-token setting among its detokenizers: it remembers
what one token decodes to (decode is a pure function of the ids), which takes about half
of the decode calls off the engine's output path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import tokenizers

from splitserve.engine.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context of the first output tokens.
_NUM_CONTEXT_TOKENS = 5


class DetokenizerStep(NamedTuple):
    # Text released by this step (may be empty while characters are held back).
    text_delta: str
    # The stop string that just matched, or None.
    stop_str: str | None


def make_decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text, the Rust tokenizer's decode when there is one (no clean-up of spaces)."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        backend: Any = tokenizer
    else:
        backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class TokenTexts:
    """`decode`, remembering the text of each single token it decoded (up to `limit` of
    them; longer windows are decoded each time)."""

    def __init__(self, decode: Callable[[list[int]], str], limit: int = 1 << 18) -> None:
        self._decode = decode
        self._limit = limit
        self._texts: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> str:
        if len(ids) != 1:
            return self._decode(ids)
        text = self._texts.get(ids[0])
        if text is None:
            text = self._decode(ids)
            if len(self._texts) < self._limit:
                self._texts[ids[0]] = text
        return text


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        params: SamplingParams,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        """`decode` (default: the tokenizer's, `make_decode_fn`) must decode as the tokenizer
        does under `params.skip_special_tokens`; an engine passes its shared `TokenTexts`."""
        self._decode = decode or make_decode_fn(tokenizer, params.skip_special_tokens)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: context would misalign the offsets.
            context = []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Everything decoded so far: released text plus what is held back for stop strings.
        self._decoded = ""
        self._num_released = 0
        self._stop_str: str | None = None
        self._is_finished = False

    @property
    def text(self) -> str:
        """Cumulative text released so far."""
        return self._decoded[: self._num_released]

    @property
    def stop_str(self) -> str | None:
        return self._stop_str

    def step(self, new_token_ids: list[int]) -> DetokenizerStep:
        if self._is_finished:
            raise RuntimeError(
                "step() on a finished detokenizer: a stop string matched or flush() was called"
            )
        for token_id in new_token_ids:
            # One token at a time, so text before an incomplete character is not held back.
            self._ids.append(token_id)
            self._decoded += self._decode_new(is_final=False)
        return self._release()

    def flush(self) -> str:
        """Release everything held back (incomplete characters, possible stop-string starts).

        Returns "" after a stop string matched. Stop strings are not checked here.
        """
        if self._is_finished:
            return ""
        self._is_finished = True
        self._decoded += self._decode_new(is_final=True)
        delta = self._decoded[self._num_released :]
        self._num_released = len(self._decoded)
        return delta

    def _decode_new(self, is_final: bool) -> str:
        """Text of the ids past the read offset, once it no longer ends mid-character."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not is_final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _release(self) -> DetokenizerStep:
        start = self._num_released
        match = self._find_stop(max(0, start - self._max_stop_len + 1))
        if match is not None:
            pos, stop = match
            end = pos + len(stop) if self._include_stop else pos
            self._stop_str = stop
            self._is_finished = True
            self._decoded = self._decoded[:end]
            self._num_released = end
            return DetokenizerStep(self._decoded[start:end], stop)
        end = len(self._decoded) - self._num_held_back(start)
        self._num_released = end
        return DetokenizerStep(self._decoded[start:end], None)

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        """Earliest stop string in the decoded text (ties: first in params.stop)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = self._decoded.find(stop, search_from)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _num_held_back(self, start: int) -> int:
        """Length of the longest unreleased suffix that could begin a stop string."""
        if not self._stops or self._include_stop:
            # With include_stop_str_in_output the text before a stop string is output anyway.
            return 0
        longest = min(self._max_stop_len - 1, len(self._decoded) - start)
        for k in range(longest, 0, -1):
            suffix = self._decoded[-k:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return k
        return 0
