"""CUDA graphs of the decode step: one captured forward per bucketed batch size.

A decode step launches a few hundred small kernels; launched one by one from Python they
cost far more host time than the GPU spends on them. `DecodeGraphs` captures the model's
forward once per batch size in `graph_batch_sizes(max_batch)` and replays it, so a step
costs one graph launch.

Who calls what: `EngineCore.__init__` builds them with `capture_decode_graphs` (on CUDA,
unless `enforce_eager`), which calls `capture()` once, before serving, and hands them to
the `ModelRunner`; every step the runner asks
`can_run(chunks)` and, when it holds, fills `inputs` (then may overwrite token ids on the
device) and calls `replay(num_rows)` for the final hidden states of the real rows, else
runs the batch eagerly. A graph applies when every chunk adds one
token (decode rows, or one-token prompt tails), the batch has at most `max_batch` rows and
no context is longer than `max_seq_len`.

What a captured graph fixes: buffer addresses (`StaticDecodeInputs`), the batch size (the
real batch is padded up to the next captured size) and the attention kernel's launch grid,
which `decode_attention` derives from `max_seq_len`; shorter contexts exit their unused
context partitions early. Capture runs with slot -1 and context 0 in every row, so it
neither writes nor reads the KV pool.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.decode_inputs import StaticDecodeInputs
from splitserve.engine.graph_capture import collector_paused
from splitserve.engine.scheduler import ScheduledChunk
from splitserve.kernels.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to `max_batch` (which is always included)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_cache: torch.Tensor,
        block_size: int,
        max_batch: int,
        max_seq_len: int,
    ) -> None:
        # `model` is a CausalLM: forward(ids, positions, kv_cache, meta) -> [T, hidden].
        if kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA KV pool, got {kv_cache.device}")
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_batch)
        self.inputs = StaticDecodeInputs(max_batch, max_seq_len, block_size, kv_cache.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.inputs.max_batch

    @property
    def max_seq_len(self) -> int:
        return self.inputs.max_seq_len

    def _meta(self, batch: int) -> AttentionMetadata:
        inputs = self.inputs
        return AttentionMetadata(
            slot_mapping=inputs.slot_mapping[:batch],
            query_start_loc=inputs.query_start_loc[: batch + 1],
            seq_lens=inputs.seq_lens[:batch],
            block_tables=inputs.block_tables[:batch],
            max_query_len=1,
            max_seq_len=inputs.max_seq_len,
            query_lens_cpu=[1] * batch,
            seq_lens_cpu=[inputs.max_seq_len] * batch,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        inputs = self.inputs
        return self.model(
            inputs.input_ids[:batch], inputs.positions[:batch], self.kv_cache, self._meta(batch)
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so the smaller ones reuse its memory."""
        start = time.perf_counter()
        inputs = self.inputs
        inputs.slot_mapping.fill_(-1)
        inputs.seq_lens.zero_()
        pool = torch.cuda.graph_pool_handle()
        with collector_paused():  # no older graph destroyed in the middle of a capture
            for batch in reversed(self.sizes):
                self._forward(batch)  # compiles this shape's kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._hidden[batch] = self._forward(batch)
                self._graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured decode CUDA graphs for %d batch sizes (1..%d, context <= %d) in %.1f s",
            len(self.sizes),
            self.max_batch,
            self.max_seq_len,
            time.perf_counter() - start,
        )

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        return bool(self._graphs) and self.inputs.fits(chunks)

    def padded_batch(self, num_rows: int) -> int:
        """The smallest captured batch size >= num_rows."""
        return self.sizes[bisect.bisect_left(self.sizes, num_rows)]

    def replay(self, num_rows: int) -> torch.Tensor:
        """Replay the graph of the smallest captured batch >= num_rows over the inputs as
        filled; returns the final hidden states [num_rows, hidden] of the real rows (a view
        of a static buffer, valid until the next replay)."""
        batch = self.padded_batch(num_rows)
        self._graphs[batch].replay()
        return self._hidden[batch][:num_rows]


def capture_decode_graphs(
    model: Any, kv_cache: torch.Tensor, config: EngineConfig, block_size: int, max_model_len: int
) -> DecodeGraphs | None:
    """Decode CUDA graphs, captured, for a model on a CUDA device (None: eager only)."""
    model_config = config.model
    if kv_cache.device.type != "cuda" or model_config.enforce_eager:
        return None
    max_batch = min(model_config.cuda_graph_max_batch, config.scheduler.max_num_seqs)
    max_seq_len = min(model_config.cuda_graph_max_seq_len, max_model_len)
    graphs = DecodeGraphs(model, kv_cache, block_size, max_batch, max_seq_len)
    graphs.capture()
    return graphs
