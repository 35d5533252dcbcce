"""Metric definitions of `splitserve bench` (the same text is in docs/benchmarking.md).

All times are client-side, from one monotonic clock. For one request:

* send: just before the HTTP request is written.
* content chunk: a streamed chunk with non-empty generated text (a chat chunk carrying only
  the role, empty chunks, the usage chunk and ``[DONE]`` are not content chunks).
* TTFT = first content chunk - send.
* E2E latency = last content chunk - send (the usage chunk and ``[DONE]`` are excluded).
* TPOT = (last content chunk - first content chunk) / (output tokens - 1); undefined when
  the request produced <= 1 output token or was not streamed.
* ITL = every gap between consecutive content chunks of a request; aggregates pool the
  gaps of all requests (a request with many chunks weighs more).
* output tokens = the server's ``usage.completion_tokens`` when given, else the generated
  text counted with the benchmark's tokenizer.
* A textless success (usage counts output tokens, the text is empty) takes its times from
  the chunks carrying choices: TTFT = first such chunk, E2E = last; it has no ITL.

Over a run (duration = benchmark start to the end of the last response):
* request throughput = successful requests / duration.
* output token throughput = sum of output tokens of successful requests / duration;
  input token throughput likewise with prompt tokens (server usage, else client count).
* goodput and SLO attainment: see `slo.py`.

Only successful requests enter latency distributions; failures are counted by kind.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from splitserve.benchmarks.client import RequestRecord
from splitserve.benchmarks.stats import MIN_TAIL_SAMPLES, describe, is_tail_supported
from splitserve.benchmarks.tokenizer import BenchTokenizer

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class RequestMetrics:
    ttft_s: float
    e2e_s: float
    tpot_s: float | None  # None when output tokens <= 1 or not streamed
    itls_s: tuple[float, ...]  # gaps between consecutive content chunks
    num_output_tokens: int

    @property
    def max_itl_s(self) -> float | None:
        return max(self.itls_s) if self.itls_s else None


def request_metrics(rec: RequestRecord) -> RequestMetrics | None:
    """Per-request metrics as defined in the module docstring; None for a failed request."""
    if not rec.is_success:
        return None
    times = rec.chunk_times_s
    if not times:  # textless: usage counted tokens that decoded to no text
        first, last = rec.first_event_s or rec.send_s, rec.last_event_s or rec.send_s
        num_out = rec.num_output_tokens or 0
        tpot = (last - first) / (num_out - 1) if rec.is_streamed and num_out > 1 else None
        return RequestMetrics(first - rec.send_s, last - rec.send_s, tpot, (), num_out)
    first, last = times[0], times[-1]
    num_out = rec.num_output_tokens if rec.num_output_tokens is not None else len(times)
    tpot = (last - first) / (num_out - 1) if rec.is_streamed and num_out > 1 else None
    itls = tuple(np.diff(times).tolist()) if rec.is_streamed else ()
    return RequestMetrics(first - rec.send_s, last - rec.send_s, tpot, itls, num_out)


def metric_samples(metrics: list[RequestMetrics | None]) -> dict[str, np.ndarray]:
    """Seconds: per-request TTFT, TPOT (defined ones), E2E, and pooled ITL gaps."""
    ok = [m for m in metrics if m is not None]
    return {
        "ttft": np.array([m.ttft_s for m in ok]),
        "tpot": np.array([m.tpot_s for m in ok if m.tpot_s is not None]),
        "itl": np.array([g for m in ok for g in m.itls_s]),
        "e2e": np.array([m.e2e_s for m in ok]),
    }


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    """Failures grouped by kind (text before the first colon, e.g. 'HTTP 503', 'timeout ...')."""
    return dict(Counter(r.error.split(":")[0] for r in records if r.error))


def latency_summary(
    samples: dict[str, np.ndarray], percentiles: tuple[float, ...], seed: int
) -> tuple[dict[str, object], list[str]]:
    """Per-metric stats in milliseconds, and warnings for tail percentiles with thin support."""
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {}
    thin = []
    for name in LATENCY_METRICS:
        x = samples[name]
        out[f"{name}_ms"] = describe(x, percentiles, rng, scale=1000.0)
        weak = [f"p{q:g}" for q in percentiles if len(x) and not is_tail_supported(len(x), q)]
        if weak:
            thin.append(f"{name} {'/'.join(weak)} (n={len(x)})")
    warnings = []
    if thin:
        need = int(np.ceil(MIN_TAIL_SAMPLES / (1 - max(percentiles) / 100)))
        warnings.append(
            f"thin tails, fewer than {MIN_TAIL_SAMPLES} samples above the percentile: "
            f"{'; '.join(thin)}; p{max(percentiles):g} needs about {need} samples"
        )
    return out, warnings


def throughput_summary(
    records: list[RequestRecord], metrics: list[RequestMetrics | None], duration_s: float
) -> dict[str, float | int]:
    ok = [(r, m) for r, m in zip(records, metrics, strict=True) if m is not None]
    num_out = sum(m.num_output_tokens for _, m in ok)
    num_in = sum(
        r.num_prompt_tokens if r.num_prompt_tokens is not None else r.num_expected_prompt_tokens
        for r, _ in ok
    )
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return {
        "num_input_tokens": num_in,
        "num_output_tokens": num_out,
        "request_per_s": len(ok) * per_s,
        "input_tokens_per_s": num_in * per_s,
        "output_tokens_per_s": num_out * per_s,
        "total_tokens_per_s": (num_in + num_out) * per_s,
    }


def token_count_sources(records: list[RequestRecord]) -> dict[str, int]:
    return dict(Counter(r.output_tokens_source or "none" for r in records if r.is_success))


def fill_output_counts(records: list[RequestRecord], tokenizer: BenchTokenizer) -> None:
    """Count output tokens with the tokenizer where the server sent no usage."""
    source = "tokenizer" if tokenizer.is_exact else "approx"
    for rec in records:
        if rec.is_success and rec.num_output_tokens is None:
            rec.num_output_tokens = len(tokenizer.encode(rec.generated_text))
            rec.output_tokens_source = source
