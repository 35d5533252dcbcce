"""EngineCore: the synchronous engine loop shared by every role.

Callers (the offline `LLM`, the `AsyncEngine` thread, the nodes through it) drive it:

    add_request(...)            validate, expand n > 1 into sequences, queue them
    step() -> [StepOutput]      schedule, run the model, sample, detokenize, stop checks
    abort(request_id)           finish every sequence of a request, free its blocks

Overlap (`SchedulerConfig.overlap_output_processing`, on by default on CUDA outside
prefill role): once a step's tokens are sampled and appended, the next step is scheduled
and its forward pass launched before this step's tokens are detokenized, so the host's
output work runs while the GPU computes. The launched step is consumed by the next
`step()` call. What differs for callers: a request added or admitted between two calls
joins one step later; a request that a stop string ends (found after the launch) has one
more token computed and dropped; blocks of a request finished while a launched step may
still write them are freed only after that step has run on the device, and
`admit_remote` (whose blocks another node writes) waits for the launched step first.

Role hooks. Prefill role: each step reports the blocks a chunk finalised and, with the
last chunk, the first sampled token (`on_prefill_chunk`); finished requests keep their
blocks until `release(request_id)`, since a transfer may still read them. Decode role:
`admit_remote` allocates a prompt's blocks for a prefill node to write into, then
`remote_kv_arrived` (with the first token) or `remote_kv_failed` (prefill locally).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.profiler import record_function

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.config import EngineConfig
from splitserve.engine.cuda_graphs import DecodeGraphs
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.hashing import seed_hash
from splitserve.engine.kv_pool import KVShape, allocate_kv_pool, num_blocks_for
from splitserve.engine.model.loader import load_model
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.request import Request, RequestId, RequestStatus
from splitserve.engine.sampler import Sampler, SamplingRow
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import RemotePlan, ScheduledChunk, Scheduler, SchedulerOutput
from splitserve.engine.stats import EngineStats
from splitserve.kernels.registry import ModelKernels, select_kernels

logger = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """What one step produced for one sequence of a request."""

    request_id: str
    # Which of the request's n completions this is.
    completion_index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    text_delta: str
    finish_reason: str | None
    stop_reason: int | str | None
    # Prompt tokens of this sequence served from the prefix cache (or received).
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class PrefillChunk(NamedTuple):
    """Prefill role: blocks of a request whose KV is final after this step."""

    request_id: str
    # Block ids in the pool, and the index of the first one within the request.
    block_ids: list[int]
    first_block_index: int
    is_last: bool
    # Set with the last chunk.
    first_token_id: int | None
    first_logprob: TokenLogprob | None
    # Prompt tokens found in this engine's prefix cache.
    num_cached_tokens: int = 0
    # Seconds the request waited before its first chunk was scheduled.
    queue_time_s: float = 0.0


@dataclass(eq=False)
class _Sequence:
    request: Request
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    # Prefill role: leading blocks already reported to the chunk listener.
    num_blocks_reported: int = 0


@dataclass(eq=False)
class _Launched:
    """A step whose forward pass was launched and not yet consumed by `step()`."""

    sched: SchedulerOutput
    logits: torch.Tensor
    # Requests in it that are still unfinished.
    request_ids: set[RequestId]
    done: torch.cuda.Event | None

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None


class EngineCore:
    def __init__(self, config: EngineConfig, kernels: ModelKernels | None = None) -> None:
        self.config = config
        self.role = config.scheduler.role
        self.device = torch.device(config.model.device)
        if kernels is None:
            model_config = config.model
            kernels = select_kernels(
                self.device.type, model_config.kernel_backend, model_config.attention_backend
            )
        loaded = load_model(config.model, kernels)
        self.model, self.arch, self.tokenizer = loaded.model, loaded.arch, loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.max_model_len = loaded.max_model_len
        self.dtype = loaded.dtype
        self.block_size = config.cache.block_size
        self.kv_shape = KVShape(
            self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim, self.block_size
        )
        num_blocks = num_blocks_for(config.cache, self.kv_shape, self.dtype)
        self.kv_cache = allocate_kv_pool(num_blocks, self.kv_shape, self.dtype, self.device)
        self.pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        self.blocks = BlockManager(
            self.pool, self.block_size, seed_hash(config.model.model_id, self.block_size)
        )
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.block_size, self.device, self._capture_graphs()
        )
        self.sampler = Sampler(self.arch.vocab_size, self.device, config.model.seed)
        self.on_prefill_chunk: Callable[[PrefillChunk], None] | None = None
        self._sequences: dict[RequestId, _Sequence] = {}
        self._children: dict[str, list[RequestId]] = {}
        self._num_generation_tokens = 0
        self._num_finished = 0
        self._num_steps = 0
        overlap = config.scheduler.overlap_output_processing
        if overlap is None:
            overlap = self.device.type == "cuda" and self.role != "prefill"
        if overlap and self.role == "prefill":
            raise ValueError(
                "overlap_output_processing does not apply to prefill role (its blocks are "
                "reported as each step ends); leave it unset or false"
            )
        self.overlap = overlap
        self._launched: _Launched | None = None
        logger.info(
            "engine ready: %s (%s, %s), %d KV blocks of %d tokens, context %d, role %s",
            config.model.model_id,
            self.arch.architecture,
            self.dtype,
            num_blocks,
            self.block_size,
            self.max_model_len,
            self.role,
        )

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Decode CUDA graphs on CUDA devices, unless `enforce_eager`."""
        model_config = self.config.model
        if self.device.type != "cuda" or model_config.enforce_eager:
            return None
        max_batch = min(model_config.cuda_graph_max_batch, self.config.scheduler.max_num_seqs)
        max_seq_len = min(model_config.cuda_graph_max_seq_len, self.max_model_len)
        graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_batch, max_seq_len)
        graphs.capture()
        return graphs

    # Intake and validation.

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a request; raises ValueError (with how to fix it) on bad input."""
        for seq in self._make_sequences(request_id, prompt_token_ids, params):
            self.scheduler.add_request(seq.request)

    def _make_sequences(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[_Sequence]:
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already in use; pick a unique id")
        max_new_tokens = self._validate(prompt_token_ids, params)
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        seqs = []
        for index, rid in enumerate(ids):
            request = Request(
                request_id=RequestId(rid),
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                max_new_tokens=max_new_tokens,
                eos_token_ids=self.eos_token_ids,
            )
            generator = None
            if params.seed is not None:
                generator = Sampler.make_generator(params.seed + index, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
            seqs.append(_Sequence(request, request_id, index, detok, generator))
        self._children[request_id] = [s.request.request_id for s in seqs]
        for seq in seqs:
            self._sequences[seq.request.request_id] = seq
        return seqs

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty; pass at least one token")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens but the model's context is "
                f"{self.max_model_len} (room for at least one new token is needed); "
                "shorten the prompt or raise max_model_len"
            )
        room = self.max_model_len - num_prompt
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        if self.role == "prefill":
            max_new = 1
        needed = self.blocks.blocks_needed(num_prompt + max_new)
        if needed > self.pool.num_blocks:
            raise ValueError(
                f"the request needs {needed} KV blocks but the pool has {self.pool.num_blocks}; "
                "raise the KV memory (kv_cache_memory_gib / num_blocks) or lower max_tokens"
            )
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and num_prompt > sched.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {num_prompt} tokens, more than max_num_batched_tokens="
                f"{sched.max_num_batched_tokens} with chunked prefill off; enable it or raise "
                "the budget"
            )
        return max_new

    # The step.

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_runnable(self) -> bool:
        """Whether a step would compute anything (requests waiting for remote KV do not)."""
        return bool(self.scheduler.running or self.scheduler.waiting or self._launched)

    def request_status(self, request_id: str) -> RequestStatus | None:
        """Status of an unfinished n=1 request (None when unknown or finished)."""
        seq = self._sequences.get(RequestId(request_id))
        return None if seq is None else seq.request.status

    def is_unfinished(self, request_id: str) -> bool:
        return request_id in self._children

    def unfinished_request_ids(self) -> list[str]:
        return list(self._children)

    def step(self) -> list[StepOutput]:
        # The named ranges show in torch.profiler traces (benchmarks/profile_decode.py).
        if self._launched is not None:
            sched, logits = self._take_launched()
        else:
            with record_function("step.schedule"):
                sched = self.scheduler.schedule()
            if sched.is_empty:
                return []
            with record_function("step.model"):
                logits = self.runner.execute(sched.chunks)
        self.scheduler.advance(sched)
        self._num_steps += 1
        sampling = [c for c in sched.chunks if c.samples]
        if not sampling:
            if self.role == "prefill":
                self._report_prefill_chunks(sched.chunks, {})
            self._launch_next()
            return []
        with record_function("step.sample"):
            rows = [self._sampling_row(self._sequences[c.request.request_id]) for c in sampling]
            result = self.sampler(logits, rows)
        sampled = list(zip(sampling, result.token_ids, result.logprobs, strict=True))
        if self.role == "prefill":
            firsts = {
                c.request.request_id: (token, logprob)
                for c, token, logprob in sampled
                if not c.request.output_token_ids
            }
            self._report_prefill_chunks(sched.chunks, firsts)
        with record_function("step.outputs"):
            seqs = [self._sequences[c.request.request_id] for c in sampling]
            tokens, logprobs = result.token_ids, result.logprobs
            statuses = [self._add_token(seq, t) for seq, t in zip(seqs, tokens, strict=True)]
            outputs: list[StepOutput | None] = [None] * len(sampled)
            # Sequences that end on this token (eos, stop id, length) end before the next
            # step is scheduled; the others are detokenized while it runs.
            ends = [
                status is not None or seq.request.num_output_tokens >= seq.request.max_new_tokens
                for seq, status in zip(seqs, statuses, strict=True)
            ]
            for i in [i for i, end in enumerate(ends) if end]:
                outputs[i] = self._emit(seqs[i], tokens[i], logprobs[i], statuses[i])
            self._launch_next()
            for i in [i for i, end in enumerate(ends) if not end]:
                outputs[i] = self._emit(seqs[i], tokens[i], logprobs[i], statuses[i])
        return outputs  # type: ignore[return-value]

    def _launch_next(self) -> None:
        """Overlap: schedule the next step and launch its forward pass now."""
        if not self.overlap or self._launched is not None:
            return
        with record_function("step.schedule"):
            sched = self.scheduler.schedule()
        if sched.is_empty:
            return
        with record_function("step.model"):
            logits = self.runner.execute(sched.chunks)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        ids = {c.request.request_id for c in sched.chunks}
        self._launched = _Launched(sched, logits, ids, done)

    def _take_launched(self) -> tuple[SchedulerOutput, torch.Tensor]:
        """The launched step, less the chunks of requests that finished since its launch
        (aborted, or ended by a stop string): their KV and tokens are dropped."""
        launched = self._launched
        assert launched is not None
        self._launched = None
        sched, logits = launched.sched, launched.logits
        if all(not c.request.is_finished for c in sched.chunks):
            return sched, logits
        keep = [c for c in sched.chunks if not c.request.is_finished]
        sampling = [c for c in sched.chunks if c.samples]
        rows = [i for i, c in enumerate(sampling) if not c.request.is_finished]
        index = torch.tensor(rows, dtype=torch.int64).to(logits.device)
        return SchedulerOutput(keep, sched.preempted), logits[index]

    def _sampling_row(self, seq: _Sequence) -> SamplingRow:
        req = seq.request
        return SamplingRow(
            params=req.sampling_params,
            generator=seq.generator,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            eos_token_ids=req.eos_token_ids,
        )

    def _append_token(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        return self._emit(seq, token, logprob, self._add_token(seq, token))

    def _add_token(self, seq: _Sequence, token: int) -> RequestStatus | None:
        """Append a sampled token; the status it ends the request with by its id alone
        (eos, stop token); stop strings and length are checked in `_emit`."""
        req = seq.request
        req.output_token_ids.append(token)
        self._num_generation_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        return self._token_stop_status(req, token)

    def _emit(
        self,
        seq: _Sequence,
        token: int,
        logprob: TokenLogprob | None,
        status: RequestStatus | None,
    ) -> StepOutput:
        """Detokenize the token, check stop strings and length, finish the request if it
        ended. `status` is what `_add_token` returned for the token."""
        req = seq.request
        if status is None or req.sampling_params.include_stop_str_in_output:
            delta = seq.detokenizer.step([token])
            text, stop_str = delta.text_delta, delta.stop_str
        else:
            text, stop_str = "", None  # a stop token's text is not part of the output
        if status is None and stop_str is not None:
            req.stop_reason = stop_str
            status = RequestStatus.FINISHED_STOPPED
        if status is None and req.num_output_tokens >= req.max_new_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if stop_str is None:
                text += seq.detokenizer.flush()
            self._finish(seq, status)
        return StepOutput(
            seq.parent_id,
            seq.index,
            [token],
            None if logprob is None else [logprob],
            text,
            req.status.finish_reason,
            req.stop_reason,
            req.num_cached_tokens,
        )

    def _token_stop_status(self, req: Request, token: int) -> RequestStatus | None:
        """EOS (unless ignore_eos) and stop token ids end a request once min_tokens is met."""
        params = req.sampling_params
        if req.num_output_tokens < params.min_tokens:
            return None
        if token in req.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        return None

    def _finish(self, seq: _Sequence, status: RequestStatus) -> None:
        launched = self._launched
        if launched is not None and seq.request.request_id in launched.request_ids:
            launched.wait()  # the launched step may still write this request's blocks
            launched.request_ids.discard(seq.request.request_id)
            if not launched.request_ids:
                self._launched = None  # nothing left in it to consume
        # Blocks a transfer may still touch are held until `release`: in prefill role the
        # push may still read them; a request aborted while waiting for remote KV may
        # still be written by its prefill node.
        hold = self.role == "prefill" or seq.request.status == RequestStatus.WAITING_FOR_REMOTE_KV
        self.scheduler.finish(seq.request, status, hold=hold)
        self._num_finished += 1
        del self._sequences[seq.request.request_id]
        siblings = self._children.get(seq.parent_id, [])
        if all(rid not in self._sequences for rid in siblings):
            self._children.pop(seq.parent_id, None)

    def abort(self, request_id: str) -> list[StepOutput]:
        """Finish every unfinished sequence of `request_id`; unknown ids are a no-op."""
        outputs = []
        for rid in list(self._children.get(request_id, [])):
            seq = self._sequences.get(rid)
            if seq is None:
                continue
            self._finish(seq, RequestStatus.FINISHED_ABORTED)
            outputs.append(StepOutput(request_id, seq.index, [], None, "", "abort", None))
        return outputs

    # Prefill role.

    def _report_prefill_chunks(
        self,
        chunks: list[ScheduledChunk],
        firsts: dict[RequestId, tuple[int, TokenLogprob | None]],
    ) -> None:
        listener = self.on_prefill_chunk
        if listener is None:
            return
        bs = self.block_size
        for chunk in chunks:
            req = chunk.request
            seq = self._sequences[req.request_id]
            end = min(chunk.start + chunk.num_new_tokens, req.num_prompt_tokens)
            is_last = end == req.num_prompt_tokens
            upto = -(-end // bs) if is_last else end // bs
            if upto <= seq.num_blocks_reported and not is_last:
                continue
            first = firsts.get(req.request_id)
            listener(
                PrefillChunk(
                    seq.parent_id,
                    req.block_ids[seq.num_blocks_reported : upto],
                    seq.num_blocks_reported,
                    is_last,
                    None if first is None else first[0],
                    None if first is None else first[1],
                    req.num_cached_tokens,
                    (req.first_scheduled_time or req.arrival_time) - req.arrival_time,
                )
            )
            seq.num_blocks_reported = upto

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished request kept for a transfer (see `_finish`)."""
        return self.scheduler.release_held(RequestId(request_id))

    # Decode role.

    def admit_remote(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RemotePlan | None:
        """Allocate a prompt's blocks for a prefill node to fill; None when the pool is
        short right now (the caller retries or prefills locally). n must be 1."""
        if params.n != 1:
            raise ValueError("remote prefill serves n=1 requests; prefill n > 1 locally")
        if self._launched is not None:
            # A block freed under the launched step (a preemption) may still be written by
            # the device; another node must not write it before that.
            self._launched.wait()
        (seq,) = self._make_sequences(request_id, prompt_token_ids, params)
        plan = self.scheduler.admit_remote(seq.request)
        if plan is None:
            del self._sequences[seq.request.request_id]
            del self._children[request_id]
        return plan

    def remote_kv_arrived(
        self, request_id: str, first_token_id: int, first_logprob: TokenLogprob | None = None
    ) -> StepOutput:
        """Every block landed: join the batch with the prefill node's first token."""
        seq = self._sequences[RequestId(request_id)]
        self.scheduler.remote_kv_arrived(seq.request.request_id)
        return self._append_token(seq, first_token_id, first_logprob)

    def remote_kv_failed(self, request_id: str) -> None:
        """The transfer failed or timed out: prefill the prompt here instead."""
        self.scheduler.remote_kv_failed(RequestId(request_id))

    # Introspection.

    def stats(self) -> EngineStats:
        sched, pool = self.scheduler, self.pool
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_waiting_for_remote_kv=len(sched.remote),
            num_held=len(sched.held),
            num_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_cached_blocks=pool.num_cached_blocks,
            kv_usage=pool.usage,
            prefix_cache_queries=self.blocks.num_query_tokens,
            prefix_cache_hits=self.blocks.num_hit_tokens,
            num_preemptions=sched.num_preemptions,
            prompt_tokens_computed=sched.num_prompt_tokens_computed,
            generation_tokens=self._num_generation_tokens,
            num_requests_finished=self._num_finished,
            num_steps=self._num_steps,
            num_graph_steps=self.runner.num_graph_steps,
        )

    def check_invariants(self) -> None:
        """Every block free, cached-free or owned, with refcounts matching the requests."""
        expected: dict[int, int] = {}
        sched = self.scheduler
        live = [*sched.running, *sched.waiting, *sched.remote.values(), *sched.held.values()]
        for request in live:
            for block_id in request.block_ids:
                expected[block_id] = expected.get(block_id, 0) + 1
        self.pool.check_invariants(expected)
