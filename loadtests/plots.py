"""PNG plots of a sweep: throughput vs load, TTFT and ITL p50/p99 vs load (one line per server)."""

from __future__ import annotations

from pathlib import Path


def _series(summary: dict, key: str) -> dict[str, tuple[list[float], list[float]]]:
    """server -> (x, y) over its ok levels; x = users (closed loop) or req/s (Poisson)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in summary["results"]:
        if row["status"] != "ok" or row.get(key) is None:
            continue
        x = row["rate"] if row.get("rate") is not None else row["users"]
        xs, ys = out.setdefault(row["server"], ([], []))
        xs.append(x)
        ys.append(row[key])
    return out


def _xlabel(summary: dict) -> str:
    rates = any(r.get("rate") is not None for r in summary["results"])
    return "request rate (req/s, Poisson)" if rates else "concurrency (users)"


def _xticks(ax, summary: dict) -> None:
    xs = sorted({r["rate"] if r.get("rate") is not None else r["users"] for r in summary["results"]})
    if 0 < len(xs) <= 12:
        ax.set_xticks(xs)


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)
    else:
        ax.text(0.5, 0.5, "no successful load level", ha="center", va="center", transform=ax.transAxes)


def plot_all(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for server, (xs, ys) in _series(summary, "output_tokens_per_s").items():
        ax.plot(xs, ys, marker="o", label=server)
    ax.set_xlabel(_xlabel(summary))
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput")
    _xticks(ax, summary)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "ttft", "Time to first token"), (axes[1], "itl", "Inter-token latency")):
        for i, (server, (xs, ys)) in enumerate(_series(summary, f"{metric}_p50_ms").items()):
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{server} p50")
            xs99, ys99 = _series(summary, f"{metric}_p99_ms").get(server, ([], []))
            ax.plot(xs99, ys99, marker="x", linestyle="--", color=f"C{i}", label=f"{server} p99")
        ax.set_xlabel(_xlabel(summary))
        ax.set_ylabel("ms")
        ax.set_title(title)
        _xticks(ax, summary)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
