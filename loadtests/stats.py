"""Per-request samples -> per-level summary (throughput, latency percentiles, failures).

A sample is one JSON object per request, written by the Locust client (``locustfile.py``):
``{"start": unix s, "end": unix s, "ok": bool, "disconnected": bool, "error": str | None,
"ttft": s | None, "e2e": s, "output_tokens": int, "itl": [s, ...], "tpot": s | None}``.
``itl`` holds the gaps between streamed chunks (one chunk can carry several tokens when drafts
are accepted); ``tpot`` is (e2e - ttft) / (output_tokens - 1), the time per output token.
Clients that disconnect on purpose (``--disconnect-fraction``) are counted apart, not as failures,
and their partial outputs are left out of throughput.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def read_samples(path: str | Path) -> list[dict]:
    """Samples from a JSONL file; a missing file (client never ran) gives an empty list."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed client
    return out


def _pcts(values: Iterable[float], prefix: str, scale: float = 1000.0) -> dict:
    vals = [v for v in values if v is not None]
    return {
        f"{prefix}_p{q}_ms": (None if (p := percentile(vals, q)) is None else p * scale)
        for q in PERCENTILES
    }


def summarize(samples: list[dict], window_s: float | None = None) -> dict:
    """Throughput and latency percentiles of one load level.

    ``window_s`` is the measurement window for throughput; by default the span from the first
    request's start to the last one's end.
    """
    done = [s for s in samples if s.get("ok") and not s.get("disconnected")]
    disconnected = [s for s in samples if s.get("disconnected")]
    failed = [s for s in samples if not s.get("ok") and not s.get("disconnected")]
    if window_s is None:
        if samples:
            window_s = max(s["end"] for s in samples) - min(s["start"] for s in samples)
        else:
            window_s = 0.0
    out_tokens = sum(int(s.get("output_tokens") or 0) for s in done)
    itls = [g for s in done for g in (s.get("itl") or [])]
    per_req_tps = [
        s["output_tokens"] / s["e2e"] for s in done if s.get("e2e") and s.get("output_tokens")
    ]
    summary = {
        "requests": len(samples),
        "completed": len(done),
        "failed": len(failed),
        "disconnected": len(disconnected),
        "window_s": window_s,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / window_s if window_s > 0 else None,
        "requests_per_s": len(done) / window_s if window_s > 0 else None,
        "mean_request_tokens_per_s": (sum(per_req_tps) / len(per_req_tps)) if per_req_tps else None,
        "completed_per_replica": {r: sum(1 for s in done if s.get("replica") == r)
                                  for r in sorted({str(s.get("replica")) for s in samples if s.get("replica")})},
        "errors": sorted({str(s.get("error"))[:200] for s in failed})[:5],
    }
    summary.update(_pcts((s.get("ttft") for s in done), "ttft"))
    summary.update(_pcts(itls, "itl"))
    summary.update(_pcts((s.get("tpot") for s in done), "tpot"))
    summary.update(_pcts((s.get("e2e") for s in done), "e2e"))
    return summary
