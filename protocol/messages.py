"""Conversions between the gRPC messages and the engine's own types.

The router builds a SamplingParams once (validated), sends it with
`sampling_params_to_proto`; the decode node rebuilds it with `sampling_params_from_proto`
(which validates again) and forwards the same message to the prefill node. Every field is
written explicitly, so proto3 zero defaults never stand in for the engine's defaults.
Token log-probabilities travel the same way with `token_logprob_to_proto`/`_from_proto`.

Torch-free: the router imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitserve.protocol import node_pb2 as pb

if TYPE_CHECKING:
    from splitserve.engine.outputs import TokenLogprob
    from splitserve.engine.sampling_params import GrammarSpec, SamplingParams


@dataclass(frozen=True)
class LabelledCounter:
    """A node's counter since start, one per label value, carried in StatsResponse.extra
    under `key` + the label value. The node writes them (node/rpcs.py, from the EngineStats
    fields of the same names and its process's GcPauses), the router exports each as
    `<prefix>node_<metric>_total` with the label `label` (router/metrics.py)."""

    key: str
    metric: str
    label: str
    help: str


LABELLED_COUNTERS = (
    LabelledCounter(
        "prefill_runs_",
        "prefill_attention_runs",
        "path",
        "Prefill attention runs the node planned since it started, by path "
        "(context: the Triton kernel over cached context; flash; cudnn; rows: short "
        "chunks over cached context on the decode kernel, a row at a time)",
    ),
    LabelledCounter(
        "forwards_",
        "forwards",
        "kind",
        "Forward passes the node ran since it started, by kind (decode: every row one "
        "token; prefill: any prompt tokens)",
    ),
    LabelledCounter(
        "forward_rows_", "forward_rows", "kind", "Rows (sequences) of those forward passes"
    ),
    LabelledCounter(
        "forward_device_s_",
        "forward_device_seconds",
        "kind",
        "Device time of those forward passes (CUDA events; host time on the CPU)",
    ),
    LabelledCounter(
        "gc_collections_",
        "gc_collections",
        "generation",
        "Garbage collections in the node's process since it started, by generation",
    ),
    LabelledCounter(
        "gc_pause_s_",
        "gc_pause_seconds",
        "generation",
        "Time the node's process stood still in those collections (every thread)",
    ),
)


def labelled_values(extra: Mapping[str, float], key: str) -> dict[str, float]:
    """The values under `key` + label in a StatsResponse.extra map, by label (empty when
    it has none)."""
    n = len(key)
    return {k[n:]: v for k, v in extra.items() if k.startswith(key)}


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """Every field of `params`; `extra` must be JSON-serialisable."""
    try:
        extra_json = json.dumps(params.extra, sort_keys=True) if params.extra else ""
    except TypeError as exc:
        raise ValueError(
            f"SamplingParams.extra must hold only JSON values to cross the network: {exc}"
        ) from exc
    msg = pb.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        include_stop_str_in_output=params.include_stop_str_in_output,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        skip_special_tokens=params.skip_special_tokens,
        extra_json=extra_json,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.max_tokens is not None:
        msg.max_tokens = params.max_tokens
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.grammar is not None:
        spec = params.grammar
        msg.grammar.CopyFrom(pb.GrammarSpec(kind=spec.kind, source=spec.source, strict=spec.strict))
    msg.logit_bias.update(dict(params.logit_bias))
    return msg


def _grammar_from_proto(msg: pb.SamplingParams) -> GrammarSpec | None:
    if not msg.HasField("grammar"):
        return None
    from splitserve.engine.sampling_params import GRAMMAR_KINDS, GrammarSpec

    kind = msg.grammar.kind
    if kind not in GRAMMAR_KINDS:
        raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {kind!r}")
    return GrammarSpec(kind, msg.grammar.source, msg.grammar.strict)  # type: ignore[arg-type]


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """The engine's SamplingParams; raises ValueError when the values are out of range."""
    from splitserve.engine.sampling_params import SamplingParams

    extra = json.loads(msg.extra_json) if msg.extra_json else {}
    if not isinstance(extra, dict):
        raise ValueError(f"SamplingParams.extra_json must encode a JSON object, got {extra!r}")
    return SamplingParams(
        n=msg.n,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens,
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens,
        grammar=_grammar_from_proto(msg),
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        extra=extra,
    )


def token_logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def token_logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    """Log-probabilities come back as float32 values (the wire type)."""
    from splitserve.engine.outputs import TokenLogprob

    return TokenLogprob(
        token_id=msg.token_id,
        logprob=msg.logprob,
        rank=msg.rank,
        top=tuple((t.token_id, t.logprob) for t in msg.top),
    )
