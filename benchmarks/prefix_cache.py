"""How much of a run's prompt the server served from its prefix cache, against what the
workload implies.

Achieved: Σ cached prompt tokens / Σ prompt tokens over successful requests, from each
response's ``usage.prompt_tokens_details.cached_tokens`` (splitserve, vLLM with
``--enable-prompt-tokens-details``, SGLang, OpenAI); without those, from the difference of
the server's own counters scraped before and after the run (`SERVER_COUNTERS`: cached and
prompt token counters of splitserve, vLLM, SGLang). Implied: Σ prompt tokens that the
workload shares by design with an earlier request of the run (a shared system prompt, a
trace's repeated hash ids, a conversation's history) / Σ prompt tokens. A cache can serve
only whole blocks of that, so the achieved fraction should not exceed the implied one; when
it does by more than `MARGIN`, the run measured the cache rather than prefill, and the
summary says so loudly (prompts resent from an earlier run, `--reuse-prompts`, warm-ups that
sent measured prompts).
"""

from __future__ import annotations

from typing import Any

from splitserve.benchmarks.client import RequestRecord

MARGIN = 0.05  # achieved may exceed implied by this much (template tokens, chance matches)

# (cached tokens counter, prompt tokens counter) of servers that export them.
SERVER_COUNTERS = (
    ("splitserve_router_cached_prompt_tokens_total", "splitserve_router_prompt_tokens_total"),
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ("sglang:cached_tokens_total", "sglang:prompt_tokens_total"),
)


def _counter_delta(deltas: dict[str, float], name: str) -> float | None:
    """Sum of a counter's deltas over every label set; None when the server has none."""
    values = [v for k, v in deltas.items() if k == name or k.startswith(name + "{")]
    return float(sum(values)) if values else None


def _from_server_metrics(server_metrics: dict[str, Any]) -> tuple[float, float] | None:
    deltas = server_metrics.get("deltas") or {}
    for cached_name, prompt_name in SERVER_COUNTERS:
        cached, prompt = _counter_delta(deltas, cached_name), _counter_delta(deltas, prompt_name)
        if cached is not None and prompt:
            return cached, prompt
    return None


def _implied_fraction(ok: list[RequestRecord]) -> float:
    prompt = sum(r.num_prompt_tokens or r.num_expected_prompt_tokens for r in ok)
    shared = sum(r.num_shared_prefix_tokens for r in ok)
    return min(1.0, shared / prompt) if prompt else 0.0


def prefix_cache_summary(
    records: list[RequestRecord], server_metrics: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The `prefix_cache` section of a summary, and its warning."""
    ok = [r for r in records if r.is_success]
    implied = _implied_fraction(ok)
    out: dict[str, Any] = {
        "source": None,
        "cached_tokens": None,
        "prompt_tokens": None,
        "cached_fraction": None,
        "workload_fraction": implied,
        "is_above_workload": None,
    }
    with_usage = [r for r in ok if r.num_cached_tokens is not None and r.num_prompt_tokens]
    if ok and len(with_usage) == len(ok):
        cached = float(sum(r.num_cached_tokens or 0 for r in ok))
        prompt = float(sum(r.num_prompt_tokens or 0 for r in ok))
        out["source"] = "usage"
    else:
        counts = _from_server_metrics(server_metrics)
        if counts is None:
            return out, []
        (cached, prompt), out["source"] = counts, "server_metrics"
    fraction = cached / prompt if prompt else 0.0
    is_above = fraction > implied + MARGIN
    out.update(
        cached_tokens=cached,
        prompt_tokens=prompt,
        cached_fraction=fraction,
        is_above_workload=is_above,
    )
    if not is_above:
        return out, []
    warning = (
        f"{fraction:.0%} of prompt tokens were served from the server's prefix cache, but the "
        f"workload shares only {implied:.0%}: prefill was barely measured. Were these prompts "
        "sent before (--reuse-prompts, an earlier run with the same --seed)? Use a fresh "
        "--seed or restart the server"
    )
    return out, [warning]
