"""A run of long fresh prompts attended by cuDNN's fused attention in one ragged call.

`kernels/cudnn_prefill.py` gives cuDNN one call a prompt: one 1,024-token prompt (8 row
tiles of 32 heads) leaves part of the device idle through its tail, and the calls of a
run follow one another. cuDNN's ragged layout takes the whole run at once: each prompt's
rows where the step put them (its start a ragged offset), its length a padding mask, the
output written straight into the step's output rows. torch's own ragged call
(`_cudnn_attention_forward` with cumulative lengths) builds a new plan on every call in
torch 2.11 (45 to 68 ms), so the graph is built here with cuDNN's frontend
(`nvidia-cudnn-frontend`, the `cudnn` module) and kept.

A plan serves one shape: the number of prompts and the longest one, which is rounded up
to a power of two (`ragged_bucket`; a prompt of 1,100 rows runs in a call planned for
2,048, whose tiles past its rows end at once), and the q/k/v/out row strides of the step
buffers. `prepare_ragged` builds every (prompts, bucket) pair a step of `max_rows` rows
can carry at start-up; a run with another shape, or views with other strides, keeps one
call a prompt.

Who calls what: `TritonPagedAttention` (kernels/backend.py) calls `prepare_ragged` once
with q/k/v views of the piecewise graphs' static buffer (engine/piecewise_graphs.py,
at start-up) and keeps the `RaggedAttention` it returns (None: the frontend is missing or
failed; the reason is logged). On a step with a run of fresh prompts on cuDNN it calls
`inputs` on the run's first layer (kept while the step's layers pass the same buffers)
and `attend` on every layer.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch

from splitserve.kernels import cudnn_prefill

logger = logging.getLogger(__name__)

# The smallest bucket: the longest prompt of a run is rounded up to a power of two of at
# least this many rows.
MIN_BUCKET = 1024


def ragged_bucket(longest: int) -> int:
    """The planned longest sequence for a run whose longest prompt has `longest` rows."""
    return max(MIN_BUCKET, 1 << (longest - 1).bit_length())


def max_sequences(bucket: int, rows: int) -> int:
    """The most prompts a run with this bucket fits in `rows`: its longest prompt over half
    the bucket (at the smallest bucket, cuDNN's shortest), the others cuDNN's shortest."""
    least = cudnn_prefill.MIN_ROWS
    longest = max(least, bucket // 2 + 1) if bucket > MIN_BUCKET else least
    return 0 if longest > rows else 1 + (rows - longest) // least


def shapes_up_to(rows: int) -> list[tuple[int, int]]:
    """Every (prompts, bucket) pair a run of at most `rows` rows can take."""
    pairs = []
    bucket = MIN_BUCKET
    while count := max_sequences(bucket, rows):
        pairs += [(n, bucket) for n in range(1, count + 1)]
        bucket *= 2
    return pairs


class Strides(NamedTuple):
    """Row strides (elements) of q, k, v and out, and the heads and head size."""

    q: int
    k: int
    v: int
    out: int
    heads: int
    kv_heads: int
    head_dim: int

    @staticmethod
    def of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_row: int) -> Strides:
        rows = (q.stride(0), k.stride(0), v.stride(0), out_row)
        return Strides(*rows, heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[2])

    def fits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
        """The views have these row strides, and heads and elements one after the other."""
        inner = all(x.stride(1) == x.shape[2] and x.stride(2) == 1 for x in (q, k, v, out))
        return inner and Strides.of(q, k, v, out.stride(0)) == self


class RunInputs(NamedTuple):
    """A run's device arrays: each prompt's start as an element offset into q, k, v and
    out ([B + 1, 1, 1, 1]), and its length ([B, 1, 1, 1] int32)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lens: torch.Tensor


class _Plan(NamedTuple):
    graph: Any  # cudnn.pygraph, built
    tensors: dict[str, Any]  # the graph's tensors by name


class RaggedAttention:
    """Built plans by (prompts, bucket) for views of `strides`; see the module docstring."""

    def __init__(self, cudnn: Any, handle: Any, strides: Strides, scale: float) -> None:
        self._cudnn = cudnn
        self._handle = handle
        self.strides = strides
        self.scale = scale
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._workspace = torch.empty(0, dtype=torch.uint8)
        self._stream: int | None = None

    @property
    def shapes(self) -> frozenset[tuple[int, int]]:
        return frozenset(self._plans)

    def has_plan(self, prompts: int, bucket: int) -> bool:
        """A plan for runs of `prompts` prompts in `bucket` (per layer: no set built)."""
        return (prompts, bucket) in self._plans

    def build(self, prompts: int, bucket: int, device: torch.device) -> None:
        """The plan of runs of `prompts` prompts whose longest is at most `bucket` rows."""
        plan = _build_graph(self._cudnn, self._handle, self.strides, self.scale, prompts, bucket)
        self._plans[(prompts, bucket)] = plan
        size = max(1, plan.graph.get_workspace_size())
        if size > self._workspace.numel():
            self._workspace = torch.empty(size, dtype=torch.uint8, device=device)

    def inputs(self, starts: torch.Tensor) -> RunInputs:
        """A run's offsets and lengths from its starts ([B + 1] int32, from 0, on the device)."""
        rows = starts.to(torch.int64).view(-1, 1, 1, 1)
        lens = (starts[1:] - starts[:-1]).to(torch.int32).view(-1, 1, 1, 1)
        s = self.strides
        return RunInputs(rows * s.q, rows * s.k, rows * s.v, rows * s.out, lens)

    def attend(
        self,
        q: torch.Tensor,  # [T, heads, head_dim]: the run's rows from its first prompt's
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,  # [T, heads, head_dim]: written at the prompts' rows only
        inputs: RunInputs,
        bucket: int,
    ) -> None:
        """Causal attention of each prompt over its own rows, one call on the current stream."""
        plan = self._plans[(inputs.lens.shape[0], bucket)]
        stream = torch.cuda.current_stream(q.device).cuda_stream
        if stream != self._stream:
            self._cudnn.set_stream(handle=self._handle, stream=stream)
            self._stream = stream
        t = plan.tensors
        pack = {
            t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["q_off"]: inputs.q,
            t["k_off"]: inputs.k, t["v_off"]: inputs.v, t["o_off"]: inputs.out,
            t["lens_q"]: inputs.lens, t["lens_kv"]: inputs.lens,
        }  # fmt: skip
        plan.graph.execute(pack, self._workspace, handle=self._handle)


def _build_graph(
    cudnn: Any, handle: Any, s: Strides, scale: float, prompts: int, bucket: int
) -> _Plan:
    """cuDNN's SDPA graph over ragged q/k/v/out ([B, heads, bucket, head_dim] with each
    batch's start an offset), causal, with each sequence's length a padding mask."""
    graph = cudnn.pygraph(
        io_data_type=cudnn.data_type.BFLOAT16,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    t: dict[str, Any] = {}

    def column(name: str, rows: int, data_type: Any) -> Any:
        return graph.tensor(
            name=name, dim=[rows, 1, 1, 1], stride=[1, 1, 1, 1], data_type=data_type
        )

    for name, heads, row in (("q", s.heads, s.q), ("k", s.kv_heads, s.k), ("v", s.kv_heads, s.v)):
        dims, strides = [prompts, heads, bucket, s.head_dim], [bucket * row, s.head_dim, row, 1]
        t[name] = graph.tensor(
            name=name, dim=dims, stride=strides, data_type=cudnn.data_type.BFLOAT16
        )
        t[f"{name}_off"] = column(f"{name}_off", prompts + 1, cudnn.data_type.INT64)
        t[name].set_ragged_offset(t[f"{name}_off"])
    t["lens_q"] = column("lens_q", prompts, cudnn.data_type.INT32)
    t["lens_kv"] = column("lens_kv", prompts, cudnn.data_type.INT32)
    o, _stats = graph.sdpa(
        name="ragged_prefill", q=t["q"], k=t["k"], v=t["v"], generate_stats=False,
        attn_scale=scale, use_causal_mask=True, use_padding_mask=True,
        seq_len_q=t["lens_q"], seq_len_kv=t["lens_kv"],
    )  # fmt: skip
    t["o_off"] = column("o_off", prompts + 1, cudnn.data_type.INT64)
    o.set_output(True).set_dim([prompts, s.heads, bucket, s.head_dim])
    o.set_stride([bucket * s.out, s.head_dim, s.out, 1]).set_ragged_offset(t["o_off"])
    t["o"] = o
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Plan(graph, t)


def prepare_ragged(
    q: torch.Tensor,  # [R, heads, head_dim]: views of the step buffers
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    max_rows: int,
) -> RaggedAttention | None:
    """Plans for every (prompts, bucket) pair a run of up to `max_rows` rows can take, for
    views with these strides and an output whose rows follow one another; None (the
    reason logged) where cuDNN's frontend is missing or does not build them."""
    if q.dtype != torch.bfloat16 or q.device.type != "cuda":
        return None
    try:
        import cudnn  # nvidia-cudnn-frontend
    except ImportError as error:
        logger.info("runs of fresh prompts keep one cuDNN call a prompt: %s", error)
        return None
    started = time.perf_counter()
    strides = Strides.of(q, k, v, q.shape[1] * q.shape[2])
    ragged = RaggedAttention(cudnn, cudnn.create_handle(), strides, scale)
    try:
        for prompts, bucket in shapes_up_to(min(max_rows, q.shape[0])):
            ragged.build(prompts, bucket, q.device)
    except (cudnn.cudnnGraphNotSupportedError, RuntimeError) as error:
        logger.warning("runs of fresh prompts keep one cuDNN call a prompt: %s", error)
        return None
    logger.info(
        "prepared cuDNN's ragged attention for %d (prompts, bucket) shapes in %.1f s",
        len(ragged.shapes),
        time.perf_counter() - started,
    )
    return ragged
