"""Constrained decoding with xgrammar: compiled grammars, per-sequence matchers, token bitmasks.

Who calls what (on the engine thread, but for the first line):

    AsyncEngine.compile_grammar -> GrammarBackend.compile(spec) on a worker thread, before
                                   the request is added (xgrammar's compiler is thread-safe)
    RequestIntake.validate -> GrammarBackend.compile(spec)      ValueError naming the problem
    RequestIntake.register -> GrammarBackend.matcher(spec)      one matcher per sequence
    RequestIntake.bitmask  -> GrammarBackend.fill(matchers)     host bitmask of the constrained
                                                                rows only, filled while the
                                                                device runs the forward pass
    Sampler                -> apply_token_bitmask(logits, mask) one masked fill on the device
    OutputProcessor.add_token -> advance(matcher, token)        every appended token, sampled
                                                                here or arrived from another node

The backend is built on the first request that carries a grammar (importing xgrammar costs
seconds), from the engine's tokenizer and the model's vocabulary size; the tokenizer's eos
ids are the grammar's stop tokens, so eos is allowed exactly when the grammar can end.
Compiled grammars are cached by xgrammar's `GrammarCompiler` (keyed by the spec; one
compiler per tokenizer). Rows without a grammar are never touched.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from splitserve.engine.sampling_params import GrammarSpec
from splitserve.kernels.device_copy import to_device

logger = logging.getLogger(__name__)

_BITS_PER_WORD = 32
# xgrammar prefixes its C++ errors with a timestamp and a source location.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")
# Longest string bound compiled as a pattern: measured on 2 cores, {0,256} compiles in
# 0.1 s, {0,1000} in 2.4 s, {0,5000} in 94 s.
_MAX_PATTERN_LENGTH = 256
# One character of a JSON string's content: any Unicode scalar value but '"', '\\' and the
# control characters U+0000-U+001F (no surrogates: they are not scalar values).
_JSON_STRING_CHAR = r"[\u0020\u0021\u0023-\u005b\u005d-\ud7ff\ue000-\U0010ffff]"
# Bytes of compiled grammars kept (xgrammar evicts least recently used ones beyond it).
_COMPILER_CACHE_BYTES = 256 << 20

_KIND_NAMES = {
    "json": "the JSON schema",
    "json_object": "the json_object grammar",
    "regex": "the regex",
    "choice": "the choice list",
    "grammar": "the EBNF grammar",
}


class TokenBitmask(NamedTuple):
    """Allowed tokens of the constrained rows of one step's logits."""

    # Rows of the logits (and of the SamplingRows) that carry a grammar, ascending.
    rows: list[int]
    # [len(rows), ceil(vocab_size / 32)] int32 on the host: bit t of a row allows token t.
    words: torch.Tensor


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (vLLM's guided_choice)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _CPP_PREFIX.sub("", lines[-1] if lines else type(exc).__name__)


@dataclass(eq=False)
class GrammarBackend:
    """xgrammar's tokenizer info and compiler for one engine, plus a reusable host buffer."""

    vocab_size: int
    compiler: Any
    is_pinned: bool
    _buffer: torch.Tensor | None = None

    @classmethod
    def create(
        cls, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int], device: torch.device
    ) -> GrammarBackend:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_token_ids) or None
        )
        compiler = xgr.GrammarCompiler(info, cache_limit_bytes=_COMPILER_CACHE_BYTES)
        return cls(vocab_size, compiler, is_pinned=device.type == "cuda")

    @property
    def num_words(self) -> int:
        return (self.vocab_size + _BITS_PER_WORD - 1) // _BITS_PER_WORD

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (cached); ValueError with the grammar library's reason."""
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(
                f"{_KIND_NAMES[spec.kind]} cannot be compiled for constrained decoding: "
                f"{_clean(exc)}; fix it (the supported subset is xgrammar's)"
            ) from exc

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self.compiler
        if spec.kind == "json":
            return compiler.compile_json_schema(
                bounded_strings_as_patterns(spec.source),
                any_whitespace=False,
                strict_mode=spec.strict,
            )
        if spec.kind == "json_object":
            return compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, strict_mode=False
            )
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_ebnf(parse_choices(spec.source)))
        return compiler.compile_grammar(spec.source)

    def matcher(self, spec: GrammarSpec) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))

    def fill(self, rows: list[int], matchers: list[Any]) -> TokenBitmask:
        """The bitmask of `matchers` (one per row in `rows`), on the host."""
        buffer = self._rows(len(rows))
        for j, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(buffer, j)
        return TokenBitmask(rows, buffer[: len(rows)])

    def _rows(self, num_rows: int) -> torch.Tensor:
        """The host buffer, grown to `num_rows` rows. Reused step after step: the engine
        waits for the previous step's sampled tokens (`SampledTokens.collect`, an event
        recorded after the sampler, so after this mask's copy to the device) before the
        next mask is filled."""
        if self._buffer is None or self._buffer.shape[0] < num_rows:
            size = max(num_rows, 2 * (0 if self._buffer is None else self._buffer.shape[0]))
            self._buffer = torch.empty(
                (size, self.num_words), dtype=torch.int32, pin_memory=self.is_pinned
            )
        return self._buffer


def bounded_strings_as_patterns(schema_text: str) -> str:
    """The schema, with every string bounded only by minLength/maxLength given the equivalent
    pattern: xgrammar 0.2.9 compiles such strings to a rule that admits raw control
    characters (invalid JSON) and UTF-8-encoded surrogates (which decode to three U+FFFD,
    breaking the length bound). The pattern lists the allowed code points rather than
    negating the forbidden ones: xgrammar's negated class also admits overlong encodings
    (E0 80 80, F0 80 80 80), one character to it and three or four U+FFFD once decoded.
    Bounds above _MAX_PATTERN_LENGTH keep xgrammar's rule (the pattern's compile time grows
    steeply with the bound). Unchanged text when nothing is rewritten."""
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JSON schema is not valid JSON: {exc}") from exc
    return json.dumps(schema) if _rewrite_lengths(schema) else schema_text


def _rewrite_lengths(node: Any) -> bool:
    changed = False
    if isinstance(node, list):
        for item in node:
            changed |= _rewrite_lengths(item)
        return changed
    if not isinstance(node, dict):
        return False
    for value in node.values():
        changed |= _rewrite_lengths(value)
    bounded = "minLength" in node or "maxLength" in node
    free = not any(key in node for key in ("pattern", "format", "enum", "const"))
    cheap = max(node.get("minLength", 0), node.get("maxLength", 0)) <= _MAX_PATTERN_LENGTH
    if node.get("type") == "string" and bounded and free and cheap:
        low, high = node.pop("minLength", 0), node.pop("maxLength", "")
        node["pattern"] = rf"^{_JSON_STRING_CHAR}{{{low},{high}}}$"
        return True
    return changed


def parse_choices(source: str) -> list[str]:
    """The strings of a "choice" spec (a JSON array of non-empty strings)."""
    try:
        choices = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(f"guided_choice must be a JSON array of strings: {exc}") from exc
    if not isinstance(choices, list) or not choices:
        raise ValueError("guided_choice must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("guided_choice must hold only non-empty strings")
    return choices


def advance(matcher: Any, token: int) -> bool | None:
    """Accept `token` into `matcher`: None while the grammar goes on, True when it has
    terminated (it accepted a stop token), False when the token breaks the grammar."""
    if not matcher.accept_token(token):
        return False
    return True if matcher.is_terminated() else None


@torch.inference_mode()
def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Disallowed tokens of the constrained rows get -inf, in place, in one masked fill.

    On the CPU xgrammar's own kernel; on a GPU the mask is copied without a host sync and
    unpacked by a torch op. Other rows are left alone. Under inference mode: the logits
    come from the model runner's, and are updated in place."""
    num_rows, vocab_size = logits.shape
    if logits.device.type == "cpu":
        _apply_cpu(logits, mask, vocab_size, num_rows)
        return
    device = logits.device
    words = mask.words.to(device, non_blocking=True)
    index = to_device(mask.rows, torch.int64, device)
    allowed = unpack_bitmask(words, vocab_size)
    logits[index] = logits[index].masked_fill_(~allowed, float("-inf"))


def _apply_cpu(logits: torch.Tensor, mask: TokenBitmask, vocab_size: int, num_rows: int) -> None:
    import xgrammar as xgr

    if len(mask.rows) == num_rows and logits.is_contiguous():
        xgr.apply_token_bitmask_inplace(logits, mask.words, vocab_size=vocab_size)
        return
    index = torch.tensor(mask.rows, dtype=torch.int64)
    sub = logits[index]
    xgr.apply_token_bitmask_inplace(sub, mask.words, vocab_size=vocab_size)
    logits[index] = sub


def grammar_must_end(mask: TokenBitmask, banned: list[set[int]], vocab_size: int) -> frozenset[int]:
    """The rows of `mask` whose grammar allows no token outside `banned` (one set per row:
    the ids min_tokens holds back), read from the host bitmask, with no device sync."""
    must_end = []
    for j, held in enumerate(banned):
        if not held:
            continue
        allowed = unpack_bitmask(mask.words[j : j + 1], vocab_size)[0]
        allowed[[t for t in held if 0 <= t < vocab_size]] = False
        if not bool(allowed.any()):
            must_end.append(mask.rows[j])
    return frozenset(must_end)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool, token t allowed when bit t is set."""
    shifts = torch.arange(_BITS_PER_WORD, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()
