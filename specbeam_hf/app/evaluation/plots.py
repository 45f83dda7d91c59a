"""PNG plots of an evaluation (matplotlib, Agg): modes side by side, the γ sweep, the tree sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_modes(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = results["modes"]
    short = {"gamma": "γ", "num_beams": "B", "tree_width": "w", "tree_budget": "n"}
    labels = [r["mode"] + "\n" + ",".join(f"{short[k]}={r[k]}" for k in short if k in r) for r in rows]
    panels = [("tokens_per_s", "new tokens / s"), ("bleu", "BLEU vs reference"), ("rougeL", "ROUGE-L F1"),
              ("perplexity", "perplexity under the target")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    if key == "perplexity" and results["meta"].get("reference_perplexity"):
        axes[-1].axhline(results["meta"]["reference_perplexity"], color="gray", linestyle=":", label="reference text")
        axes[-1].legend(fontsize=7)
    cfg = results["meta"]["config"]
    fig.suptitle(
        f"decoding modes — demo pair, {cfg['dtype']}, "
        f"{cfg['num_prompts']} held-out prompts × {cfg['max_new_tokens']} tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gamma(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = sorted(results["gamma_sweep"], key=lambda r: r["gamma"])
    greedy = next(r for r in results["modes"] if r["mode"] == "greedy")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    g = [r["gamma"] for r in rows]
    ax1.plot(g, [r["tokens_per_s"] for r in rows], "o-", label="speculative (chains)")
    ax1.axhline(greedy["tokens_per_s"], color="gray", linestyle=":", label="greedy (target only)")
    ax1.set_xlabel("draft length γ")
    ax1.set_ylabel("new tokens / s")
    ax1.set_title("throughput against γ")
    ax1.legend(fontsize=8)
    ax2.plot(g, [r["acceptance_rate"] for r in rows], "o-", label="acceptance rate (accepted / drafted)")
    ax2.plot(g, [r["per_token_acceptance"] for r in rows], "s--", label="per-token acceptance α")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("draft length γ")
    ax2b = ax2.twinx()
    ax2b.plot(g, [r["tokens_per_target_pass"] for r in rows], "^:", color="C3", label="tokens per target pass")
    ax2b.set_ylabel("tokens per target pass", color="C3")
    ax2.set_title("acceptance against γ")
    ax2.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tree(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = results["tree_sweep"]
    greedy = next(r for r in results["modes"] if r["mode"] == "greedy")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for w in sorted({r["tree_width"] for r in rows}):
        sel = sorted((r for r in rows if r["tree_width"] == w), key=lambda r: r["tree_budget"])
        b = [r["tree_budget"] for r in sel]
        ax1.plot(b, [r["tokens_per_s"] for r in sel], "o-", label=f"width {w}")
        ax2.plot(b, [r["tokens_per_target_pass"] for r in sel], "o-", label=f"width {w}")
    ax1.axhline(greedy["tokens_per_s"], color="gray", linestyle=":", label="greedy (target only)")
    chain = [r for r in results["gamma_sweep"] if r["gamma"] == (rows[0]["gamma"] if rows else None)]
    if chain:
        ax1.axhline(
            chain[0]["tokens_per_s"], color="black", linestyle="--", linewidth=1, label=f"chain γ={chain[0]['gamma']}"
        )
        ax2.axhline(
            chain[0]["tokens_per_target_pass"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"chain γ={chain[0]['gamma']}",
        )
    depth = rows[0]["gamma"] if rows else "?"
    for ax, ylabel in ((ax1, "new tokens / s"), (ax2, "tokens per target pass")):
        ax.set_xlabel("tree node budget")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax1.set_title(f"token trees, depth {depth}: throughput")
    ax2.set_title("token trees: tokens per target pass")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(results: dict[str, Any], out: Path, stem: str) -> list[str]:
    paths = []
    for suffix, fn, needed in (
        ("modes", plot_modes, "modes"),
        ("gamma", plot_gamma, "gamma_sweep"),
        ("tree", plot_tree, "tree_sweep"),
    ):
        if not results.get(needed):
            continue
        path = Path(out) / f"{stem}_{suffix}.png"
        fn(results, path)
        paths.append(str(path))
    return paths
