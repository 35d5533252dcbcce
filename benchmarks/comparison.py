"""One system's serving rows against a baseline's: the head-to-head checks, one table.

    python -m splitserve.benchmarks.serving_report compare RESULTS_DIR \
        [--system splitserve] [--baseline vllm] [--min-requests 1000]

Reads the rows of `summary.json` (benchmarks/serving_report.py) and, for every workload
both systems ran, checks:

- TTFT p50 at most the baseline's, at every rate both ran;
- TPOT p50 and p90 at most the baseline's, at every rate up to the baseline's capacity
  (its saturation: past it both fall behind their arrivals, and TPOT measures the queue);
- capacity (the highest rate whose TTFT p90 and TPOT p90 meet the SLO) at least
  `capacity_ratio` times the baseline's;
- a fresh start: on the system's lowest-rate row, measured first after it started at
  `lowest_rate` or below, TTFT p99 at most `fresh_ratio` times its p50;
- the measurement itself: at least `min_requests` requests a row, rates from
  `lowest_rate` or below to past the baseline's capacity, one commit for all of the
  system's rows (or commits whose served code is the same, when the caller says how to
  tell: `same_code`, e.g. benchmarks/served_code.py for a sweep over several leases
  between which only what a serving run does not read changed), and each rate's two rows
  at most `same_lease_s` apart (one lease).

A check whose rows are missing is reported as not met, with the reason; nothing is
inferred from rows that were not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Row = dict[str, Any]
# Whether the given commits hold the same served code (None: cannot tell).
SameCode = Callable[[list[str]], bool | None]


@dataclass(frozen=True)
class Targets:
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 50.0
    capacity_ratio: float = 1.1
    fresh_ratio: float = 3.0
    min_requests: int = 1000
    lowest_rate: float = 2.0
    same_lease_s: float = 3600.0


@dataclass(frozen=True)
class Check:
    workload: str
    target: str
    ours: str
    theirs: str
    met: bool


def _ms(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None else f"{value:,.{decimals}f} ms"


# TPOTs a check compares are shown to the microsecond: two runs of one system differ by
# hundredths of a millisecond, and a check met or missed by less must show by how much.
TPOT_DECIMALS = 3


def meets_slo(row: Row, ttft_ms: float, tpot_ms: float) -> bool:
    """Whether a row's TTFT p90 and TPOT p90 were measured and meet the SLO."""
    ttft, tpot = row.get("ttft_p90_ms"), row.get("tpot_p90_ms")
    return ttft is not None and tpot is not None and ttft <= ttft_ms and tpot <= tpot_ms


def capacity(rows: list[Row], ttft_ms: float, tpot_ms: float) -> float | None:
    """Highest rate of `rows` (one system and workload) whose p90s meet the SLO."""
    return max((r["rate"] for r in rows if meets_slo(r, ttft_ms, tpot_ms)), default=None)


def _capacity(rows: list[Row], targets: Targets) -> float | None:
    return capacity(rows, targets.slo_ttft_ms, targets.slo_tpot_ms)


def _at_most(ours: float | None, theirs: float | None) -> bool:
    return ours is not None and theirs is not None and ours <= theirs


def _latency_checks(
    workload: str, pairs: list[tuple[Row, Row]], base_cap: float | None
) -> list[Check]:
    """TTFT p50 at every common rate; TPOT p50 and p90 up to the baseline's capacity."""
    checks = []
    for ours, theirs in pairs:
        rate = f"{ours['rate']:g} req/s"
        ttft = ours.get("ttft_p50_ms"), theirs.get("ttft_p50_ms")
        checks.append(
            Check(workload, f"TTFT p50 <= baseline at {rate}", _ms(ttft[0]), _ms(ttft[1]),
                  _at_most(*ttft))
        )  # fmt: skip
        if base_cap is None or ours["rate"] > base_cap:
            continue
        for q in ("p50", "p90"):
            tpot = ours.get(f"tpot_{q}_ms"), theirs.get(f"tpot_{q}_ms")
            checks.append(
                Check(workload, f"TPOT {q} <= baseline at {rate}",
                      _ms(tpot[0], TPOT_DECIMALS), _ms(tpot[1], TPOT_DECIMALS), _at_most(*tpot))
            )  # fmt: skip
    return checks


def _capacity_check(
    workload: str, cap: float | None, base_cap: float | None, targets: Targets
) -> Check:
    text = lambda c: "none met the SLO" if c is None else f"{c:g} req/s"  # noqa: E731
    met = cap is not None and base_cap is not None and cap >= targets.capacity_ratio * base_cap
    target = (
        f"capacity (TTFT p90 <= {targets.slo_ttft_ms:g} ms, TPOT p90 <= "
        f"{targets.slo_tpot_ms:g} ms) >= {targets.capacity_ratio:g} x baseline's"
    )
    return Check(workload, target, text(cap), text(base_cap), met)


def _fresh_check(workload: str, rows: list[Row], targets: Targets) -> Check:
    """TTFT p99 / p50 on the system's lowest-rate row, if it was measured fresh at
    `lowest_rate` or below."""
    target = (
        f"fresh start at {targets.lowest_rate:g} req/s or below: TTFT p99 <= "
        f"{targets.fresh_ratio:g} x p50"
    )
    if not rows:
        return Check(workload, target, "no rows", "", False)
    low = min(rows, key=lambda r: r["rate"])
    p50, p99 = low.get("ttft_p50_ms"), low.get("ttft_p99_ms")
    if not low.get("is_first_after_start") or p50 is None or p99 is None:
        why = f"{low['rate']:g} req/s was not measured first after a start"
        return Check(workload, target, why, "", False)
    ratio = p99 / p50
    ours = f"{p99:,.1f} / {p50:,.1f} ms = {ratio:.1f} x at {low['rate']:g} req/s"
    met = ratio <= targets.fresh_ratio and low["rate"] <= targets.lowest_rate
    return Check(workload, target, ours, "", met)


def _date(row: Row) -> datetime | None:
    text = row.get("date")
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _one_code_check(workload: str, mine: list[Row], same_code: SameCode | None) -> Check:
    """One commit for every row, or commits `same_code` finds to hold the same served
    code."""
    commits = sorted({str(r.get("commit", "")) for r in mine})
    short = ", ".join(c[:12] for c in commits)
    if len(commits) == 1:
        return Check(workload, "one commit for every row", short, "", True)
    same = None if same_code is None else same_code(commits)
    verdict = {True: " (the same served code)", False: " (served code differs)", None: ""}
    ours = short + verdict[same]
    return Check(workload, "one commit for every row", ours, "", same is True)


def _one_device_check(workload: str, rows: list[Row]) -> Check:
    """Both systems' rows on one kind of device (a sweep in chunks, one lease each, may
    be lent a different card from one lease to the next)."""
    devices = sorted({str(r.get("device") or "unknown") for r in rows})
    return Check(workload, "one device for every row", ", ".join(devices), "",
                 devices != ["unknown"] and len(devices) == 1)  # fmt: skip


def _measurement_checks(
    workload: str, mine: list[Row], pairs: list[tuple[Row, Row]], base_cap: float | None,
    targets: Targets, same_code: SameCode | None = None,
) -> list[Check]:  # fmt: skip
    """Requests a row, the rates covered, one code, one device, each rate's pair in one
    lease."""
    rows = mine + [theirs for _, theirs in pairs]
    short = sorted({f"{r['rate']:g}" for r in rows if r["num_requests"] < targets.min_requests})
    rates = sorted(r["rate"] for r in mine)
    covered = bool(rates) and rates[0] <= targets.lowest_rate
    covered = covered and base_cap is not None and rates[-1] > base_cap
    apart = []
    for ours, theirs in pairs:
        a, b = _date(ours), _date(theirs)
        if a is None or b is None or abs((a - b).total_seconds()) > targets.same_lease_s:
            apart.append(f"{ours['rate']:g}")
    span = f"{rates[0]:g} to {rates[-1]:g} req/s" if rates else "no rates"
    return [
        Check(workload, f">= {targets.min_requests:,} requests a row",
              "short at " + ", ".join(short) if short else "all", "", not short),
        Check(workload, f"rates from {targets.lowest_rate:g} req/s to past the baseline's "
              "capacity", span, "", covered),
        _one_code_check(workload, mine, same_code),
        _one_device_check(workload, rows),
        Check(workload, "each rate's rows in one lease",
              "apart at " + ", ".join(apart) if apart else "all", "", not apart),
    ]  # fmt: skip


def compare(
    rows: list[Row], system: str, baseline: str, targets: Targets, same_code: SameCode | None = None
) -> list[Check]:
    """Every check, workload by workload (those both systems ran)."""
    checks = []
    for workload in sorted({r["workload"] for r in rows}):
        mine = [r for r in rows if r["workload"] == workload and r["system"] == system]
        base = [r for r in rows if r["workload"] == workload and r["system"] == baseline]
        if not mine or not base:
            continue
        by_rate = {r["rate"]: r for r in base}
        pairs = [(r, by_rate[r["rate"]]) for r in sorted(mine, key=lambda r: r["rate"])
                 if r["rate"] in by_rate]  # fmt: skip
        base_cap = _capacity(base, targets)
        checks += _latency_checks(workload, pairs, base_cap)
        checks.append(_capacity_check(workload, _capacity(mine, targets), base_cap, targets))
        checks.append(_fresh_check(workload, mine, targets))
        checks += _measurement_checks(workload, mine, pairs, base_cap, targets, same_code)
    return checks


def markdown(checks: list[Check], system: str, baseline: str) -> str:
    head = f"| workload | target | {system} | {baseline} | met |"
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append(
            f"| {c.workload} | {c.target} | {c.ours} | {c.theirs} | {'yes' if c.met else 'no'} |"
        )
    met = sum(c.met for c in checks)
    lines += ["", f"{met} of {len(checks)} checks met."]
    return "\n".join(lines) + "\n"
