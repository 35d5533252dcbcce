"""Piecewise CUDA graphs of prefill and mixed steps: everything between two attention
calls is one captured graph per token-count bucket; attention runs eagerly between them.

An eager step launches several hundred kernels from Python (norms, projections, rotary,
activation), each costing tens of microseconds of host time, so a short prefill or a
mixed step is bound by the host rather than by the device. Attention cannot be captured
for every batch (its grid and block tables follow the batch's sequences), the rest can:
for a step of T tokens padded to the bucket B >= T, the pieces are

    piece 0:        embed -> layer 0 before attention          -> q, k, v, residual
    piece i (1..L-1): layer i-1 after attention -> layer i before attention
    piece L:        layer L-1 after attention -> final norm     -> hidden

each replayed from its graph, with layer i's attention run eagerly over the T real rows
between pieces i and i+1. A piece that ends before layer i's attention also stores layer
i's K/V rows into the pool with its rotary (one kernel on Triton,
kernels/rotary_store.py), at the slots `run` copies into a static buffer, so the eager
attention only attends (metadata with `kv_stored`): a launch less per layer on the host.
Pad rows carry token 0 at position 0 and slot -1: nothing stores or reads them, and their
outputs are dropped. The pieces hand over through static buffers without copies: the q/k/v
projection writes its output into the buffer attention reads, the residual add its sum
into the residual buffer, and attention its output into the buffer the next piece reads.

Who calls what: `build_parts` builds them with `capture_piecewise_graphs` on CUDA (unless
`enforce_eager`, or `piecewise_graph_max_tokens` is 0), after the decode graphs and the
warm-up; the `ModelRunner` asks `can_run(num_tokens)` for a step the decode graphs do not
take and then calls `run(batch)`. `PiecewiseGraphs(..., capture=False)` runs the same
pieces without graphs (what the CPU tests check against the plain forward).

Steps past the largest captured bucket, up to the scheduler's step limit, run the same
pieces eagerly over exactly their own rows, in the same static buffers. Such a step keeps
the GPU busy for over 1.5 ms a layer, longer than the host takes to launch the layer, so a
graph saves it little, while its bucket pads the matrix products: on an H200 a step of one
4,096-token prompt and 12 decode rows took 103.7 ms eagerly at 4,108 rows against 108.7 ms
replayed at 4,352, one of a 2,100-token prompt and 48 decode rows 55.4 against 58.9 ms at
2,304 (docs/performance.md). Hence graphs only up to 2,048 tokens by default.

Buckets (`piecewise_buckets`): every 16 tokens up to 2,048, every 256 beyond, up to
`piecewise_graph_max_tokens` (padding costs at most 15 tokens up to 2,048 and 1/8 of a
step's tokens past it, where a larger setting captures graphs). A step that carries one
1,024-token prompt beside its decode rows is just past 1,024 tokens: padded to a multiple
of 64 (1,072 to 1,088 rows) its GEMMs took 0.6 ms more on an H200 than at 1,072 rows,
where cuBLAS picks other kernels (docs/performance.md). Every graph shares one memory
pool and one set of static buffers, sized for the largest step; the q/k/v buffer keeps
`cudnn_prefill.BUCKET_ROWS` rows more, so that attention may read a prompt at its length
rounded up to that bucket (kernels/cudnn_prefill.py). Once captured, the attention
backend is told the buffer's views (`prepare`), and builds its per-shape plans then.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from typing import Any

import torch

from splitserve.engine.graph_capture import collector_paused
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.cudnn_prefill import BUCKET_ROWS

logger = logging.getLogger(__name__)


def piecewise_buckets(max_tokens: int) -> list[int]:
    """Token counts graphs are captured for: multiples of 16 to 2,048, of 256 beyond, up
    to `max_tokens` (always included)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes = [*range(16, 2049, 16), *range(2304, max_tokens + 1, 256)]
    sizes = [s for s in sizes if s < max_tokens]
    return [*sizes, max_tokens]


def _place(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Make `buffer` hold `value`: nothing to do when `value` is that very view."""
    if value.data_ptr() != buffer.data_ptr() or value.stride() != buffer.stride():
        buffer.copy_(value)


class _Buffers:
    """Static inputs and piece outputs, sized for the largest step. q, k and v are views
    of one fused q/k/v buffer, which the projection writes directly; it has BUCKET_ROWS
    rows of slack past the largest bucket (zeros, never written)."""

    def __init__(self, model: Any, max_tokens: int, device: torch.device) -> None:
        arch, dtype = model.arch, model.dtype
        heads, kv_heads, dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_size, kv_size = arch.q_size, arch.kv_size
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        # Pool slots of the step's rows; -1 (stored nowhere) on pad rows.
        self.slots = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        rows = max_tokens + BUCKET_ROWS
        qkv = torch.zeros(rows, q_size + 2 * kv_size, dtype=dtype, device=device)
        self.qkv = qkv[:max_tokens]
        self.q = qkv[:, :q_size].view(rows, heads, dim)
        self.k = qkv[:, q_size : q_size + kv_size].view(rows, kv_heads, dim)
        self.v = qkv[:, q_size + kv_size :].view(rows, kv_heads, dim)
        self.attn = torch.zeros(max_tokens, heads, dim, dtype=dtype, device=device)
        self.residual = torch.zeros(max_tokens, arch.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(max_tokens, arch.hidden_size, dtype=dtype, device=device)


class PiecewiseGraphs:
    def __init__(
        self,
        model: Any,
        kv_cache: torch.Tensor,
        max_tokens: int,
        capture: bool = True,
        step_tokens: int | None = None,
    ) -> None:
        """Graphs for steps of up to `max_tokens` tokens; larger steps, up to `step_tokens`
        (default `max_tokens`), run the same pieces eagerly at their own row count."""
        # `model` is a CausalLM (engine/model/llama.py).
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = piecewise_buckets(max_tokens)
        self.max_tokens = max(self.sizes[-1], step_tokens or 0)
        self.buffers = _Buffers(model, self.max_tokens, kv_cache.device)
        self.num_layers = len(model.model.layers)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._capture = capture

    def _piece(self, index: int, size: int) -> None:
        """Piece `index` over the first `size` rows of the static buffers."""
        buf, layers = self.buffers, self.model.model.layers
        positions = buf.positions[:size]
        rotary = self.model.model.rotary_emb
        if index == 0:
            x, residual = self.model.model.embed_tokens(buf.input_ids[:size]), None
        else:
            x, residual = layers[index - 1].post(buf.attn[:size], buf.residual[:size])
        if index == self.num_layers:
            buf.hidden[:size].copy_(self.model.model.norm.add_forward(x, residual)[0])
            return
        # K/V stored with the rotary (one kernel on Triton): the eager attention only attends.
        q, k, v, residual = layers[index].pre(
            x, residual, positions, rotary, self.kv_cache, buf.slots[:size], buf.qkv[:size],
            buf.residual[:size],
        )  # fmt: skip
        # In place already, except layer 0's residual (the embedding) and q/k under qk-norm.
        _place(buf.q[:size], q)
        _place(buf.k[:size], k)
        _place(buf.v[:size], v)
        _place(buf.residual[:size], residual)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every piece of every bucket, largest first, into one memory pool."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with collector_paused():  # no older graph destroyed in the middle of a capture
            for size in reversed(self.sizes):
                graphs = []
                for index in range(self.num_layers + 1):
                    self._piece(index, size)  # outside the capture: lazy inits, workspaces
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._piece(index, size)
                    graphs.append(graph)
                self._graphs[size] = graphs
        torch.cuda.synchronize()
        logger.info(
            "captured piecewise CUDA graphs for %d step sizes (16..%d tokens) in %.1f s",
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - started,
        )
        buf = self.buffers
        self.model.model.layers[0].self_attn.prepare_backend(buf.q, buf.k, buf.v, self.max_tokens)

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens and (bool(self._graphs) or not self._capture)

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The final hidden states [T, hidden] of a step of T tokens (a view of a static
        buffer, valid until the next run)."""
        num_tokens = input_ids.shape[0]
        bucket = bisect.bisect_left(self.sizes, num_tokens)
        size = self.sizes[bucket] if bucket < len(self.sizes) else num_tokens
        buf, layers = self.buffers, self.model.model.layers
        buf.input_ids[:num_tokens].copy_(input_ids)
        buf.positions[:num_tokens].copy_(positions)
        buf.slots[:num_tokens].copy_(meta.slot_mapping)
        buf.input_ids[num_tokens:size].zero_()
        buf.positions[num_tokens:size].zero_()
        buf.slots[num_tokens:size].fill_(-1)
        meta = dataclasses.replace(meta, kv_stored=True)  # the pieces store K/V
        graphs = self._graphs.get(size)
        # The rows every layer's attention reads and writes: the same views each layer.
        q, k, v, out = (x[:num_tokens] for x in (buf.q, buf.k, buf.v, buf.attn))
        for index in range(self.num_layers + 1):
            if graphs is not None:
                graphs[index].replay()
            else:
                self._piece(index, size)
            if index == self.num_layers:
                break
            _place(out, layers[index].self_attn.attend(q, k, v, self.kv_cache, meta, out=out))
        return buf.hidden[:num_tokens]


def capture_piecewise_graphs(
    model: Any, kv_cache: torch.Tensor, max_tokens: int, enforce_eager: bool, step_tokens: int
) -> PiecewiseGraphs | None:
    """Piecewise graphs of steps up to `max_tokens` tokens, captured, for a model on a CUDA
    device, also running steps up to `step_tokens` piece by piece (None: not used)."""
    if kv_cache.device.type != "cuda" or enforce_eager or max_tokens < 1:
        return None
    graphs = PiecewiseGraphs(model, kv_cache, max_tokens, step_tokens=step_tokens)
    graphs.capture()
    return graphs
