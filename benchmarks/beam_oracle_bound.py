"""How fast speculative beam search could be on this machine with a perfect draft: the target as its
own draft (an oracle ranking) against the demo draft, B = 4, the demo target.

    python benchmarks/beam_oracle_bound.py                       # depths 2-5, 4 prompts x 64 tokens
    python benchmarks/beam_oracle_bound.py --depths 3,5 --rounds 3
    python benchmarks/beam_oracle_bound.py --from-json benchmarks/results/beam_oracle_bound.json   # reprint

A speculative beam pass covers one beam step per drafted level at which every beam the target keeps
is a node of the trees, plus one (``specbeam_core.beam_search``). The target drafting for itself
ranks its own candidates, so its trees hold the kept beams at every level (EOS is off) and a
depth-``d`` pass covers ``d + 1`` steps: the most any draft can cover at that depth and tree width.
Its own drafting is as slow as the target, so its pass is not what a real draft would cost; the
**projected** row prices the oracle's pass as its target forward and specbeam's host work (both
measured in the oracle run: the same tree sizes a perfect draft would make) plus the demo draft's
forwards at the same depth (measured in the demo run: the same levels and rows), over the oracle's
steps per pass. That is the speed of a draft as cheap as the demo draft that always ranks the
target's kept beams first. Two more rows bound what is left: the perfect draft with free drafting,
and the demo draft's target forwards alone (drafting and host work free: no engine work goes below it). Forward times are summed around every ``CausalLM.forward`` call
(``profile_pass.ForwardTimer``); HF is ``generate(num_beams=4)`` on the same prompt; every run's
sequences are compared with HF's (exit 1 on a difference). Each method's time per prompt is its
fastest of ``--rounds`` (HF, demo and oracle take turns, the order reversed every round). Prints a
table and writes ``benchmarks/results/beam_oracle_bound.json``.
"""

from __future__ import annotations

import argparse
import json
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
    """``(seconds, output, forward seconds and calls by role)`` of one generate call."""
    extra = {} if assistant is None else dict(custom_generate=specbeam_hf.generate, assistant=assistant)
    runner = None if assistant is None else assistant.beam_searcher_for(target).target
    with ForwardTimer(runner) as timer:
        sync()
        t0 = time.perf_counter()
        out = target.generate(**enc, **kwargs, **extra)
        sync()
        seconds = time.perf_counter() - t0
    return seconds, out, dict(timer.seconds), dict(timer.calls)


def priced(row: dict) -> dict[str, dict]:
    """Each way of pricing one depth's pass from the measured parts: ``{label: {steps_per_pass, target,
    draft, host (ms a pass), ms_per_step}}``. The measured runs as they ran; a perfect draft at the demo
    draft's cost and with free drafting; the demo draft with drafting and host work free (its target
    forwards alone: what no engine work can go below)."""
    demo, orc = row["demo"], row["oracle"]
    parts = {
        "demo draft": (demo, demo["draft_ms_per_pass"], demo["host_ms_per_pass"]),
        "target as draft": (orc, orc["draft_ms_per_pass"], orc["host_ms_per_pass"]),
        "perfect, demo's cost": (orc, demo["draft_ms_per_pass"], orc["host_ms_per_pass"]),
        "perfect, free drafting": (orc, 0.0, orc["host_ms_per_pass"]),
        "demo, target fwd only": (demo, 0.0, 0.0),
    }
    out = {}
    for label, (run, draft_ms, host_ms) in parts.items():
        ms = run["target_ms_per_pass"] + draft_ms + host_ms
        out[label] = {"steps_per_pass": run["steps_per_pass"], "target": run["target_ms_per_pass"], "draft": draft_ms,
                      "host": host_ms, "ms_per_step": ms / run["steps_per_pass"],
                      "speedup_vs_hf": row["hf_ms_per_step"] * run["steps_per_pass"] / ms}
    return out


def measure(args) -> dict:
    """Times HF, the demo draft and the target as draft at every depth; the measured parts per depth."""
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEMO / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
    oracle = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()  # the target as draft
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.float32).eval()
    encs = [tok([q], return_tensors="pt") for q in PROMPTS[: args.prompts]]
    kwargs = dict(num_beams=args.beams, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None, early_stopping=False)
    hf_out = [target.generate(**enc, **kwargs) for enc in encs]  # the reference, and a warm-up
    hf_best = [float("inf")] * len(encs)
    rows, differing = [], []
    for depth in [int(d) for d in args.depths.split(",")]:
        assistants = {name: specbeam_hf.SpecBeam(model, beam_adaptive=False, beam_depth=depth)
                      for name, model in (("demo", draft), ("oracle", oracle))}
        best = {name: [None] * len(encs) for name in assistants}
        for r in range(args.rounds):
            for i, enc in enumerate(encs):
                for name in ["hf", *assistants][:: -1 if r % 2 else 1]:
                    seconds, out, fwd_s, fwd_n = timed_run(target, enc, kwargs, assistants.get(name))
                    if name == "hf":
                        hf_best[i] = min(hf_best[i], seconds)
                        continue
                    if not torch.equal(out, hf_out[i]):
                        differing.append((depth, name, i))
                    if best[name][i] is None or seconds < best[name][i]["seconds"]:
                        best[name][i] = dict(seconds=seconds, target_s=fwd_s["target"], draft_s=fwd_s["draft"],
                                             passes=fwd_n["target"])
        row = {"depth": depth}
        for name, runs in best.items():
            passes = sum(x["passes"] for x in runs)
            tot = {k: sum(x[k] for x in runs) for k in ("seconds", "target_s", "draft_s")}
            row[name] = {
                "passes": passes, "steps_per_pass": len(encs) * args.max_new_tokens / passes,
                "target_ms_per_pass": tot["target_s"] / passes * 1e3, "draft_ms_per_pass": tot["draft_s"] / passes * 1e3,
                "host_ms_per_pass": (tot["seconds"] - tot["target_s"] - tot["draft_s"]) / passes * 1e3,
            }
        rows.append(row)
    hf_ms_per_step = sum(hf_best) / (len(encs) * args.max_new_tokens) * 1e3
    for row in rows:
        row["hf_ms_per_step"] = hf_ms_per_step
    return {"rows": rows, "differing_from_hf": differing, "prompts": len(encs), "beams": args.beams,
            "max_new_tokens": args.max_new_tokens, "rounds": args.rounds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="2,3,4,5")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "beam_oracle_bound.json")
    p.add_argument("--from-json", type=Path, help="print the table of a JSON this script wrote; measure nothing")
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        device = data["meta"]["device"]
    else:
        data, device = measure(args), describe("cpu")
    for row in data["rows"]:
        row["priced"] = priced(row)
    rows = data["rows"]
    table = Table(title=f"beam search B = {data.get('beams', 4)}, demo target, float32, {device}, {data['prompts']} "
                        f"prompts x {data['max_new_tokens']} tokens; HF {rows[0]['hf_ms_per_step']:.1f} ms a step")
    for col in ("depth", "pass priced as", "steps / pass", "target fwd", "draft fwd", "host", "ms / pass", "ms / step", "× HF"):
        table.add_column(col, justify="right")
    for row in rows:
        for label, r in row["priced"].items():
            table.add_row(str(row["depth"]), label, f"{r['steps_per_pass']:.2f}", f"{r['target']:.1f}", f"{r['draft']:.1f}",
                          f"{r['host']:.1f}", f"{r['target'] + r['draft'] + r['host']:.1f}", f"{r['ms_per_step']:.1f}",
                          f"{r['speedup_vs_hf']:.2f}×")
    console = Console(width=150)
    console.print(table)
    differing = data["differing_from_hf"]
    console.print("every output equal to HF's" if not differing else f"DIFFERENT from HF: {differing}")
    if not args.from_json:
        write_result(args.out, "beam_oracle_bound.py", argv, data)
        console.print(f"wrote {args.out}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
