"""PNG plots (matplotlib, Agg backend, imported lazily).

* latency_cdf.png: empirical CDFs of TTFT, TPOT, ITL (pooled gaps) and E2E latency.
* over_time.png: TTFT and TPOT of each request against its send time (failures marked).
* slo_scale.png: SLO attainment as every per-request limit is scaled (tighter to the right).
* attainment_vs_load.png (sweeps and searches): attainment with its 95 % intervals, per
  objective too, against offered load, with the target line and the interpolated capacity
  in its 95 % band.
* compare.png: several results side by side (attainment curves for sweeps, else bars of
  p50/p90/p99 per metric with 95 % intervals).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _samples(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    ok = [r for r in rows if r.get("error") is None and r.get("ttft_ms") is not None]
    itl = [1000 * g for r in ok if r.get("is_streamed", True) for g in np.diff(r["chunk_times_s"])]
    return {
        "ttft_ms": np.array([r["ttft_ms"] for r in ok]),
        "tpot_ms": np.array([r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]),
        "itl_ms": np.array(itl),
        "e2e_ms": np.array([r["e2e_ms"] for r in ok]),
    }


def plot_latency_cdfs(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    data = _samples(rows)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, name) in zip(axes, _METRICS, strict=True):
        x = np.sort(data[key])
        if len(x):
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction")
        ax.set_title(f"{name} CDF (n={len(x)})")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_over_time(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ok = [r for r in rows if r.get("ttft_ms") is not None]
    failed = [r for r in rows if r.get("ttft_ms") is None and r.get("status") is not None]
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        pts = [(r["send_s"], r[key]) for r in ok if r[key] is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, label=name)
        if failed:
            ax.scatter(
                [r["send_s"] for r in failed],
                [0] * len(failed),
                marker="x",
                c="red",
                label="failed",
            )
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    axes[1].set_xlabel("send time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_slo_scale(summary: dict[str, Any], path: Path) -> Path | None:
    curve = (summary.get("slo") or {}).get("scale_curve") or []
    if not curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["scale"] for c in curve], [100 * c["attainment"] for c in curve], "o-")
    ax.axhline(100 * summary["slo"]["target_attainment"], ls="--", c="gray")
    ax.invert_xaxis()
    ax.set_xlabel("SLO scale (limits x scale; tighter ->)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(", ".join(summary["slo"]["spec"]))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _attainment_curves(ax: Any, sweep: dict[str, Any], label: str, with_objectives: bool) -> None:
    """Attainment against load with its 95 % intervals; capacity as a line in its band."""
    points = sorted(sweep["points"], key=lambda p: p["load"])
    xs = [p["load"] for p in points]
    ys = [100 * p["attainment"] for p in points]
    cis = [p.get("attainment_ci95") or [p["attainment"]] * 2 for p in points]
    errs = [
        [max(0.0, y - 100 * ci[0]) for y, ci in zip(ys, cis, strict=True)],
        [max(0.0, 100 * ci[1] - y) for y, ci in zip(ys, cis, strict=True)],
    ]
    line = ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3, label=label or "all SLOs")
    if with_objectives:
        for name in points[0].get("per_objective_attainment", {}):
            obj = [100 * p["per_objective_attainment"][name] for p in points]
            ax.plot(xs, obj, ":", label=name)
    capacity = sweep.get("capacity") or {}
    if capacity.get("interpolated_rate") is not None:
        color = line[0].get_color()
        ax.axvline(capacity["interpolated_rate"], ls="-.", c=color, alpha=0.6)
        if capacity.get("ci95"):
            ax.axvspan(*capacity["ci95"], color=color, alpha=0.12)


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _attainment_curves(ax, sweep, "", with_objectives=True)
    ax.axhline(100 * sweep["target_attainment"], ls="--", c="gray", label="target")
    ax.set_xlabel(sweep["load_axis"])
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(", ".join(sweep.get("slo_spec", [])))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_compare(results: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    labels = [str(r.get("label") or r.get("_path")) for r in results]
    if all("points" in r for r in results):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r, label in zip(results, labels, strict=True):
            _attainment_curves(ax, r, label, with_objectives=False)
        ax.set_xlabel(results[0]["load_axis"])
        ax.set_ylabel("SLO attainment (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        qs = ("p50", "p90", "p99")
        width = 0.8 / len(results)
        for ax, (key, name) in zip(axes, _METRICS, strict=True):
            for i, (r, label) in enumerate(zip(results, labels, strict=True)):
                stats = [r.get("metrics", {}).get(key, {}).get(q) for q in qs]
                vals = [s["value"] if s else 0.0 for s in stats]
                errs = [
                    [v - s["ci95"][0] if s else 0 for v, s in zip(vals, stats, strict=True)],
                    [s["ci95"][1] - v if s else 0 for v, s in zip(vals, stats, strict=True)],
                ]
                ax.bar(
                    np.arange(len(qs)) + i * width, vals, width, yerr=errs, label=label, capsize=3
                )
            ax.set_xticks(np.arange(len(qs)) + width * (len(results) - 1) / 2, qs)
            ax.set_title(f"{name} (ms)")
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(directory: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """All single-run plots into `directory`; returns the files written."""
    title = summary.get("label") or ""
    paths = [
        plot_latency_cdfs(rows, directory / "latency_cdf.png", title),
        plot_over_time(rows, directory / "over_time.png", title),
    ]
    scale = plot_slo_scale(summary, directory / "slo_scale.png")
    return paths + ([scale] if scale else [])
