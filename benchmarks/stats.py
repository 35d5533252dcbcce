"""Percentiles with bootstrap confidence intervals, and a warning when the tail is thin.

Point estimates use linear interpolation between order statistics (numpy's default, the
same as vLLM and SGLang). The 95 % interval is a percentile bootstrap: the estimator is
recomputed on `num_boot` resamples of the data and the 2.5th and 97.5th of those values
are the bounds. Because the data are sorted, a resample's k-th smallest value is
``x[floor(n * V_k)]`` where ``V_k ~ Beta(k, n - k + 1)`` is the k-th order statistic of n
uniforms, and its (k+1)-th is ``V_k + (1 - V_k) * Beta(1, n - k)``; drawing those two ranks
directly is the same distribution as resampling n values, at O(num_boot) cost instead of
O(num_boot * n), so pooled ITL lists of millions of gaps stay cheap.

SLO attainment (a fraction k/n of requests) gets the Wilson score interval, which stays
inside [0, 1] and is sound at 0 and n. Capacity intervals are in `sweep.py`; with
`--repeats`, the t-interval of repeated values (`t_interval`).

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


Z95 = 1.959963984540054
# Two-sided 95 % Student t quantiles by degrees of freedom (1..30); beyond, the normal's.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def wilson_interval(num_good: int, num: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion num_good / num ((0, 1) when num is 0)."""
    if num <= 0:
        return 0.0, 1.0
    p = num_good / num
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * num)) / (1 + z2 / num)
    half = Z95 * math.sqrt(p * (1 - p) / num + z2 / (4 * num * num)) / (1 + z2 / num)
    low = 0.0 if num_good <= 0 else max(0.0, centre - half)
    high = 1.0 if num_good >= num else min(1.0, centre + half)
    return low, high


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95 % t-interval of the mean of repeated measurements (None for fewer than two)."""
    if len(values) < 2:
        return None
    x = np.asarray(values, dtype=np.float64)
    t = _T95[len(x) - 2] if len(x) - 1 <= len(_T95) else Z95
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()) - half, float(x.mean()) + half


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


def bootstrap_percentiles(
    sorted_x: np.ndarray, q: float, rng: np.random.Generator, num_boot: int = DEFAULT_NUM_BOOT
) -> np.ndarray:
    """The q-th percentile of `num_boot` resamples of a sorted sample (order-statistic draw)."""
    if len(sorted_x) == 1:
        return np.full(num_boot, float(sorted_x[0]))
    return _bootstrap_values(np.asarray(sorted_x, dtype=np.float64), q, rng, num_boot)


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
