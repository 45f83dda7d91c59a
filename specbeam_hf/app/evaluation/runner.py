"""One evaluation run: load the pair, run every mode and both sweeps, score, write JSON + plots."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .config import EvalConfig
from .modes import BASELINE, ModeRun, ModeSpec, run_mode
from .task import load_passages, reference_text


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="run", disable=not enabled, file=sys.stderr, leave=False)


def score_mode(run: ModeRun, target, tokenizer, prompts: list[list[int]], references: list[str]) -> dict[str, Any]:
    """Quality and diversity of one mode's outputs (its best sequence per prompt; all beams for diversity)."""
    nll, count = 0.0, 0
    for prompt, beams in zip(prompts, run.outputs):
        n, c = metrics.continuation_nll(target, prompt, beams[0])
        nll, count = nll + n, count + c
    texts = [tokenizer.decode(beams[0], skip_special_tokens=True) for beams in run.outputs]
    row: dict[str, Any] = {
        "perplexity": metrics.perplexity(nll, count),
        "bleu": metrics.corpus_bleu(texts, references),
        **metrics.rouge(texts, references),
        "distinct_1": sum(metrics.distinct_n([b[0]], 1) for b in run.outputs) / len(run.outputs),
        "distinct_2": sum(metrics.distinct_n([b[0]], 2) for b in run.outputs) / len(run.outputs),
    }
    if run.spec.beams:
        row["beam_distinct_1"] = sum(metrics.distinct_n(b, 1) for b in run.outputs) / len(run.outputs)
        row["beam_distinct_2"] = sum(metrics.distinct_n(b, 2) for b in run.outputs) / len(run.outputs)
        self_bleus = [
            metrics.self_bleu([tokenizer.decode(s, skip_special_tokens=True) for s in b]) for b in run.outputs
        ]
        row["self_bleu"] = sum(self_bleus) / len(self_bleus)
    return row


def _speed_row(run: ModeRun, greedy: ModeRun | None, baseline: ModeRun | None) -> dict[str, Any]:
    row = {
        "mode": run.spec.mode,
        "label": run.spec.label(),
        **run.spec.settings(),
        "seconds": run.seconds,
        "new_tokens": run.new_tokens,
        "tokens_per_s": run.tokens_per_s,
        "speedup_vs_greedy": greedy.seconds / run.seconds if greedy is not None and run.seconds > 0 else None,
        **run.stats,
    }
    if baseline is not None:  # exactness: the same tokens (all beams, in order) as the target's own search
        row["exact_vs"] = baseline.spec.mode
        row["exact"] = run.outputs == baseline.outputs
    return row


def evaluate(config: EvalConfig, progress: bool = True, log=print) -> dict[str, Any]:
    """Run the evaluation described by ``config``; returns the results (also written as JSON + PNGs)."""
    from ..models import load_model, load_tokenizer
    from . import plots

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    tracker = None
    if config.track:
        from .tracking import start_tracking  # raises a clear error when wandb is not installed

        tracker = start_tracking(config)

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.target)
    target = load_model(config.target, "target", config.dtype)
    draft = load_model(config.draft, "draft", config.dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    passages = load_passages(config.num_prompts)
    prompts = [tokenizer(p.prompt)["input_ids"] for p in passages]
    references = [reference_text(tokenizer, p, config.max_new_tokens) for p in passages]
    ref_nll = ref_count = 0
    for prompt, p in zip(prompts, passages):
        ref_ids = tokenizer(p.reference, add_special_tokens=False)["input_ids"][: config.max_new_tokens]
        n, c = metrics.continuation_nll(target, prompt, ref_ids)
        ref_nll, ref_count = ref_nll + n, ref_count + c

    specs = [
        ModeSpec(
            m,
            gamma=config.gamma,
            num_beams=config.num_beams,
            tree_width=config.tree_width,
            tree_budget=config.tree_budget,
        )
        for m in config.modes
    ]
    # "greedy" first (the baseline of every speed-up), the beam baseline before spec_beam
    specs.sort(key=lambda s: ("greedy", "beam", "speculative", "tree", "spec_beam").index(s.mode))
    sweep_gamma = [ModeSpec("speculative", gamma=g) for g in config.gammas]
    sweep_tree = [
        ModeSpec("tree", gamma=config.gamma, tree_width=w, tree_budget=b)
        for w in config.tree_widths
        for b in config.tree_budgets
    ]
    bar = _progress(len(specs) + len(sweep_gamma) + len(sweep_tree), progress)

    runs: dict[str, ModeRun] = {}
    rows: list[dict[str, Any]] = []
    for spec in specs:
        bar.set_postfix_str(spec.label())
        run = run_mode(spec, target, draft, prompts, pad_id, config.max_new_tokens, config.repeats)
        runs[spec.mode] = run
        row = _speed_row(run, runs.get("greedy"), runs.get(BASELINE.get(spec.mode, "")))
        row.update(score_mode(run, target, tokenizer, prompts, references))
        rows.append(row)
        bar.update()

    def sweep(specs_: list[ModeSpec]) -> list[dict[str, Any]]:
        out = []
        for spec in specs_:
            bar.set_postfix_str(spec.label())
            out.append(
                _speed_row(
                    run_mode(spec, target, draft, prompts, pad_id, config.max_new_tokens, config.repeats),
                    runs["greedy"],
                    runs["greedy"],
                )
            )
            bar.update()
        return out

    gamma_rows = sweep(sweep_gamma)
    tree_rows = sweep(sweep_tree)
    bar.close()

    import transformers

    results: dict[str, Any] = {
        "meta": {
            "command": "specbeam " + " ".join(config.extra.get("argv") or ["evaluate"]),
            "config": config.to_json(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "prompts": [p.id for p in passages],
            "reference_perplexity": metrics.perplexity(ref_nll, ref_count),
            "seconds": time.perf_counter() - started,
        },
        "modes": rows,
        "gamma_sweep": gamma_rows,
        "tree_sweep": tree_rows,
        "samples": [
            {
                "id": p.id,
                "prompt": p.prompt,
                "reference": ref,
                "outputs": {m: tokenizer.decode(r.outputs[i][0], skip_special_tokens=True) for m, r in runs.items()},
            }
            for i, (p, ref) in enumerate(zip(passages, references))
        ],
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "eval_quick" if config.quick else "eval"
    results["files"] = {"json": str(out / f"{stem}.json"), "plots": plots.write_all(results, out, stem)}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if tracker is not None:
        tracker.log_results(results)
        tracker.finish()
    return results
