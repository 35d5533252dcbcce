"""Sampler: turns one step's logits into one token per sequence.

Who calls what: EngineCore, once per step after the model runner's forward pass, calls
`Sampler(logits, rows)` with the float32 logits of every sequence that samples this step
(decode rows and the last chunk of each prefill), one `SamplingRow` per logits row in the
same order. A request with a seed gets its generator once, from `Sampler.make_generator`,
and passes the same generator object at every step; the sampler advances it by one draw
per step in which that row samples at random (greedy rows never touch a generator).

Rows with a grammar come with a `TokenBitmask` (engine/grammar.py), applied first, to the
constrained rows only, in one masked fill on the device: disallowed tokens get -inf before
anything else sees the logits (so log-probabilities are those of the constrained
distribution, as in vLLM); where the grammar allows nothing but what min_tokens holds back
(it can only end), the grammar wins. Then per row, as vLLM does:

    logits -> log-probabilities (log_softmax of the raw logits, for `params.logprobs`)
    raw logits -> logit_bias -> min_tokens mask -> repetition penalty
               -> frequency/presence penalties
               -> greedy: argmax
               -> random: temperature -> top-k -> top-p -> min-p -> draw

The sampler never decides that a sequence stops: eos, stop_token_ids, stop strings and
max_tokens are checked by the engine (and the detokenizer). It only masks eos and stop ids
while fewer than `min_tokens` tokens have been generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from splitserve.engine.grammar import TokenBitmask, apply_token_bitmask, grammar_must_end
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One row of the logits: one sequence that samples this step."""

    params: SamplingParams
    # The request's own generator when it has a seed; None uses the sampler's default one.
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    # Tokens generated so far, before this step.
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset()


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    # None for rows whose params.logprobs is None.
    logprobs: list[TokenLogprob | None]


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), max_len] int64 tensor of `seqs`, padded with `pad`; ids >= pad become pad."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        if seq:
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
    return out.clamp_(0, pad).to(device)


def _min_tokens_banned(row: SamplingRow) -> set[int]:
    """The ids min_tokens holds back from `row` now (empty once it has enough outputs)."""
    params = row.params
    if len(row.output_token_ids) >= params.min_tokens:
        return set()
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned |= row.eos_token_ids
    return banned


def _mask_min_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], exempt: frozenset[int] = frozenset()
) -> None:
    """While a row has fewer than min_tokens outputs, its stop ids (and eos unless ignore_eos)
    get -inf, but for the `exempt` rows (a grammar that can only end). Ids outside the
    vocabulary can never be sampled and are left alone."""
    vocab_size = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        banned = set() if i in exempt else _min_tokens_banned(row)
        for token in banned:
            if 0 <= token < vocab_size:
                row_idx.append(i)
                tok_idx.append(token)
    if row_idx:
        index = torch.tensor([row_idx, tok_idx], dtype=torch.int64, device=logits.device)
        logits[index[0], index[1]] = _NEG_INF


def _apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """HF/vLLM semantics over prompt + output tokens: positive logits / p, negative * p."""
    selected = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if not selected:
        return
    vocab_size, device = logits.shape[1], logits.device
    tokens = _padded(
        [rows[i].prompt_token_ids + rows[i].output_token_ids for i in selected], vocab_size, device
    )
    seen = torch.zeros(len(selected), vocab_size + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, tokens, torch.ones_like(tokens, dtype=torch.bool))
    penalty = torch.tensor(
        [rows[i].params.repetition_penalty for i in selected], dtype=logits.dtype, device=device
    ).unsqueeze(1)
    index = torch.tensor(selected, dtype=torch.int64, device=device)
    sub = logits[index]
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[index] = torch.where(seen[:, :vocab_size], penalized, sub)


def _apply_frequency_presence(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """OpenAI semantics over output tokens: logit -= freq * count + presence * (count > 0)."""
    selected = [
        i
        for i, r in enumerate(rows)
        if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
    ]
    if not selected:
        return
    vocab_size, device, dtype = logits.shape[1], logits.device, logits.dtype
    tokens = _padded([rows[i].output_token_ids for i in selected], vocab_size, device)
    counts = torch.zeros(len(selected), vocab_size + 1, dtype=dtype, device=device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=dtype))
    counts = counts[:, :vocab_size]
    freq = [rows[i].params.frequency_penalty for i in selected]
    presence = [rows[i].params.presence_penalty for i in selected]
    freq_t = torch.tensor(freq, dtype=dtype, device=device).unsqueeze(1)
    presence_t = torch.tensor(presence, dtype=dtype, device=device).unsqueeze(1)
    index = torch.tensor(selected, dtype=torch.int64, device=device)
    logits[index] -= freq_t * counts + presence_t * (counts > 0).to(dtype)


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add each row's logit_bias to its logits (ids past the vocabulary are refused at
    admission)."""
    pairs = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if not pairs:
        return
    device = logits.device
    index = (
        torch.tensor([i for i, _, _ in pairs], device=device),
        torch.tensor([t for _, t, _ in pairs], device=device),
    )
    bias = torch.tensor([b for _, _, b in pairs], dtype=logits.dtype, device=device)
    logits.index_put_(index, bias, accumulate=True)


def _needs_penalties(row: SamplingRow) -> bool:
    params = row.params
    return (
        bool(params.logit_bias)
        or len(row.output_token_ids) < params.min_tokens
        or params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def apply_penalties(
    logits: torch.Tensor, rows: Sequence[SamplingRow], exempt: frozenset[int] = frozenset()
) -> torch.Tensor:
    """logit_bias, the min_tokens mask (not on the `exempt` rows), then repetition,
    frequency and presence penalties.

    Never modifies `logits`; returns it unchanged (the same object) when no row needs any.
    """
    if not any(_needs_penalties(r) for r in rows):
        return logits
    out = logits.clone()
    _apply_logit_bias(out, rows)
    _mask_min_tokens(out, rows, exempt)
    _apply_repetition_penalty(out, rows)
    _apply_frequency_presence(out, rows)
    return out


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Keep the k best tokens, then the smallest best-first set whose mass reaches p."""
    vocab_size, device = logits.shape[1], logits.device
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    if any(k < vocab_size for k in top_ks):
        positions = torch.arange(vocab_size, device=device).unsqueeze(0)
        k = torch.tensor(top_ks, device=device).unsqueeze(1)
        sorted_logits.masked_fill_(positions >= k, _NEG_INF)
    if any(p < 1.0 for p in top_ps):
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # p = 1 keeps everything, whatever the rounding of the cumulative sum.
        p = torch.tensor([q if q < 1.0 else 2.0 for q in top_ps], device=device).unsqueeze(1)
        sorted_logits.masked_fill_(mass_before >= p, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def scale_and_truncate(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, then min-p, for rows that sample at random (temperature > 0).

    Returns new logits with -inf outside each row's support; `logits` is not modified.
    """
    device, dtype, vocab_size = logits.device, logits.dtype, logits.shape[1]
    temps = torch.tensor([p.temperature for p in params], dtype=dtype, device=device)
    out = logits / temps.unsqueeze(1)
    top_ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps):
        out = _top_k_top_p(out, top_ks, top_ps)
    if any(p.min_p > 0.0 for p in params):
        probs = out.softmax(dim=-1)
        min_p = torch.tensor([p.min_p for p in params], dtype=dtype, device=device)
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        out.masked_fill_(probs < floor, _NEG_INF)
    return out


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Shared by every row without a generator of its own.
        self._generator = self.make_generator(seed, self.device)

    @staticmethod
    def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
        generator = torch.Generator(device=torch.device(device))
        generator.manual_seed(seed)
        return generator

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: TokenBitmask | None = None
    ) -> SamplerOutput:
        """One token per row; `bitmask` (rows with a grammar) may modify `logits` in place."""
        if logits.dim() != 2 or logits.shape != (len(rows), self.vocab_size):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab_size={self.vocab_size}], got "
                f"{tuple(logits.shape)}; pass one SamplingRow per logits row and slice padded "
                "vocabulary columns off"
            )
        if not rows:
            return SamplerOutput([], [])
        logits = logits.float()
        exempt: frozenset[int] = frozenset()
        if bitmask is not None and bitmask.rows:
            apply_token_bitmask(logits, bitmask)
            banned = [_min_tokens_banned(rows[i]) for i in bitmask.rows]
            exempt = grammar_must_end(bitmask, banned, self.vocab_size)
        processed = apply_penalties(logits, rows, exempt)
        token_ids = processed.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if random_rows:
            index = torch.tensor(random_rows, dtype=torch.int64, device=logits.device)
            sub = processed if len(random_rows) == len(rows) else processed[index]
            filtered = scale_and_truncate(sub, [rows[i].params for i in random_rows])
            sampled = self._draw(filtered.softmax(dim=-1), [rows[i].generator for i in random_rows])
            token_ids[index] = sampled
        return SamplerOutput(token_ids.tolist(), self._logprobs(logits, token_ids, rows))

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.

        Each seeded row draws its noise from its own generator alone, so its tokens do not
        depend on what else is in the batch or where it sits.
        """
        noise = torch.empty_like(probs)
        if all(g is None for g in generators):
            noise.exponential_(generator=self._generator)
        else:
            for i, generator in enumerate(generators):
                noise[i].exponential_(generator=generator or self._generator)
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    def _logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]
    ) -> list[TokenLogprob | None]:
        """Log-probabilities of the raw distribution: chosen token, its rank, the top ones."""
        selected = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(rows)
        if not selected:
            return result
        index = torch.tensor(selected, dtype=torch.int64, device=logits.device)
        logprobs = torch.log_softmax(logits[index], dim=-1)
        chosen = token_ids[index]
        chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))
        ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
        num_top = min(max(rows[i].params.logprobs or 0 for i in selected), self.vocab_size)
        top_lp, top_ids = logprobs.topk(num_top, dim=-1)
        chosen_l, lp_l, rank_l = chosen.tolist(), chosen_lp.squeeze(1).tolist(), ranks.tolist()
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(selected):
            k = rows[i].params.logprobs or 0
            top = tuple(zip(top_ids_l[j][:k], top_lp_l[j][:k], strict=True))
            result[i] = TokenLogprob(chosen_l[j], lp_l[j], rank_l[j], top)
        return result
