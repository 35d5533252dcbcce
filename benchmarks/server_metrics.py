"""Scrape the target's Prometheus `/metrics` before and after a run, and diff them.

Counters and histogram/summary `_sum`/`_count` series are reported as deltas over the run,
gauges as their value after the run, and each histogram's mean over the run as
delta(_sum) / delta(_count) (e.g. the server's own TTFT next to the client's). Histogram
buckets and `_created` series are left out. A target without `/metrics` gives None.
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")

Sample = tuple[str, float]  # (metric type, value)


def parse_prometheus(text: str) -> dict[str, Sample]:
    """``name{labels}`` -> (type, value) for every sample of a Prometheus text exposition."""
    types: dict[str, str] = {}
    samples: dict[str, Sample] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
            continue
        match = _SAMPLE.match(line)
        if line.startswith("#") or not match:
            continue
        name, labels, raw = match.group(1), match.group(2) or "", match.group(3)
        if name.endswith(("_bucket", "_created")):
            continue
        base = next(
            (name[: -len(s)] for s in _SUFFIXES if name.endswith(s) and name[: -len(s)] in types),
            name,
        )
        try:
            value = float(raw)
        except ValueError:
            continue
        samples[name + labels] = (types.get(base, "untyped"), value)
    return samples


def scrape(base_url: str, timeout_s: float = 5.0) -> dict[str, Sample] | None:
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as resp:
            if resp.status != 200:
                return None
            return parse_prometheus(resp.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.info("no server metrics at %s/metrics (%s)", base_url, exc)
        return None


def diff(
    before: dict[str, Sample] | None,
    after: dict[str, Sample] | None,
    interval_s: float | None = None,
) -> dict[str, object]:
    """The `server_metrics` section of a summary; `interval_s`, the time between the two
    scrapes, goes in as is (what the deltas accrued over: the warm-up and the run)."""
    if before is None or after is None:
        return {"available": False}
    deltas: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for key, (kind, value) in after.items():
        if kind == "gauge":
            gauges[key] = value
        elif kind in ("counter", "histogram", "summary"):
            deltas[key] = value - before.get(key, (kind, 0.0))[1]
    means = {}
    for key, value in deltas.items():
        name, _, labels = key.partition("{")
        if name.endswith("_sum"):
            count = deltas.get(f"{name[:-4]}_count" + ("{" + labels if labels else ""))
            if count:
                means[name[:-4] + ("{" + labels if labels else "")] = value / count
    out: dict[str, object] = {
        "available": True,
        "deltas": deltas,
        "gauges_after": gauges,
        "histogram_means": means,
    }
    if interval_s is not None:
        out["interval_s"] = interval_s
    return out
