"""The evaluation as tables: rich tables for the terminal, a Markdown table for BENCHMARKS.md."""

from __future__ import annotations

from typing import Any

SPEED_COLUMNS = (
    # header, key, format
    ("mode", "label", "{}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("speed-up", "speedup_vs_greedy", "{:.2f}×"),
    ("accept", "acceptance_rate", "{:.1%}"),
    ("α", "per_token_acceptance", "{:.3f}"),
    ("tok/pass", "tokens_per_target_pass", "{:.2f}"),
    ("steps/pass", "beam_steps_per_target_pass", "{:.2f}"),
    ("exact", "exact", "{}"),
)
QUALITY_COLUMNS = (
    ("mode", "label", "{}"),
    ("PPL", "perplexity", "{:.2f}"),
    ("BLEU", "bleu", "{:.2f}"),
    ("ROUGE-1", "rouge1", "{:.3f}"),
    ("ROUGE-2", "rouge2", "{:.3f}"),
    ("ROUGE-L", "rougeL", "{:.3f}"),
)
DIVERSITY_COLUMNS = (
    ("mode", "label", "{}"),
    ("dist-1", "distinct_1", "{:.3f}"),
    ("dist-2", "distinct_2", "{:.3f}"),
    ("beam dist-1", "beam_distinct_1", "{:.3f}"),
    ("beam dist-2", "beam_distinct_2", "{:.3f}"),
    ("self-BLEU", "self_bleu", "{:.1f}"),
)
SWEEP_COLUMNS = (
    ("γ", "gamma", "{}"), ("width", "tree_width", "{}"), ("budget", "tree_budget", "{}"),
    ("tok/s", "tokens_per_s", "{:.1f}"), ("speed-up", "speedup_vs_greedy", "{:.2f}×"),
    ("accept", "acceptance_rate", "{:.1%}"), ("α", "per_token_acceptance", "{:.3f}"),
    ("tok/pass", "tokens_per_target_pass", "{:.2f}"), ("exact", "exact", "{}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def _columns(rows, columns):
    return [c for c in columns if any(r.get(c[1]) is not None for r in rows)]


def short_label(row: dict[str, Any]) -> str:
    """A mode's name and settings in at most about 16 characters: ``spec γ=4``, ``tree 3×4/12``, ``beam B=4``."""
    mode = row.get("mode", row.get("label", ""))
    if mode == "speculative":
        return f"spec γ={row.get('gamma')}"
    if mode == "tree":
        return f"tree {row.get('tree_width')}×{row.get('gamma')}/{row.get('tree_budget')}"
    if mode in ("beam", "spec_beam"):
        return f"{mode} B={row.get('num_beams')}"
    return str(mode)


def rich_tables(results: dict[str, Any]):
    """The run's tables for a terminal, each readable at 80 columns (short mode labels, no vertical rules)."""
    from rich import box
    from rich.table import Table

    cfg, meta = results["meta"]["config"], results["meta"]
    threads = f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
    out = []
    for title, rows, columns in (
        (f"speed — {cfg['num_prompts']} held-out prompts × {cfg['max_new_tokens']} tokens, {cfg['dtype']}, {threads}",
         results["modes"], SPEED_COLUMNS),
        (f"quality against the references (their own PPL {meta['reference_perplexity']:.2f})",
         results["modes"], QUALITY_COLUMNS),
        ("diversity (beam columns: across the returned beams)", results["modes"], DIVERSITY_COLUMNS),
        ("γ sweep (speculative chains)", results["gamma_sweep"], SWEEP_COLUMNS),
        (f"tree-shape sweep (depth {cfg['gamma']})", results["tree_sweep"], SWEEP_COLUMNS),
    ):
        if not rows:
            continue
        cols = _columns(rows, columns)
        table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        for header, _, _ in cols:
            table.add_column(header, justify="left" if header == "mode" else "right", no_wrap=True)
        for r in rows:
            table.add_row(*[short_label(r) if key == "label" else _cell(r, key, fmt) for _, key, fmt in cols])
        out.append(table)
    return out


def markdown_table(rows: list[dict[str, Any]], columns=SPEED_COLUMNS) -> str:
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m specbeam_hf.app.evaluation.report runs/eval/eval.json``: the run's tables as Markdown."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("json", type=Path)
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text(encoding="utf-8"))
    print(f"`{results['meta']['command']}`\n")
    for title, rows, cols in (
        ("speed", results["modes"], SPEED_COLUMNS),
        ("quality", results["modes"], QUALITY_COLUMNS),
        ("diversity", results["modes"], DIVERSITY_COLUMNS),
        ("γ sweep", results["gamma_sweep"], SWEEP_COLUMNS),
        ("tree sweep", results["tree_sweep"], SWEEP_COLUMNS),
    ):
        if rows:
            print(f"**{title}**\n\n{markdown_table(rows, cols)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
