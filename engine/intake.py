"""Request intake: validation, n > 1 fan-out, and the live sequences by id.

EngineCore calls `validate` (raises ValueError with how to fix the input; a request with a
grammar has it compiled here, engine/grammar.py), then `register` (one `Sequence` per
completion: `{id}` for n == 1, `{id}#{i}` otherwise, each with its own grammar matcher),
and `forget` as each sequence finishes; a request id stays taken until all its sequences end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.config import SchedulerConfig
from splitserve.engine.detokenizer import IncrementalDetokenizer, TokenTexts, make_decode_fn
from splitserve.engine.grammar import GrammarBackend, TokenBitmask
from splitserve.engine.random_draw import RowGenerator
from splitserve.engine.request import Request, RequestId
from splitserve.engine.sampler import Sampler, SamplingRow
from splitserve.engine.sampling_params import GrammarSpec, SamplingParams


@dataclass(eq=False)
class Sequence:
    """One completion of a request, with what generating it needs beyond the Request."""

    request: Request
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    generator: RowGenerator | None
    # Leading prompt blocks already reported to the KV connector as final.
    num_blocks_reported: int = 0
    is_prompt_reported: bool = False
    # xgrammar GrammarMatcher, advanced by every output token; None without a grammar.
    grammar: Any = None

    def sampling_row(self) -> SamplingRow:
        req = self.request
        return SamplingRow(
            params=req.sampling_params,
            generator=self.generator,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            eos_token_ids=req.eos_token_ids,
        )


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]


class RequestIntake:
    def __init__(
        self,
        limits: ModelLimits,
        tokenizer: Any,
        blocks: BlockManager,
        scheduler_config: SchedulerConfig,
        device: torch.device,
    ) -> None:
        self.limits = limits
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.scheduler_config = scheduler_config
        self.device = device
        self.sequences: dict[RequestId, Sequence] = {}
        self.children: dict[str, list[RequestId]] = {}
        # One TokenTexts per skip_special_tokens setting, shared by every detokenizer.
        self._texts: dict[bool, TokenTexts] = {}
        self._grammar: GrammarBackend | None = None
        # The backend is also reached from AsyncEngine.compile_grammar's worker threads.
        self._grammar_lock = threading.Lock()

    def _token_texts(self, params: SamplingParams) -> TokenTexts:
        skip = params.skip_special_tokens
        if skip not in self._texts:
            self._texts[skip] = TokenTexts(make_decode_fn(self.tokenizer, skip))
        return self._texts[skip]

    @property
    def grammar(self) -> GrammarBackend:
        """The grammar backend, built on first use (importing xgrammar takes seconds)."""
        with self._grammar_lock:
            if self._grammar is None:
                limits = self.limits
                self._grammar = GrammarBackend.create(
                    self.tokenizer, limits.vocab_size, limits.eos_token_ids, self.device
                )
            return self._grammar

    def validate(
        self, request_id: str, prompt: list[int], params: SamplingParams, max_new_cap: int | None
    ) -> int:
        """The most tokens the request may generate; ValueError on bad input."""
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already in use; pick a unique id")
        num_prompt, limits = len(prompt), self.limits
        if num_prompt == 0:
            raise ValueError("the prompt is empty; pass at least one token")
        vocab = limits.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        biased = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if biased is not None:
            raise ValueError(f"logit_bias token id {biased} is outside the vocabulary [0, {vocab})")
        if num_prompt >= limits.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens but the model's context is "
                f"{limits.max_model_len} (room for at least one new token is needed); "
                "shorten the prompt or raise max_model_len"
            )
        room = limits.max_model_len - num_prompt
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        if max_new_cap is not None:
            max_new = min(max_new, max_new_cap)
        self._check_fits(num_prompt, max_new)
        if params.grammar is not None:
            self.grammar.compile(params.grammar)
        return max_new

    def _check_fits(self, num_prompt: int, max_new: int) -> None:
        needed = self.blocks.blocks_needed(num_prompt + max_new)
        num_blocks = self.blocks.pool.num_blocks
        if needed > num_blocks:
            raise ValueError(
                f"the request needs {needed} KV blocks but the pool has {num_blocks}; "
                "raise the KV memory (kv_cache_memory_gib / num_blocks) or lower max_tokens"
            )
        sched = self.scheduler_config
        if not sched.enable_chunked_prefill and num_prompt > sched.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {num_prompt} tokens, more than max_num_batched_tokens="
                f"{sched.max_num_batched_tokens} with chunked prefill off; enable it or raise "
                "the budget"
            )

    def register(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        reserves_prompt: bool = False,
    ) -> list[Sequence]:
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        seqs = []
        for index, rid in enumerate(ids):
            request = Request(
                request_id=RequestId(rid),
                prompt_token_ids=list(prompt),
                sampling_params=params,
                max_new_tokens=max_new_tokens,
                eos_token_ids=self.limits.eos_token_ids,
                reserves_prompt=reserves_prompt,
            )
            generator = None
            if params.seed is not None:
                generator = Sampler.make_generator(params.seed + index, self.device)
            detok = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params, self._token_texts(params)
            )
            seq = Sequence(request, request_id, index, detok, generator)
            seq.grammar = self._matcher(params.grammar)
            seqs.append(seq)
        self.children[request_id] = [s.request.request_id for s in seqs]
        for seq in seqs:
            self.sequences[seq.request.request_id] = seq
        return seqs

    def bitmask(self, seqs: list[Sequence]) -> TokenBitmask | None:
        """Next-token bitmask of the sequences (one step's sampling rows, in order) that
        have a grammar, filled on the host; None when none has."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        with record_function("step.grammar_bitmask"):
            return self.grammar.fill(rows, [seqs[i].grammar for i in rows])

    def _matcher(self, spec: GrammarSpec | None) -> Any:
        return None if spec is None else self.grammar.matcher(spec)

    def forget(self, seq: Sequence) -> None:
        """The sequence finished; the request id is free once all its sequences are."""
        del self.sequences[seq.request.request_id]
        siblings = self.children.get(seq.parent_id, [])
        if all(rid not in self.sequences for rid in siblings):
            self.children.pop(seq.parent_id, None)
