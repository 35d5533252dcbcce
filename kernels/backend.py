"""`TritonPagedAttention`: the AttentionBackend of GPU nodes, built on the kernels here.

Per layer the model calls `forward(q, k, v, kv_cache_layer, meta, scale[, out])`, which

1. stores the step's K/V rows at `meta.slot_mapping` (`store_kv`; slot -1 skipped),
   unless `meta.kv_stored` (the model stores them with its rotary before attention);
2. attends, into `out` when the caller gives one (the piecewise graphs' static buffer): an
   all-decode batch (one query per sequence, one row per sequence) runs the split-K decode
   kernel (with `fused_decode_merge`, a split plan's partitions merged by the last of them
   inside that kernel: `MergeCounters`); a batch with prefill chunks runs its leading
   `meta.num_decodes` decode rows with the decode kernel (which reads each KV head once for
   its whole query group; checked, planned and given its scratch on the step's first layer,
   then only launched: `PreparedDecode`) and the other sequences in runs
   (kernels/prefill_runs.py): sequences with cached context with the varlen prefill
   kernel; with `flash_fresh_prefill`, fresh ones (nothing cached before them) with torch's
   flash kernel over their own k/v rows (kernels/fresh_prefill.py), or, with
   `cudnn_fresh_prefill` once `prepare` has run, long fresh prompts with cuDNN's fused
   attention (kernels/cudnn_prefill.py; with `cudnn_ragged_prompts`, a run of them in one
   ragged call where `prepare` built its plans, kernels/cudnn_ragged.py); with
   `short_rest_rows`, runs of short chunks over cached context with the decode kernel,
   one query row as one sequence (`ROWS`: its per-row block tables and lengths are built
   once per step, on the host, and sent in one copy).
   With `overlap_decode_rows` (CUDA), the decode rows of such a step are attended on a
   second stream beside the prefill rows (kernels/side_stream.py).

Nothing in `forward` reads device memory on the host: grid sizes come from the host ints
`meta.max_query_len` and `meta.max_seq_len`, everything else from meta's device tensors.
Output rows that belong to no sequence (past query_start_loc[-1]) are not written.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch

from splitserve.kernels import cudnn_prefill, cudnn_ragged
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.cudnn_prefill import PaddedPrompt
from splitserve.kernels.decode_attention import MergeCounters, PreparedDecode, decode_attention
from splitserve.kernels.device_copy import arrays_to_device
from splitserve.kernels.fresh_prefill import FLASH_DTYPES, fresh_prefill_attention
from splitserve.kernels.prefill_attention import prefill_attention
from splitserve.kernels.prefill_runs import CONTEXT, CUDNN, FLASH, ROWS, PrefillRun, plan_runs
from splitserve.kernels.prefill_split import default_tiles as split_tiles
from splitserve.kernels.prefill_split import plan_context_splits
from splitserve.kernels.side_stream import DecodeBranch, SideStream
from splitserve.kernels.store_kv import store_kv


class _RowsInputs(NamedTuple):
    """A `ROWS` run's query rows as decode sequences: row i of a chunk of q rows ending a
    context of s tokens sees the first s - q + 1 + i tokens, through its chunk's table."""

    block_tables: torch.Tensor  # [rows, max_blocks] int32
    seq_lens: torch.Tensor  # [rows] int32
    max_seq_len: int


class _Run(NamedTuple):
    """One run of prefill sequences and its query starts on the device, from 0."""

    run: PrefillRun
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    rows: _RowsInputs | None = None  # ROWS runs only
    context_splits: int = 1  # CONTEXT runs: partitions of each context (kernels/prefill_split.py)


class _MixedPlan(NamedTuple):
    """What every layer of one mixed step reads, worked out once per step (the metadata
    object) instead of once per layer: `decodes` leading decode rows, then the prefill
    sequences in runs, each attended by its own path."""

    decodes: int
    decode_max_seq_len: int
    runs: tuple[_Run, ...]


class TritonPagedAttention:
    """AttentionBackend over the paged pool with Triton kernels (see the module docstring).

    `decode_num_splits` pins the decode kernel's split count (None: chosen per batch from
    the device size and `meta.max_seq_len`); `flash_fresh_prefill` attends prefill chunks
    without cached context with torch's flash kernel (fp16/bf16 on CUDA; the registry sets
    it where `flash_prefill_supported`). A step with prefill chunks is planned once, on its
    first layer, and the plan kept while the same metadata object comes back.
    `overlap_decode_rows` attends a mixed step's decode rows on a second CUDA stream
    (`side_stream`, made on first use unless given) while the prefill rows run; it does
    nothing on other devices or while a CUDA graph is being captured.
    `cudnn_fresh_prefill` hands long fresh prompts to cuDNN once `prepare` has built its
    plans; `dense_attend` is the call that attends one padded prompt (cuDNN's unless
    given); with `cudnn_ragged_prompts`, `prepare` also builds cuDNN's ragged plans and a
    run of such prompts takes one call. `fused_decode_merge` merges a split decode plan's
    partitions inside the split kernel (one launch a layer instead of two; the backend
    keeps the counters).
    `short_rest_rows` attends runs of chunks over cached context of at most that many rows
    with the decode kernel (`ROWS`, kernels/prefill_runs.py); 0 leaves them to the Triton
    prefill kernel. `split_context_prefill` gives a run on the Triton prefill kernel whose
    query tiles leave the device mostly idle the kernel that splits each context across
    programs (kernels/prefill_split.py)."""

    def __init__(
        self,
        decode_num_splits: int | None = None,
        flash_fresh_prefill: bool = False,
        overlap_decode_rows: bool = False,
        side_stream: DecodeBranch | None = None,
        cudnn_fresh_prefill: bool = False,
        dense_attend: cudnn_prefill.DenseAttend = cudnn_prefill.cudnn_attend,
        fused_decode_merge: bool = False,
        short_rest_rows: int = 0,
        split_context_prefill: bool = False,
        cudnn_ragged_prompts: bool = False,
    ) -> None:
        if decode_num_splits is not None and decode_num_splits < 1:
            raise ValueError(f"decode_num_splits must be >= 1 or None, got {decode_num_splits}")
        if short_rest_rows < 0:
            raise ValueError(f"short_rest_rows must be >= 0 (0: off), got {short_rest_rows}")
        self.short_rest_rows = short_rest_rows
        self.split_context_prefill = split_context_prefill
        self._sms: int | None = None  # the device's multiprocessors, read on first use
        self.decode_num_splits = decode_num_splits
        self.flash_fresh_prefill = flash_fresh_prefill
        self.overlap_decode_rows = overlap_decode_rows
        self._side = side_stream
        self._planned: tuple[AttentionMetadata, _MixedPlan] | None = None
        # The step's decode rows' prepared launch (kernels/decode_attention.py).
        self._decode: tuple[_MixedPlan, PreparedDecode] | None = None
        self.cudnn_fresh_prefill = cudnn_fresh_prefill
        self._dense_attend = dense_attend
        self._cudnn_ready = False
        self.cudnn_ragged_prompts = cudnn_ragged_prompts
        # cuDNN's ragged plans, once `prepare` built them; a run's device inputs for them
        # by the run's index, with the plan they were worked out for.
        self._ragged: cudnn_ragged.RaggedAttention | None = None
        self._ragged_inputs: dict[int, tuple[_MixedPlan, cudnn_ragged.RunInputs]] = {}
        # A cuDNN run's padded prompts (None: past the buffer), by the run's index in its
        # plan, with the plan and the q/k/v they view.
        self._prompts: dict[int, tuple[_MixedPlan, tuple, list[PaddedPrompt] | None]] = {}
        self._counters = MergeCounters() if fused_decode_merge else None
        # ROWS runs launch on the current stream while the decode rows may run on the side
        # stream: counters of their own. Their prepared launches, by run index, with the plan.
        self._rows_counters = MergeCounters() if fused_decode_merge else None
        self._rows: dict[int, tuple[_MixedPlan, PreparedDecode]] = {}
        self._runs_planned = dict.fromkeys((CONTEXT, FLASH, CUDNN, ROWS), 0)

    def prepare(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_rows: int
    ) -> None:
        """Steps to come take q/k/v as row slices of these views (a step buffer of at least
        `max_rows` rows): build cuDNN's plans for the prompt lengths they can hold."""
        if self.cudnn_fresh_prefill and q.dtype in FLASH_DTYPES:
            cudnn_prefill.prepare_buckets(q, k, v, scale, max_rows, self._dense_attend)
            self._cudnn_ready = True
            if self.cudnn_ragged_prompts:
                self._ragged = cudnn_ragged.prepare_ragged(q, k, v, scale, max_rows)

    def prefill_runs(self) -> dict[str, int]:
        """Prefill runs planned since start, by path: each step counts each of its runs once
        (a cuDNN run that found its padded rows past the buffer took the flash path)."""
        return dict(self._runs_planned)

    def context_splits(self) -> list[int]:
        """The last planned step's CONTEXT runs' partitions of each context (1: unsplit)."""
        if self._planned is None:
            return []
        return [run.context_splits for run in self._planned[1].runs if run.run.kind == CONTEXT]

    def store(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """The rows' K/V into one layer's pool view at `slot_mapping` (-1 skipped)."""
        store_kv(k, v, kv_cache, slot_mapping)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [T, num_heads, head_dim]
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]}")
        if not meta.kv_stored:
            self.store(k, v, kv_cache, meta.slot_mapping)
        if meta.is_all_decode and q.shape[0] == meta.num_seqs:
            return decode_attention(
                q,
                kv_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.max_seq_len,
                scale,
                out=out,
                num_splits=self.decode_num_splits,
                counters=self._counters,
            )
        plan = self._plan(meta, q)
        decodes = plan.decodes
        if out is None:
            out = torch.empty_like(q)
        side = self._side_stream(q.device) if decodes else None
        if decodes:
            with side.branch() if side is not None else nullcontext():
                rows = q[:decodes], kv_cache, out[:decodes]
                self._prepared_decode(plan, meta, scale, *rows)(*rows)
        self._prefill(q, k, v, kv_cache, meta, plan, scale, out)
        if side is not None:
            side.join()
        return out

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        plan: _MixedPlan,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """The prefill sequences' rows (those past `plan.decodes`), attended into `out`
        run by run; the last run's views reach to the end of the rows (any padding)."""
        last = len(plan.runs) - 1
        for index, run in enumerate(plan.runs):
            first = plan.decodes + run.run.first_row
            end = None if index == last else first + run.run.rows
            rows = q[first:end], k[first:end], v[first:end], out[first:end]
            self._attend_run(index, run, *rows, kv_cache, meta, plan, scale)

    def _attend_run(
        self,
        index: int,
        run: _Run,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        plan: _MixedPlan,
        scale: float,
    ) -> None:
        lens = run.run.query_lens
        if run.run.kind == ROWS:
            rows = q[: run.run.rows], kv_cache, out[: run.run.rows]
            self._prepared_rows(index, plan, scale, *rows)(*rows)
            return
        if run.run.kind == CUDNN:
            if self._attend_ragged(index, run, (q, k, v), out, plan):
                return
            prompts = self._padded_prompts(index, q, k, v, plan)
            if prompts is not None:
                cudnn_prefill.attend_prompts(prompts, lens, scale, out, self._dense_attend)
                return
        if run.run.kind != CONTEXT:  # fresh: FLASH, or CUDNN past its buffer
            fresh_prefill_attention(q, k, v, run.query_start_loc, lens, scale, out=out)
            return
        first = plan.decodes + run.run.first_seq
        seqs = slice(first, first + run.run.num_seqs)
        args = (q, kv_cache, meta.block_tables[seqs], meta.seq_lens[seqs], run.query_start_loc)
        prefill_attention(*args, max(lens), scale, out=out, num_splits=run.context_splits)

    def _attend_ragged(
        self,
        index: int,
        run: _Run,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        out: torch.Tensor,
        plan: _MixedPlan,
    ) -> bool:
        """Run `index`'s prompts in one ragged cuDNN call (kernels/cudnn_ragged.py): False
        (nothing written) without a plan for its shape or for its views' strides."""
        ragged = self._ragged
        lens = run.run.query_lens
        bucket = cudnn_ragged.ragged_bucket(max(lens))
        if ragged is None or not ragged.has_plan(len(lens), bucket):
            return False
        if not ragged.strides.fits(*qkv, out):
            return False
        kept = self._ragged_inputs.get(index)
        if kept is None or kept[0] is not plan:
            kept = (plan, ragged.inputs(run.query_start_loc))
            self._ragged_inputs[index] = kept
        ragged.attend(*qkv, out, kept[1], bucket)
        total = sum(lens)
        if total < out.shape[0]:
            out[total:].zero_()
        return True

    def _padded_prompts(
        self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _MixedPlan
    ) -> list[PaddedPrompt] | None:
        """Run `index`'s prompts padded for cuDNN, worked out on the step's first layer and
        kept while its layers pass the same buffers (the piecewise graphs' static ones)."""
        views = (q.data_ptr(), k.data_ptr(), v.data_ptr(), q.shape, q.stride(), k.stride())
        kept = self._prompts.get(index)
        if kept is not None and kept[0] is plan and kept[1] == views:
            return kept[2]
        prompts = cudnn_prefill.padded_prompts(q, k, v, plan.runs[index].run.query_lens)
        self._prompts[index] = (plan, views, prompts)
        return prompts

    def _prepared_decode(
        self,
        plan: _MixedPlan,
        meta: AttentionMetadata,
        scale: float,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        out: torch.Tensor,
    ) -> PreparedDecode:
        """The step's decode rows' launch, prepared on its first layer (on the stream the
        decode rows run on, which then owns its scratch) and kept while its plan lasts."""
        if self._decode is not None and self._decode[0] is plan:
            return self._decode[1]
        decodes = plan.decodes
        prepared = PreparedDecode(
            q,
            kv_cache,
            meta.block_tables[:decodes],
            meta.seq_lens[:decodes],
            plan.decode_max_seq_len,
            scale,
            out,
            num_splits=self.decode_num_splits,
            counters=self._counters,
        )
        self._decode = (plan, prepared)
        return prepared

    def _prepared_rows(
        self,
        index: int,
        plan: _MixedPlan,
        scale: float,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        out: torch.Tensor,
    ) -> PreparedDecode:
        """ROWS run `index`'s launch, prepared on the step's first layer and kept while
        its plan lasts."""
        kept = self._rows.get(index)
        if kept is not None and kept[0] is plan:
            return kept[1]
        inputs = plan.runs[index].rows
        assert inputs is not None, "a ROWS run is planned with its inputs"
        prepared = PreparedDecode(
            q,
            kv_cache,
            inputs.block_tables,
            inputs.seq_lens,
            inputs.max_seq_len,
            scale,
            out,
            num_splits=self.decode_num_splits,
            counters=self._rows_counters,
        )
        self._rows[index] = (plan, prepared)
        return prepared

    def _side_stream(self, device: torch.device) -> DecodeBranch | None:
        """The stream a mixed step's decode rows run on, or None for the current one."""
        if not self.overlap_decode_rows:
            return None
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if self._side is None:
            if device.type != "cuda":
                return None
            self._side = SideStream(device)
        return self._side

    def _plan(self, meta: AttentionMetadata, q: torch.Tensor) -> _MixedPlan:
        """The step's plan: kept from the layer before when `meta` is the same object."""
        if self._planned is not None and self._planned[0] is meta:
            return self._planned[1]
        decodes = meta.num_decodes
        if not 0 < decodes < meta.num_seqs:
            decodes = 0
        query_start_loc = (
            meta.query_start_loc[decodes:] - decodes if decodes else meta.query_start_loc
        )
        runs = plan_runs(
            meta.query_lens_cpu[decodes:],
            meta.seq_lens_cpu[decodes:],
            flash=self.flash_fresh_prefill and q.dtype in FLASH_DTYPES,
            cudnn=self._cudnn_ready,
            rows_max=self.short_rest_rows,
        )
        plan = _MixedPlan(
            decodes=decodes,
            decode_max_seq_len=max(meta.seq_lens_cpu[:decodes], default=0),
            runs=tuple(
                _Run(
                    run,
                    _run_starts(query_start_loc, run, len(runs)),
                    _rows_inputs(meta, decodes + run.first_seq, run) if run.kind == ROWS else None,
                    self._context_splits(run, meta.seq_lens_cpu[decodes:], q)
                    if run.kind == CONTEXT
                    else 1,
                )
                for run in runs
            ),
        )
        self._planned = (meta, plan)
        for run in runs:
            self._runs_planned[run.kind] += 1
        self._prompts.clear()  # the step before's padded views (they keep its buffers alive)
        self._rows.clear()  # the step before's ROWS launches and their scratch
        return plan

    def _context_splits(self, run: PrefillRun, seq_lens: list[int], q: torch.Tensor) -> int:
        """Partitions of each context for a CONTEXT run (`seq_lens`: the step's prefill
        sequences' lengths): 1 unless `split_context_prefill`."""
        if not self.split_context_prefill:
            return 1
        device = q.device
        if self._sms is None:
            cuda = device.type == "cuda"
            self._sms = (
                torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
            )
        lens = seq_lens[run.first_seq : run.first_seq + run.num_seqs]
        block_m = split_tiles(q.dtype, q.shape[2], device)[0]
        return plan_context_splits(run.query_lens, lens, q.shape[1], block_m, self._sms)


def _run_starts(query_start_loc: torch.Tensor, run: PrefillRun, num_runs: int) -> torch.Tensor:
    """The run's query starts from 0: the prefill sequences' own when it is the only run."""
    if num_runs == 1:
        return query_start_loc
    starts = query_start_loc[run.first_seq : run.first_seq + run.num_seqs + 1]
    return starts - run.first_row


def _rows_inputs(meta: AttentionMetadata, first_seq: int, run: PrefillRun) -> _RowsInputs:
    """A ROWS run's per-row block tables and lengths (`first_seq`: its first sequence among
    the step's). Sequence indices and lengths go in one host-to-device copy
    (`arrays_to_device`, whose aligned offsets keep the pointer alignment the decode kernel
    was compiled for)."""
    seq_of_row: list[int] = []
    row_lens: list[int] = []
    for offset, query_len in enumerate(run.query_lens):
        seq_len = meta.seq_lens_cpu[first_seq + offset]
        seq_of_row += [first_seq + offset] * query_len
        row_lens += range(seq_len - query_len + 1, seq_len + 1)
    rows, lens = arrays_to_device(
        [np.array(seq_of_row, dtype=np.int32), np.array(row_lens, dtype=np.int32)],
        meta.block_tables.device,
    )
    return _RowsInputs(meta.block_tables.index_select(0, rows), lens, max(row_lens))
