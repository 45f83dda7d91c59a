"""Markdown table from a sweep's ``summary.json``.

    python -m loadtests.report runs/load-quick/summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (
    "server", "load", "requests ok / failed / disconnected", "output tok/s", "TTFT p50 / p99 (ms)",
    "ITL p50 / p99 (ms)", "TPOT p50 (ms)", "e2e p50 (ms)", "acceptance rate", "mean acceptance length",
    "status",
)


def _num(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _status(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    reason = (row.get("reason") or "").replace("|", "/").replace("\n", " ")
    return f"{row['status']}: {reason[:160]}"


def render_row(row: dict) -> list[str]:
    load = row["level"] + (f" × {row['replicas']} replicas" if row.get("replicas", 1) > 1 else "")
    return [
        row["server"],
        load,
        f"{row['completed']} / {row['failed']} / {row['disconnected']}",
        _num(row.get("output_tokens_per_s")),
        f"{_num(row.get('ttft_p50_ms'))} / {_num(row.get('ttft_p99_ms'))}",
        f"{_num(row.get('itl_p50_ms'))} / {_num(row.get('itl_p99_ms'))}",
        _num(row.get("tpot_p50_ms")),
        _num(row.get("e2e_p50_ms"), 0),
        _num(row.get("acceptance_rate"), 3),
        _num(row.get("mean_acceptance_length"), 2),
        _status(row),
    ]


def render_table(summary: dict) -> str:
    """One markdown row per (server, load level) of ``summary["results"]``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in summary["results"]:
        lines.append("| " + " | ".join(render_row(row)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", type=Path)
    args = ap.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    print(f"`{summary['meta']['command']}` — {summary['meta']['date']}, {summary['meta']['machine']}\n")
    print(render_table(summary))


if __name__ == "__main__":
    main()
