"""EngineCore: the synchronous engine loop, the same for every node kind.

Callers (the offline `LLM`, the `AsyncEngine` thread, the nodes through it) drive it:

    add_request(id, prompt, params, kv_params=None)   validate, fan out n > 1, queue
    step(while_waiting=None)    schedule, run the model, sample, detokenize, stop checks
    poll_connector()            remote KV arrived or failed, held blocks released
    abort(request_id)           finish every sequence of a request, free its blocks

Parts: `RequestIntake`, `Scheduler`, `ModelRunner`, `Sampler`, `OutputProcessor`, overlap
helpers (`overlap.py`: what overlap changes for callers), an optional `KVConnector`
(`kv_connector.py`, with its call order): the engine knows no roles; a node installs its
connector with `set_connector`. Overlap (`overlap_output_processing`: the next step is
launched before this step's tokens are read) is on by default on CUDA, unless the
connector needs each step's blocks as it ends.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from splitserve.engine.config import EngineConfig
from splitserve.engine.intake import ModelLimits, RequestIntake, Sequence
from splitserve.engine.kv_connector import (
    KVConnector,
    KVEvents,
    first_tokens,
    overlap_with,
    report_final_blocks,
)
from splitserve.engine.output_processor import OutputProcessor, StepOutput
from splitserve.engine.overlap import (
    LaunchedStep,
    finish_request,
    launch_ahead,
    retire,
    trim,
)
from splitserve.engine.parts import build_parts
from splitserve.engine.request import RequestId, RequestStatus
from splitserve.engine.sampler import SampledTokens, Sampler, WhileWaiting
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from splitserve.engine.stats import EngineStats, collect_stats
from splitserve.kernels.registry import ModelKernels


class EngineCore:
    def __init__(self, config: EngineConfig, kernels: ModelKernels | None = None) -> None:
        self.config = config
        self.device = torch.device(config.model.device)
        parts = build_parts(config, kernels)
        loaded = parts.loaded
        self.model, self.arch, self.tokenizer = loaded.model, loaded.arch, loaded.tokenizer
        self.max_model_len, self.dtype = loaded.max_model_len, loaded.dtype
        self.block_size = config.cache.block_size
        self.kv_shape, self.kv_cache = parts.kv_shape, parts.kv_cache
        self.pool, self.blocks, self.runner = parts.pool, parts.blocks, parts.runner
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        vocab, seed = self.arch.vocab_size, config.model.seed
        self.sampler = Sampler(vocab, self.device, seed, parts.kernels.draw)
        limits = ModelLimits(vocab, self.max_model_len, loaded.eos_token_ids)
        self.intake = RequestIntake(
            limits, self.tokenizer, self.blocks, config.scheduler, self.device
        )
        self.outputs = OutputProcessor(self._finish)
        self.connector: KVConnector | None = None
        self._num_finished = 0
        self._num_steps = 0
        overlap = config.scheduler.overlap_output_processing
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._launched: LaunchedStep | None = None

    def set_connector(self, connector: KVConnector) -> None:
        """Install the node's KV connector (before any request)."""
        if self.intake.children or self._launched is not None:
            raise RuntimeError("install the KV connector before the first request")
        requested = self.config.scheduler.overlap_output_processing
        self.overlap = overlap_with(connector, self.overlap, requested)
        self.connector = connector

    # Intake.

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_params: object | None = None,
    ) -> None:
        """Queue a request; raises ValueError (with how to fix it) on bad input.
        `kv_params` goes to the connector's `on_admission` untouched."""
        connector = self.connector
        cap = connector.max_new_tokens if connector is not None else None
        max_new = self.intake.validate(request_id, prompt_token_ids, params, cap)
        # n > 1 samples several first tokens: such prompts are always computed here.
        is_remote = (
            connector is not None
            and connector.on_admission(request_id, kv_params)
            and params.n == 1
        )
        reserves = connector is not None and connector.reserves_prompt
        seqs = self.intake.register(request_id, prompt_token_ids, params, max_new, reserves)
        if is_remote and connector is not None:
            self._admit_remote(seqs[0], connector)
            return
        for seq in seqs:
            self.scheduler.add_request(seq.request)

    def _admit_remote(self, seq: Sequence, connector: KVConnector) -> None:
        """Allocate the prompt's blocks for another node to fill, or queue it for local
        prefill when the pool is short right now."""
        if self._launched is not None:
            # A block freed under the launched step (a preemption) may still be written by
            # the device; another node must not write it before that.
            self._launched.wait()
        plan = self.scheduler.admit_remote(seq.request)
        connector.on_remote_plan(seq.parent_id, plan)
        if plan is None:
            self.scheduler.add_request(seq.request)

    # The step.

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_runnable(self) -> bool:
        """Whether a step would compute anything (requests waiting for remote KV do not)."""
        return bool(self.scheduler.running or self.scheduler.waiting or self._launched)

    def request_status(self, request_id: str) -> RequestStatus | None:
        """Status of an unfinished n=1 request (None when unknown or finished)."""
        seq = self.intake.sequences.get(RequestId(request_id))
        return None if seq is None else seq.request.status

    def is_unfinished(self, request_id: str) -> bool:
        return request_id in self.intake.children

    def unfinished_request_ids(self) -> list[str]:
        return list(self.intake.children)

    def step(self, while_waiting: WhileWaiting | None = None) -> list[StepOutput]:
        """One step's outputs; `while_waiting()` runs after the next step's launch (with
        overlap), before the wait for this step's tokens (none to wait for: not run)."""
        # The named ranges show in torch.profiler traces (benchmarks/profile_decode.py).
        batch = self._next_batch()
        if batch is None:
            return []
        sched, logits, consumed = batch
        self.scheduler.advance(sched)
        self._num_steps += 1
        sampling = [c for c in sched.chunks if c.samples]
        drawn = self._sample(sampling, logits) if sampling else None
        self._launch_next(sampling, drawn)
        result = None if drawn is None else drawn.collect(while_waiting)
        retire(consumed, self.scheduler)  # its tokens are read: the device is past it
        if self.connector is not None:
            firsts = {} if result is None else first_tokens(sampling, result)
            known = self.intake.sequences
            report_final_blocks(self.connector, sched.chunks, known, firsts, self.block_size)
        if result is None:
            return []
        with record_function("step.outputs"):
            seqs = [self.intake.sequences[c.request.request_id] for c in sampling]
            sampled = zip(seqs, result.token_ids, result.logprobs, strict=True)
            return [self.outputs.append(seq, token, logprob) for seq, token, logprob in sampled]

    def _next_batch(self) -> tuple[SchedulerOutput, torch.Tensor, LaunchedStep | None] | None:
        """The launched step (overlap; also returned, to retire), else a freshly scheduled
        and run one."""
        if self._launched is not None:
            launched, self._launched = self._launched, None
            return *trim(launched), launched
        with record_function("step.schedule"):
            sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        with record_function("step.model"):
            return sched, self.runner.execute(sched.chunks), None

    def _sample(self, sampling: list[ScheduledChunk], logits: torch.Tensor) -> SampledTokens:
        with record_function("step.sample"):
            seqs = [self.intake.sequences[c.request.request_id] for c in sampling]
            bitmask = self.intake.bitmask(seqs)  # on the host, while the device computes
            return self.sampler.sample(logits, [seq.sampling_row() for seq in seqs], bitmask)

    def _launch_next(self, sampling: list[ScheduledChunk], drawn: SampledTokens | None) -> None:
        """With overlap, launch the next step now: before this step's tokens are read."""
        if not self.overlap or self._launched is not None:
            return
        token_ids = None if drawn is None else drawn.token_ids
        self._launched = launch_ahead(self.scheduler, self.runner, self.device, sampling, token_ids)

    def _finish(self, seq: Sequence, status: RequestStatus) -> None:
        request = seq.request
        # The connector may keep the blocks for a transfer that still reads or writes them.
        hold = self.connector is not None and self.connector.on_finish(seq.parent_id)
        self._launched = finish_request(self.scheduler, self._launched, request, status, hold)
        self._num_finished += 1
        self.intake.forget(seq)

    def abort(self, request_id: str) -> list[StepOutput]:
        """Finish every unfinished sequence of `request_id`; unknown ids are a no-op."""
        outputs = []
        for rid in list(self.intake.children.get(request_id, [])):
            seq = self.intake.sequences.get(rid)
            if seq is None:
                continue
            self._finish(seq, RequestStatus.FINISHED_ABORTED)
            outputs.append(StepOutput(request_id, seq.index, [], None, "", "abort", None))
        return outputs

    def poll_connector(self) -> tuple[list[StepOutput], bool]:
        """Apply what the connector's poll found: (outputs, whether transfers are in
        flight). Aborts first, then releases of held blocks, failures, arrivals."""
        if self.connector is None:
            return [], False
        events: KVEvents = self.connector.poll()
        outputs: list[StepOutput] = []
        for request_id in events.to_abort:
            outputs.extend(self.abort(request_id))
        for request_id in events.released:
            self.scheduler.release_held(RequestId(request_id))
        for request_id in events.failed:
            self.scheduler.remote_kv_failed(RequestId(request_id))
        for arrived in events.arrived:
            seq = self.intake.sequences.get(RequestId(arrived.request_id))
            if seq is None or seq.request.status != RequestStatus.WAITING_FOR_REMOTE_KV:
                continue
            self.scheduler.remote_kv_arrived(seq.request.request_id)
            token, logprob = arrived.first_token_id, arrived.first_logprob
            outputs.append(self.outputs.append(seq, token, logprob))
        return outputs, events.is_busy

    def stats(self) -> EngineStats:
        return collect_stats(
            self.scheduler,
            self.blocks,
            generation_tokens=self.outputs.num_generation_tokens,
            num_finished=self._num_finished,
            num_steps=self._num_steps,
            runner=self.runner,
        )

    def check_invariants(self) -> None:
        """Every block free, cached-free or owned, with refcounts matching the requests."""
        self.scheduler.check_invariants()
