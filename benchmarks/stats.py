"""Percentiles with bootstrap confidence intervals, and a warning when the tail is thin.

Point estimates use linear interpolation between order statistics (numpy's default, the
same as vLLM and SGLang). The 95 % interval is a percentile bootstrap: the estimator is
recomputed on `num_boot` resamples of the data and the 2.5th and 97.5th of those values
are the bounds. Because the data are sorted, a resample's k-th smallest value is
``x[floor(n * V_k)]`` where ``V_k ~ Beta(k, n - k + 1)`` is the k-th order statistic of n
uniforms, and its (k+1)-th is ``V_k + (1 - V_k) * Beta(1, n - k)``; drawing those two ranks
directly is the same distribution as resampling n values, at O(num_boot) cost instead of
O(num_boot * n), so pooled ITL lists of millions of gaps stay cheap.

A tail percentile q is flagged as weak when fewer than `MIN_TAIL_SAMPLES` samples lie above
it, i.e. when n * (1 - q/100) < 10 (p99 needs 1,000 samples, p90 needs 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_TAIL_SAMPLES = 10  # samples that must lie above a percentile for it to be trusted
DEFAULT_NUM_BOOT = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PercentileEstimate:
    q: float  # percentile in [0, 100]
    value: float
    ci_low: float
    ci_high: float
    num_samples: int
    is_supported: bool  # at least MIN_TAIL_SAMPLES samples above the percentile

    def to_dict(self, scale: float = 1.0) -> dict[str, object]:
        return {
            "value": self.value * scale,
            "ci95": [self.ci_low * scale, self.ci_high * scale],
            "is_supported": self.is_supported,
        }


def is_tail_supported(num_samples: int, q: float) -> bool:
    """True when at least MIN_TAIL_SAMPLES samples are expected above the q-th percentile."""
    return num_samples * (1.0 - q / 100.0) >= MIN_TAIL_SAMPLES


def _bootstrap_values(
    sorted_x: np.ndarray, q: float, rng: np.random.Generator, num_boot: int
) -> np.ndarray:
    n = len(sorted_x)
    h = (n - 1) * q / 100.0
    lo = math.floor(h)
    frac = h - lo
    k = lo + 1  # 1-based rank of the lower order statistic
    v_k = rng.beta(k, n - k + 1, size=num_boot)
    idx_k = np.minimum((v_k * n).astype(np.int64), n - 1)
    values = sorted_x[idx_k]
    if frac > 0.0 and k < n:
        v_next = v_k + (1.0 - v_k) * rng.beta(1, n - k, size=num_boot)
        idx_next = np.minimum((v_next * n).astype(np.int64), n - 1)
        values = values + frac * (sorted_x[idx_next] - values)
    return values


def estimate_percentile(
    values: np.ndarray | list[float],
    q: float,
    rng: np.random.Generator,
    num_boot: int = DEFAULT_NUM_BOOT,
) -> PercentileEstimate | None:
    """The q-th percentile with a 95 % bootstrap interval; None for an empty sample."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside [0, 100]; pass e.g. 50,90,99")
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    if n == 0:
        return None
    value = float(np.percentile(x, q))
    if n == 1:
        return PercentileEstimate(q, value, value, value, 1, is_tail_supported(1, q))
    boot = _bootstrap_values(x, q, rng, num_boot)
    alpha = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return PercentileEstimate(q, value, float(low), float(high), n, is_tail_supported(n, q))


def describe(
    values: np.ndarray | list[float],
    percentiles: tuple[float, ...],
    rng: np.random.Generator,
    scale: float = 1.0,
) -> dict[str, object]:
    """Count, mean, std, min, max and percentiles (with CIs) of a sample, times `scale`."""
    x = np.asarray(values, dtype=np.float64)
    out: dict[str, object] = {"n": len(x)}
    if len(x) == 0:
        return out
    out.update(
        mean=float(x.mean()) * scale,
        std=float(x.std()) * scale,
        min=float(x.min()) * scale,
        max=float(x.max()) * scale,
    )
    for q in percentiles:
        est = estimate_percentile(x, q, rng)
        if est is not None:
            out[f"p{q:g}"] = est.to_dict(scale)
    return out
