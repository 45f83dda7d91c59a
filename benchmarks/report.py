"""Markdown tables from the benchmark JSON files (what BENCHMARKS.md quotes).

    python benchmarks/report.py benchmarks/results/bench_hf_bfloat16.json benchmarks/results/bench_trees_beams_*.json
    python benchmarks/report.py benchmarks/results/eval.json     # specbeam evaluate --out benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def hf_table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['dtype']}, {meta['max_new_tokens']} new tokens per prompt, "
        f"{len(meta['prompts'])} prompts, {meta['threads']} threads, torch {meta['torch']}; decode cost at batch 1: "
        f"target {meta['decode_ms']['target']:.2f} ms, draft {meta['decode_ms']['draft']:.2f} ms, c = {meta['c']:.3f}",
        "",
        "| method | batch | mode | γ | setting | tokens/s | speed-up | α | bound | of bound | output vs HF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        setting = f"{r.get('schedule', '')} {r.get('threshold', '')}".strip() if r["method"] != "hf" else ""
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['mode']} | {r['gamma'] or '–'} | {setting} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}× | {_fmt(r.get('alpha'), '.3f')} | {_fmt(r.get('bound'), '.2f', '×')} | "
            f"{_fmt(r.get('of_bound') and 100 * r['of_bound'], '.0f', ' %')} | {r.get('exact') or ''} |"
        )
    lines += ["", "Summary (best setting per mode and batch):", "", "```json", json.dumps(data["summary"], indent=1), "```"]
    return "\n".join(lines)


def trees_beams_table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['dtype']}, {meta['max_new_tokens']} new tokens, {meta['threads']} threads",
        "",
        "| kind | method | γ / B | tokens/s | speed-up | tokens per target pass / beam steps per target pass | same as HF | KV blocks held (bound) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        same = r.get("exact", r.get("same"))
        per_pass = r.get("tokens_per_pass", r.get("steps_per_pass"))
        kv = f"{r['kv_blocks']} ({r['kv_bound']})" if "kv_blocks" in r else ""
        diff = f", Δscore {r['max_score_diff']:.1e}" if r.get("max_score_diff") is not None else ""
        lines.append(
            f"| {r['kind']} | {r['method']} | {r.get('gamma', r.get('beams', ''))} | {r['tokens_per_s']:.1f} | "
            f"{_fmt(r.get('speedup'), '.2f', '×')} | {_fmt(per_pass, '.2f')} | "
            f"{'' if same is None else ('yes' if same else 'no')}{diff} | {kv} |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for path in paths:
        data = json.loads(Path(path).read_text())
        print(f"### {Path(path).name}\n")
        if "modes" in data:  # specbeam evaluate's output: its own tables
            from specbeam_hf.evaluation.report import main as eval_report

            eval_report([path])
            continue
        print(hf_table(data) if "summary" in data else trees_beams_table(data))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
