"""Markdown table from a sweep's ``summary.json``.

    python -m loadtests.report runs/load-quick/summary.json
    python -m loadtests.report loadtests/results/quick/summary.json --update README.md   # README table
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


def render_block(summary: dict) -> str:
    """The table with the command and setting that produced it."""
    m = summary["meta"]
    setting = (f"{m['date']}, {m['machine']}; {m['run_time_s']} s per level, {m['api']}"
               f"{' streamed' if m['stream'] else ''}, max_tokens capped at {m['max_tokens_cap']}, "
               f"ignore_eos {m['ignore_eos']}, temperature {m['temperature']}, "
               f"{m['num_speculative_tokens']} speculative tokens, whole sweep {m['duration_s']} s"
               + (f", load average {m['loadavg_1min'][0]} → {m['loadavg_1min'][1]}" if m.get("loadavg_1min") else ""))
    return f"`{m['command']}` ({setting})\n\n{render_table(summary)}"


def replace_between_markers(text: str, name: str, block: str) -> str:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i == -1 or j == -1 or j < i:
        raise ValueError(f"markers {start} ... {end} not found")
    return text[: i + len(start)] + "\n" + block + "\n" + text[j:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", type=Path)
    ap.add_argument("--update", type=Path, default=None,
                    help="write the table into this markdown file between <!-- NAME:start/end --> markers")
    ap.add_argument("--marker", default="loadtest-quick")
    args = ap.parse_args(argv)
    block = render_block(json.loads(args.summary.read_text()))
    if args.update:
        args.update.write_text(replace_between_markers(args.update.read_text(), args.marker, block))
    print(block)


if __name__ == "__main__":
    main()
