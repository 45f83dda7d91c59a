"""Benchmark: token trees against chains, several drafters against one, and exact speculative beam
search against HF beam search, on the demo pair.

    python benchmarks/bench_trees_beams.py            # full run, writes benchmarks/results/bench_trees_beams_<dtype>.{json,png}
    python benchmarks/bench_trees_beams.py --quick    # a smoke run

Rows:

- ``chain`` / ``tree`` (greedy, batch 1): mean accepted tokens per target pass and tokens/s at the
  same depth γ; the tree is a draft beam search of width ``--tree-width`` with ``--tree-budget`` nodes;
- ``multi_draft``: the demo draft plus a second draft (the demo draft with its weights perturbed by
  ``--second-draft-noise``, a stand-in for a second, differently trained draft), trees merged;
- ``tree+lookup``: the tree with a branch drafted by prompt lookup merged in (the tokens that
  followed the last earlier occurrence of the request's last 2-4 tokens; no draft forward);
- ``hf-beam`` / ``specbeam-beam``: ``num_beams`` = B for B in ``--beams``; ``same`` says whether the
  sequences equal HF's token for token and the largest |Δ sequences_scores|; ``steps/pass`` is beam
  steps per target forward; ``KV blocks`` is the most blocks the running beams held between passes
  against the bound ⌈P/16⌉ + B·(⌈G/16⌉ + 1) blocks (P + B·G tokens plus one partly filled block per beam).

Timing: ``--repeats`` rounds in which the methods take turns on each prompt; a method's seconds are
the sum over prompts of its fastest run of that prompt. Load on a shared host comes in bursts of a few
seconds; timed this way a burst costs one run of one prompt instead of a whole method's measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import PROMPTS, describe, sync  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"
RESULTS = Path(__file__).parent / "results"


def interleaved(methods: dict, num_prompts: int, repeats: int) -> dict:
    """Time every method on every prompt, ``repeats`` rounds, the methods taking turns on each prompt.

    ``methods[name](i)`` runs prompt ``i`` and returns ``(output, extra)``. A method's seconds are the
    sum over prompts of its fastest run of that prompt: a burst of load on the host slows one run of
    one prompt, not one method's whole measurement, and every method meets the same bursts. Returns
    ``{name: (seconds, outputs, extras)}`` (outputs and extras of the last round; the runs are
    deterministic)."""
    best = {name: [float("inf")] * num_prompts for name in methods}
    outputs = {name: [None] * num_prompts for name in methods}
    extras = {name: [None] * num_prompts for name in methods}
    for _ in range(max(repeats, 1)):
        for i in range(num_prompts):
            for name, fn in methods.items():
                sync()
                t0 = time.perf_counter()
                out, extra = fn(i)
                sync()
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
                outputs[name][i], extras[name][i] = out, extra
    return {name: (sum(best[name]), outputs[name], extras[name]) for name in methods}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(DEMO / "target"))
    p.add_argument("--draft", default=str(DEMO / "draft"))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--draft-dtype", default=None, choices=["bfloat16", "float32"],
                   help="run the drafts in this dtype (SpecBeam's draft_dtype; default: --dtype)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gammas", default="3,4,6")
    p.add_argument("--tree-width", type=int, default=3)
    p.add_argument("--tree-budget", type=int, default=None, help="default: width × γ")
    p.add_argument("--second-draft-noise", type=float, default=0.02)
    p.add_argument("--beams", default="2,4,8")
    p.add_argument("--beam-depth", type=int, default=3)
    p.add_argument("--beam-candidates", type=int, default=None, help="tree nodes per level and prompt (default: B + 2)")
    p.add_argument("--no-beam-adaptive", action="store_true", help="always draft --beam-depth levels (no per-depth timing)")
    p.add_argument("--beam-prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; a method's time is the sum over prompts of its fastest run of each, the methods taking turns")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models (and their KV pools) run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gammas = [int(g) for g in args.gammas.split(",") if g]  # --gammas "": beam search only
    beams = [int(b) for b in args.beams.split(",") if b]  # --beams "": trees and chains only
    prompts = PROMPTS
    if args.quick:
        prompts, gammas, beams, args.max_new_tokens, args.beam_prompts = PROMPTS[:2], [4], [2, 4], 24, 2
    console = Console()
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.target, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval()
    second = copy.deepcopy(draft)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in second.parameters():
            param.add_((args.second_draft_noise * param.float().std() * torch.randn(param.shape, generator=gen)).to(param.dtype))
    target, draft, second = target.to(args.device), draft.to(args.device), second.to(args.device)
    pad = tok.pad_token_id
    encs = [tok([p_], return_tensors="pt").to(args.device) for p_ in prompts]
    max_new = args.max_new_tokens
    common = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=pad, eos_token_id=None)
    rows: list[dict] = []
    target.generate(**encs[0], max_new_tokens=4, do_sample=False, pad_token_id=pad)  # warm-up

    # ---------------------------------------------------------------- trees vs chains (greedy, batch 1)
    n_new = len(encs) * max_new
    methods = {"hf": lambda i: (target.generate(**encs[i], **common), None)}
    for gamma in gammas:
        for method, options in (
            ("chain", {}),
            ("tree", {"drafter": "draft_tree", "tree_width": args.tree_width, "tree_budget": args.tree_budget}),
            ("multi_draft", {"tree_width": args.tree_width, "tree_budget": args.tree_budget}),
            ("tree+lookup", {"drafter": "draft_tree", "tree_width": args.tree_width, "tree_budget": args.tree_budget,
                             "prompt_lookup": True}),
        ):
            drafts = [draft, second] if method == "multi_draft" else draft
            assistant = specbeam_hf.SpecBeam(drafts, num_draft_tokens=gamma, draft_dtype=args.draft_dtype, **options)

            def run(i, assistant=assistant):
                out = target.generate(**encs[i], custom_generate=specbeam_hf.generate, assistant=assistant, **common)
                return out, assistant.last_stats.mean_accepted_length

            methods[(method, gamma)] = run
    timings = interleaved(methods, len(encs), args.repeats)
    base_secs, base_out, _ = timings.pop("hf")
    rows.append({"kind": "decode", "method": "hf", "gamma": 0, "tokens_per_s": n_new / base_secs, "seconds": base_secs})
    for (method, gamma), (secs, outs, per_pass) in timings.items():
        row = {
            "kind": "decode", "method": method, "gamma": gamma, "tokens_per_s": n_new / secs, "seconds": secs,
            "speedup": base_secs / secs, "tokens_per_pass": sum(per_pass) / len(per_pass),
            "exact": all(torch.equal(a, b) for a, b in zip(outs, base_out)),
        }
        rows.append(row)
        console.print(f"γ={gamma} {method}: {row['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}×), "
                      f"{row['tokens_per_pass']:.2f} tokens/pass, exact={row['exact']}")

    # ---------------------------------------------------------------- beam search
    beam_prompts = prompts[: args.beam_prompts]
    benc = [tok([p_], return_tensors="pt").to(args.device) for p_ in beam_prompts]
    for b in beams:
        kwargs = dict(num_beams=b, max_new_tokens=max_new, do_sample=False, pad_token_id=pad, eos_token_id=None,
                      early_stopping=False, return_dict_in_generate=True, output_scores=True)
        assistant = specbeam_hf.SpecBeam(draft, beam_depth=args.beam_depth, beam_candidates=args.beam_candidates, draft_dtype=args.draft_dtype,
                                         beam_adaptive=not args.no_beam_adaptive)

        def run_beam(i, assistant=assistant, kwargs=kwargs):
            out = target.generate(**benc[i], custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
            return out, assistant.last_beam_stats

        timings = interleaved({"hf": lambda i, kwargs=kwargs: (target.generate(**benc[i], **kwargs), None), "specbeam": run_beam},
                              len(benc), args.repeats)
        hf_secs, hf_out, _ = timings["hf"]
        secs, outs, stats = timings["specbeam"]
        rows.append({"kind": "beam", "method": "hf-beam", "beams": b, "seconds": hf_secs,
                     "tokens_per_s": len(benc) * max_new / hf_secs})
        same = all(torch.equal(a.sequences, r.sequences) for a, r in zip(outs, hf_out))
        dscore = max(float((a.sequences_scores - r.sequences_scores).abs().max()) for a, r in zip(outs, hf_out)) if same else None
        prompt_lens = [e["input_ids"].shape[1] for e in benc]
        bound = max(math.ceil(pl / 16) + b * (math.ceil(max_new / 16) + 1) for pl in prompt_lens)
        row = {
            "kind": "beam", "method": "specbeam-beam", "beams": b, "seconds": secs,
            "tokens_per_s": len(benc) * max_new / secs, "speedup": hf_secs / secs, "same": same,
            "max_score_diff": dscore,
            "steps_per_pass": sum(s.steps for s in stats) / sum(s.target_forwards for s in stats),
            "kv_blocks": max(s.peak_beam_blocks for s in stats), "kv_bound": bound,
        }
        rows.append(row)
        console.print(f"beams={b}: HF {hf_secs:.2f}s, specbeam {secs:.2f}s ({row['speedup']:.2f}×), same={same}, "
                      f"Δscore={dscore}, {row['steps_per_pass']:.2f} steps/pass, KV blocks {row['kv_blocks']} ≤ {bound}")

    drafts_in = f" (drafts {args.draft_dtype})" if args.draft_dtype not in (None, args.dtype) else ""
    table = Table(title=f"trees, drafters and beams — demo pair, {args.dtype}{drafts_in}, {max_new} new tokens, {describe(args.device)}")
    for col in ("kind", "method", "γ / B", "tok/s", "speed-up", "tokens/pass or steps/pass", "exact / same", "KV blocks (bound)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["kind"], r["method"], str(r.get("gamma", r.get("beams", ""))), f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}×" if "speedup" in r else "",
            f"{r['tokens_per_pass']:.2f}" if "tokens_per_pass" in r else (f"{r['steps_per_pass']:.2f}" if "steps_per_pass" in r else ""),
            "" if r.get("exact", r.get("same")) is None else ("yes" if r.get("exact", r.get("same")) else "NO"),
            f"{r['kv_blocks']} ({r['kv_bound']})" if "kv_blocks" in r else "",
        )
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_trees_beams_{args.dtype}" + (f"_draft_{args.draft_dtype}" if args.draft_dtype not in (None, args.dtype) else "") + ("" if args.device == "cpu" else "_" + args.device.split(":")[0]) + ("_quick" if args.quick else "")
    meta = {"command": " ".join(["bench_trees_beams.py"] + (argv if argv is not None else sys.argv[1:])),
            "dtype": args.dtype, "draft_dtype": args.draft_dtype or args.dtype, "max_new_tokens": max_new, "threads": torch.get_num_threads(), "device": describe(args.device),
            "torch": torch.__version__, "platform": platform.platform()}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / f"{stem}.png")
    console.print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("chain", "o-"), ("tree", "s-"), ("multi_draft", "^-"), ("tree+lookup", "d-")):
        sel = sorted((r for r in rows if r.get("method") == method), key=lambda r: r["gamma"])
        if sel:
            ax1.plot([r["gamma"] for r in sel], [r["tokens_per_pass"] for r in sel], style, label=method)
    ax1.set_xlabel("depth γ")
    ax1.set_ylabel("tokens per target pass")
    ax1.set_title("greedy, batch 1")
    if ax1.lines:
        ax1.legend()
    hf = sorted((r for r in rows if r["method"] == "hf-beam"), key=lambda r: r["beams"])
    sb = sorted((r for r in rows if r["method"] == "specbeam-beam"), key=lambda r: r["beams"])
    if hf:
        ax2.plot([r["beams"] for r in hf], [r["tokens_per_s"] for r in hf], "x--", label="HF beam search")
        ax2.plot([r["beams"] for r in sb], [r["tokens_per_s"] for r in sb], "o-", label="specbeam (exact)")
    ax2.set_xlabel("num_beams B")
    ax2.set_ylabel("new tokens / s")
    ax2.set_title("beam search")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
