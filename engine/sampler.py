"""Sampler: turns one step's logits into one token per sequence.

Who calls what: EngineCore, once per step after the model runner's forward pass, calls
`Sampler.sample(logits, rows)` with the float32 logits of every sequence that samples this
step (decode rows and the last chunk of each prefill), one `SamplingRow` per logits row in
the same order. It queues every kernel and the copy of the tokens to the host without
waiting for the device (small host lists go through pinned memory); the engine may launch
its next step, then `SampledTokens.collect()` waits for the copy and returns the tokens.
`Sampler(logits, rows)` does both.

A request with a seed gets its generator once, from `Sampler.make_generator` (a
`RowGenerator`, engine/random_draw.py), and passes the same object at every step; the
sampler advances it by one draw per step in which that row samples at random (greedy rows
never touch a generator). Given the registry's fused draw (the "triton" kernel backend),
rows that sample from their whole distribution (no top-k, top-p or min-p) draw in one
fused kernel (kernels/gumbel_sample.py); the others, and every row without it, take the
torch draw.

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
                  (plain random rows, with a fused draw: temperature and draw in one kernel)

The sampler never decides that a sequence stops: eos, stop_token_ids, stop strings and
max_tokens are checked by the engine (and the detokenizer). It only masks eos and stop ids
while fewer than `min_tokens` tokens have been generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from splitserve.engine.grammar import TokenBitmask, apply_token_bitmask, grammar_must_end
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.random_draw import FusedDraw, RowGenerator, is_plain
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels.device_copy import host_to_device, to_device
from splitserve.kernels.registry import DrawOp

# What a caller runs before the host waits for a step's tokens (engine/async_engine.py).
WhileWaiting = Callable[[], None]

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One row of the logits: one sequence that samples this step."""

    params: SamplingParams
    # The request's own generator when it has a seed; None uses the sampler's default one.
    generator: RowGenerator | None
    prompt_token_ids: list[int]
    # Tokens generated so far, before this step.
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset()


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    # None for rows whose params.logprobs is None.
    logprobs: list[TokenLogprob | None]


class _DeviceLogprobs(NamedTuple):
    """What `_logprobs` computed, for the rows that asked (`selected`)."""

    selected: list[int]
    counts: list[int]  # top logprobs each selected row asked for
    chosen_lp: torch.Tensor  # [S]
    ranks: torch.Tensor  # [S]
    top_lp: torch.Tensor  # [S, K]
    top_ids: torch.Tensor  # [S, K]


class SampledTokens:
    """One step's draws: `token_ids` stays on the device (a step launched ahead reads it
    there); copies to the host are queued at once, before anything the caller queues next,
    and `collect` waits for them alone (engine/overlap.py)."""

    def __init__(self, token_ids: torch.Tensor, logprobs: _DeviceLogprobs | None) -> None:
        self.token_ids = token_ids
        self._logprobs = logprobs
        tensors = [token_ids] if logprobs is None else [token_ids, *logprobs[2:]]
        self._ready: torch.cuda.Event | None = None
        if token_ids.device.type == "cuda":
            self._host = [t.to("cpu", non_blocking=True) for t in tensors]
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensors

    def collect(self, while_waiting: WhileWaiting | None = None) -> SamplerOutput:
        """Wait for the copies and read the tokens (and logprobs) on the host; the
        caller's `while_waiting()` runs first."""
        if while_waiting is not None:
            while_waiting()
        if self._ready is not None:
            self._ready.synchronize()
        token_ids = self._host[0].tolist()
        result: list[TokenLogprob | None] = [None] * len(token_ids)
        lp = self._logprobs
        if lp is None:
            return SamplerOutput(token_ids, result)
        lp_l, rank_l, top_lp_l, top_ids_l = (t.tolist() for t in self._host[1:])
        for j, (i, k) in enumerate(zip(lp.selected, lp.counts, strict=True)):
            top = tuple(zip(top_ids_l[j][:k], top_lp_l[j][:k], strict=True))
            result[i] = TokenLogprob(token_ids[i], lp_l[j], rank_l[j], top)
        return SamplerOutput(token_ids, result)


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), max_len] int64 tensor of `seqs`, padded with `pad`; ids >= pad become pad."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        if seq:
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
    return host_to_device(out.clamp_(0, pad), device)


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
        index = to_device([row_idx, tok_idx], torch.int64, logits.device)
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
    penalties = [rows[i].params.repetition_penalty for i in selected]
    penalty = to_device(penalties, logits.dtype, device).unsqueeze(1)
    index = to_device(selected, torch.int64, device)
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
    freq_t = to_device(freq, dtype, device).unsqueeze(1)
    presence_t = to_device(presence, dtype, device).unsqueeze(1)
    index = to_device(selected, torch.int64, device)
    logits[index] -= freq_t * counts + presence_t * (counts > 0).to(dtype)


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add each row's logit_bias to its logits (ids past the vocabulary are refused at
    admission)."""
    pairs = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if not pairs:
        return
    device = logits.device
    index = (
        to_device([i for i, _, _ in pairs], torch.int64, device),
        to_device([t for _, t, _ in pairs], torch.int64, device),
    )
    bias = to_device([b for _, _, b in pairs], logits.dtype, device)
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
        k = to_device(top_ks, torch.int64, device).unsqueeze(1)
        sorted_logits.masked_fill_(positions >= k, _NEG_INF)
    if any(p < 1.0 for p in top_ps):
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # p = 1 keeps everything, whatever the rounding of the cumulative sum.
        p = to_device([q if q < 1.0 else 2.0 for q in top_ps], torch.float32, device).unsqueeze(1)
        sorted_logits.masked_fill_(mass_before >= p, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def scale_and_truncate(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, then min-p, for rows that sample at random (temperature > 0).

    Returns new logits with -inf outside each row's support; `logits` is not modified.
    """
    device, dtype, vocab_size = logits.device, logits.dtype, logits.shape[1]
    temps = to_device([p.temperature for p in params], dtype, device)
    out = logits / temps.unsqueeze(1)
    top_ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps):
        out = _top_k_top_p(out, top_ks, top_ps)
    if any(p.min_p > 0.0 for p in params):
        probs = out.softmax(dim=-1)
        min_p = to_device([p.min_p for p in params], dtype, device)
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        out.masked_fill_(probs < floor, _NEG_INF)
    return out


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        seed: int = 0,
        draw: DrawOp | None = None,
    ) -> None:
        """`draw`: the kernel registry's fused draw (None: every row takes the torch draw)."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Shared by every row without a generator of its own.
        self._generator = self.make_generator(seed, self.device).torch_generator
        self._fused_draw = None if draw is None else FusedDraw(draw, seed)

    @staticmethod
    def make_generator(seed: int, device: torch.device | str) -> RowGenerator:
        return RowGenerator(seed, device)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: TokenBitmask | None = None
    ) -> SamplerOutput:
        """One token per row; `bitmask` (rows with a grammar) may modify `logits` in place."""
        return self.sample(logits, rows, bitmask).collect()

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: TokenBitmask | None = None
    ) -> SampledTokens:
        """`__call__` without reading the tokens back: every kernel is queued, nothing waits
        for the device."""
        if logits.dim() != 2 or logits.shape != (len(rows), self.vocab_size):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab_size={self.vocab_size}], got "
                f"{tuple(logits.shape)}; pass one SamplingRow per logits row and slice padded "
                "vocabulary columns off"
            )
        if not rows:
            return SampledTokens(torch.empty(0, dtype=torch.int64), None)
        logits = logits.float()
        exempt: frozenset[int] = frozenset()
        if bitmask is not None and bitmask.rows:
            apply_token_bitmask(logits, bitmask)
            banned = [_min_tokens_banned(rows[i]) for i in bitmask.rows]
            exempt = grammar_must_end(bitmask, banned, self.vocab_size)
        processed = apply_penalties(logits, rows, exempt)
        random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if len(random_rows) == len(rows):
            token_ids = self._random(processed, rows)
        else:
            token_ids = processed.argmax(dim=-1)
        if random_rows and len(random_rows) < len(rows):
            index = to_device(random_rows, torch.int64, logits.device)
            token_ids[index] = self._random(processed[index], [rows[i] for i in random_rows])
        return SampledTokens(token_ids, self._logprobs(logits, token_ids, rows))

    def _random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        fused = self._fused_draw
        if fused is None:
            return self._torch_random(logits, rows)
        plain = [is_plain(r.params, self.vocab_size) for r in rows]
        if all(plain):
            return fused(logits, rows)
        if not any(plain):
            return self._torch_random(logits, rows)
        token_ids = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
        for kind, draw in ((True, fused), (False, self._torch_random)):
            chosen = [i for i, p in enumerate(plain) if p is kind]
            index = to_device(chosen, torch.int64, logits.device)
            token_ids[index] = draw(logits[index], [rows[i] for i in chosen])
        return token_ids

    def _torch_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        filtered = scale_and_truncate(logits, [r.params for r in rows])
        return self._draw(filtered.softmax(dim=-1), [r.generator for r in rows])

    def _draw(self, probs: torch.Tensor, generators: list[RowGenerator | None]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.

        Each seeded row draws its noise from its own generator alone, so its tokens do not
        depend on what else is in the batch or where it sits.
        """
        noise = torch.empty_like(probs)
        if all(g is None for g in generators):
            noise.exponential_(generator=self._generator)
        else:
            for i, generator in enumerate(generators):
                source = self._generator if generator is None else generator.torch_generator
                noise[i].exponential_(generator=source)
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    def _logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]
    ) -> _DeviceLogprobs | None:
        """Log-probabilities of the raw distribution: chosen token, its rank, the top ones."""
        selected = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not selected:
            return None
        index = to_device(selected, torch.int64, logits.device)
        logprobs = torch.log_softmax(logits[index], dim=-1)
        chosen = token_ids[index]
        chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))
        ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
        counts = [rows[i].params.logprobs or 0 for i in selected]
        top_lp, top_ids = logprobs.topk(min(max(counts), self.vocab_size), dim=-1)
        return _DeviceLogprobs(selected, counts, chosen_lp.squeeze(1), ranks, top_lp, top_ids)
