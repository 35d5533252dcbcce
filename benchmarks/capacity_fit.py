"""How far each system's capacity can move: a fit of TPOT against the arrival rate.

    python -m splitserve.benchmarks.serving_report fit RESULTS_DIR [--slo-tpot-ms 50]

Below saturation a server that batches continuously runs steps of a fixed cost `a` (the
weights read once, launches, the host's share) plus work that grows with the batch. At
arrival rate r, every second brings r requests of GPU work `k` each (a prompt's prefill and
its output tokens' share of the decode steps), so a step of mean length T carries r·k·T of
it and T = a + r·k·T, that is

    T(r) = a / (1 - k·r),   or   1 / T = 1 / a - (k / a) · r,

a line in 1/T. The fit takes each system's TPOT p50 at the rates that met the SLO (below
saturation, where the model holds) and solves that line by least squares. From it:
`saturation_rate` = 1 / k, where steps grow without bound; `slo_rate` = (1 - a / SLO) / k,
where the mean TPOT reaches the SLO. Two systems whose `k` are equal reach the same rates
whatever their queues and streams do: only a cheaper step (a lower `a`) or a cheaper
request (a lower `k`) moves capacity, and by how much the fit says.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.benchmarks.comparison import Row, meets_slo


@dataclass(frozen=True)
class Fit:
    system: str
    workload: str
    rates: tuple[float, ...]
    step_ms: float  # a: the step's fixed cost
    request_ms: float  # k: GPU time per request
    slo_tpot_ms: float

    @property
    def saturation_rate(self) -> float:
        return 1000.0 / self.request_ms

    @property
    def slo_rate(self) -> float:
        return (1.0 - self.step_ms / self.slo_tpot_ms) * self.saturation_rate


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    return mean_y - slope * mean_x, slope


def fit(rows: list[Row], slo_ttft_ms: float, slo_tpot_ms: float) -> Fit:
    """Fit one system's rows of one workload; only rows that met the SLO count."""
    kept = sorted(
        (r for r in rows if r.get("tpot_p50_ms") and meets_slo(r, slo_ttft_ms, slo_tpot_ms)),
        key=lambda r: r["rate"],
    )
    rates = tuple(float(r["rate"]) for r in kept)
    first = rows[0] if rows else {}
    where = f"{first.get('system', '?')} on {first.get('workload', '?')}"
    if len(set(rates)) < 2:
        raise ValueError(f"{where}: fitting needs rows at two rates or more that met the SLO")
    intercept, slope = _line([(float(r["rate"]), 1.0 / r["tpot_p50_ms"]) for r in kept])
    if intercept <= 0 or slope >= 0:
        raise ValueError(f"{where}: TPOT does not grow with the rate; no fit")
    return Fit(
        system=first["system"], workload=first["workload"], rates=rates,
        step_ms=1.0 / intercept, request_ms=-slope / intercept * 1000.0,
        slo_tpot_ms=slo_tpot_ms,
    )  # fmt: skip


def fits(rows: list[Row], slo_ttft_ms: float, slo_tpot_ms: float) -> list[Fit | str]:
    """One fit per (system, workload) of `rows`, or the reason there is none."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["workload"]), []).append(row)
    out: list[Fit | str] = []
    for key in sorted(groups):
        try:
            out.append(fit(groups[key], slo_ttft_ms, slo_tpot_ms))
        except ValueError as exc:
            out.append(str(exc))
    return out


def markdown(results: list[Fit | str]) -> str:
    lines = [
        "| system | workload | rates fitted | step a ms | request k ms | saturation req/s"
        " | mean TPOT at SLO, req/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for item in results:
        if isinstance(item, str):
            notes.append(f"- {item}")
            continue
        rates = ", ".join(f"{r:g}" for r in item.rates)
        lines.append(
            f"| {item.system} | {item.workload} | {rates} | {item.step_ms:.2f} "
            f"| {item.request_ms:.1f} | {item.saturation_rate:.1f} | {item.slo_rate:.1f} |"
        )
    return "\n".join(lines + notes) + "\n"
