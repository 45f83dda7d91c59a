"""How fast speculative beam search could be on this machine with a perfect draft: the target as its
own draft (an oracle ranking) against the demo draft, B = 4, the demo target.

    python benchmarks/beam_oracle_bound.py                       # depths 2-5, 4 prompts x 64 tokens
    python benchmarks/beam_oracle_bound.py --depths 3,5 --rounds 3

A speculative beam pass covers one beam step per drafted level at which every beam the target keeps
is a node of the trees, plus one (``specbeam_core.beam_search``). The target drafting for itself
ranks its own candidates, so its trees hold the kept beams at every level (EOS is off) and a
depth-``d`` pass covers ``d + 1`` steps: the most any draft can cover at that depth and tree width.
Its own drafting is as slow as the target, so its pass is not what a real draft would cost; the
**projected** row prices the oracle's pass as its target forward and specbeam's host work (both
measured in the oracle run: the same tree sizes a perfect draft would make) plus the demo draft's
forwards at the same depth (measured in the demo run: the same levels and rows), over the oracle's
steps per pass. That is the speed of a draft as cheap as the demo draft that always ranks the
target's kept beams first. Forward times are summed around every ``CausalLM.forward`` call
(``profile_pass.ForwardTimer``); HF is ``generate(num_beams=4)`` on the same prompt; every run's
sequences are compared with HF's (exit 1 on a difference). Each method's time per prompt is its
fastest of ``--rounds`` (HF, demo and oracle take turns, the order reversed every round). Prints a
table and writes ``benchmarks/results/beam_oracle_bound.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import PROMPTS, describe, sync, write_result  # noqa: E402
from profile_pass import ForwardTimer  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"


def timed_run(target, enc, kwargs, assistant):
    """``(seconds, output, forward seconds and calls by role, steps per pass)`` of one generate call."""
    extra = {} if assistant is None else dict(custom_generate=specbeam_hf.generate, assistant=assistant)
    runner = None if assistant is None else assistant.beam_searcher_for(target).target
    with ForwardTimer(runner) as timer:
        sync()
        t0 = time.perf_counter()
        out = target.generate(**enc, **kwargs, **extra)
        sync()
        seconds = time.perf_counter() - t0
    steps = None if assistant is None else assistant.last_beam_stats.steps_per_target_forward
    return seconds, out, dict(timer.seconds), dict(timer.calls), steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="2,3,4,5")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "beam_oracle_bound.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEMO / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
    oracle = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()  # the target as draft
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.float32).eval()
    encs = [tok([q], return_tensors="pt") for q in PROMPTS[: args.prompts]]
    kwargs = dict(num_beams=args.beams, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None, early_stopping=False)
    target.generate(**encs[0], **{**kwargs, "max_new_tokens": 4})  # warm-up
    hf_best = [float("inf")] * len(encs)
    hf_out = [None] * len(encs)
    rows, differing = [], []
    for depth in [int(d) for d in args.depths.split(",")]:
        assistants = {name: specbeam_hf.SpecBeam(model, beam_adaptive=False, beam_depth=depth)
                      for name, model in (("demo", draft), ("oracle", oracle))}
        best = {name: [None] * len(encs) for name in assistants}
        for r in range(args.rounds):
            for i, enc in enumerate(encs):
                for name in ["hf", *assistants][:: -1 if r % 2 else 1]:
                    seconds, out, fwd_s, fwd_n, steps = timed_run(target, enc, kwargs, assistants.get(name))
                    if name == "hf":
                        hf_best[i] = min(hf_best[i], seconds)
                        hf_out[i] = out if hf_out[i] is None else hf_out[i]
                        continue
                    if hf_out[i] is not None and not torch.equal(out, hf_out[i]):
                        differing.append((depth, name, i))
                    run = dict(seconds=seconds, target_s=fwd_s["target"], draft_s=fwd_s["draft"],
                               passes=fwd_n["target"], steps_per_pass=steps)
                    if best[name][i] is None or seconds < best[name][i]["seconds"]:
                        best[name][i] = run
        row = {"depth": depth}
        for name, runs in best.items():
            passes = sum(x["passes"] for x in runs)
            tot = {k: sum(x[k] for x in runs) for k in ("seconds", "target_s", "draft_s")}
            row[name] = {
                "passes": passes, "steps_per_pass": len(encs) * args.max_new_tokens / passes,
                "ms_per_pass": tot["seconds"] / passes * 1e3, "target_ms_per_pass": tot["target_s"] / passes * 1e3,
                "draft_ms_per_pass": tot["draft_s"] / passes * 1e3,
                "host_ms_per_pass": (tot["seconds"] - tot["target_s"] - tot["draft_s"]) / passes * 1e3,
            }
        demo, orc = row["demo"], row["oracle"]
        projected_pass = orc["target_ms_per_pass"] + orc["host_ms_per_pass"] + demo["draft_ms_per_pass"]
        row["projected"] = {"ms_per_pass": projected_pass, "ms_per_step": projected_pass / orc["steps_per_pass"]}
        rows.append(row)
    hf_ms_per_step = sum(hf_best) / (len(encs) * args.max_new_tokens) * 1e3
    for row in rows:
        row["hf_ms_per_step"] = hf_ms_per_step
        for name in ("demo", "oracle"):
            row[name]["ms_per_step"] = row[name]["ms_per_pass"] / row[name]["steps_per_pass"]
        for name in ("demo", "oracle", "projected"):
            row[name]["speedup_vs_hf"] = hf_ms_per_step / row[name]["ms_per_step"]

    table = Table(title=f"beam search B = {args.beams}, demo target, float32, {describe('cpu')}, "
                        f"{len(encs)} prompts x {args.max_new_tokens} tokens; HF {hf_ms_per_step:.1f} ms a step")
    for col in ("depth", "draft", "steps / pass", "ms / pass", "target fwd", "draft fwd", "host", "ms / step", "× HF"):
        table.add_column(col, justify="right")
    for row in rows:
        for name, label in (("demo", "demo draft"), ("oracle", "target as draft"), ("projected", "perfect, demo's cost")):
            r, o = row[name], row["oracle"]
            if name == "projected":
                cells = [f"{o['steps_per_pass']:.2f}", f"{r['ms_per_pass']:.1f}", f"{o['target_ms_per_pass']:.1f}",
                         f"{row['demo']['draft_ms_per_pass']:.1f}", f"{o['host_ms_per_pass']:.1f}"]
            else:
                cells = [f"{r['steps_per_pass']:.2f}", f"{r['ms_per_pass']:.1f}", f"{r['target_ms_per_pass']:.1f}",
                         f"{r['draft_ms_per_pass']:.1f}", f"{r['host_ms_per_pass']:.1f}"]
            table.add_row(str(row["depth"]), label, *cells, f"{r['ms_per_step']:.1f}", f"{r['speedup_vs_hf']:.2f}×")
    console = Console(width=140)
    console.print(table)
    console.print("every output equal to HF's" if not differing else f"DIFFERENT from HF: {differing}")
    write_result(args.out, "beam_oracle_bound.py", argv, {"rows": rows, "differing_from_hf": differing,
                                                           "prompts": len(encs), "max_new_tokens": args.max_new_tokens,
                                                           "rounds": args.rounds})
    console.print(f"wrote {args.out}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
