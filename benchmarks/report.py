"""Markdown tables from the benchmark JSON files (what BENCHMARKS.md quotes).

    python benchmarks/report.py benchmarks/results/bench_hf_bfloat16.json benchmarks/results/bench_trees_beams_*.json
    python benchmarks/report.py benchmarks/results/eval.json     # specbeam evaluate --out benchmarks/results
    python benchmarks/report.py benchmarks/results/bench_processors*.json benchmarks/results/bench_stop_strings*.json
    python benchmarks/report.py benchmarks/results/bench_beam_sampling.json

Files of other scripts (vLLM, profiles, family checks) get a line saying so: those scripts print
their own tables.
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


def _markdown(caption: str, columns: list[str], cells: list[list]) -> str:
    """A caption line, then a markdown table of ``columns`` and one row per entry of ``cells``."""
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def processors_table(data: dict) -> str:
    meta = data["meta"]
    return _markdown(
        f"`bench_processors.py` — {meta.get('model', 'demo pair')}, {meta['dtype']}, {meta['max_new_tokens']} new tokens, "
        f"{meta['threads']} threads",
        ["batch", "processors", "method", "HF tokens/s", "tokens/s", "speed-up", "acceptance", "tokens per step", "same as HF"],
        [[r["batch"], r["setting"], r["method"], f"{r['hf_tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['speed_up']:.2f}×",
          f"{r['acceptance_rate']:.2f}", f"{r['tokens_per_step']:.2f}", _yes(r["same_as_hf"])] for r in data["rows"]],
    )


def beam_sampling_table(data: dict) -> str:
    meta = data["meta"]
    return _markdown(
        f"`bench_beam_sampling.py` — {meta['model']}, {meta['dtype']}, {meta['prompts']} prompts × {meta['max_new_tokens']} "
        f"new tokens, top-k {meta['top_k']}, {meta['threads']} threads",
        ["B", "temperature", "HF tokens/s", "specbeam tokens/s", "speed-up", "beam steps per target pass", "same as HF"],
        [[r["beams"], r["temperature"], f"{r['hf_tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['speed_up']:.2f}×",
          f"{r['steps_per_pass']:.2f}", _yes(r["same_as_hf"])] for r in data["rows"]],
    )


def stop_strings_table(data: dict) -> str:
    meta = data["meta"]
    return _markdown(
        f"`bench_stop_strings.py` — {meta['model']}, {meta['dtype']}, stop string {meta['stop']!r}, "
        f"{meta['max_new_tokens']} new tokens, γ = {meta['gamma']}, {meta['threads']} threads",
        ["batch", "method", "tokens/s", "criterion calls", "ms in the criterion", "share of the run", "same as HF"],
        [[r["batch"], r["method"], f"{r['tokens_per_s']:.1f}", r["criterion_calls"], f"{r['criterion_ms']:.1f}",
          f"{100 * r['share']:.1f} %", _yes(r["same_as_hf"])] for r in data["rows"]],
    )


def _table(data: dict) -> str | None:
    """The table for a JSON file of a script this module knows, or None."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if "summary" in data and rows is not None:
        return hf_table(data)
    if rows and all("kind" in r for r in rows) and "command" in data.get("meta", {}):
        return trees_beams_table(data)
    if rows and all("hf_tokens_per_s" in r and "setting" in r for r in rows):
        return processors_table(data)
    if rows and all("steps_per_pass" in r and "temperature" in r for r in rows):
        return beam_sampling_table(data)
    if rows and all("criterion_calls" in r for r in rows):
        return stop_strings_table(data)
    return None


def main(paths: list[str]) -> int:
    for path in paths:
        data = json.loads(Path(path).read_text())
        print(f"### {Path(path).name}\n")
        if isinstance(data, dict) and "modes" in data:  # specbeam evaluate's output: its own tables
            from specbeam_hf.app.evaluation.report import main as eval_report

            eval_report([path])
            continue
        table = _table(data)
        print(table if table is not None else "(no table here: the script that wrote this file prints its own, "
              "and BENCHMARKS.md quotes it)")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
