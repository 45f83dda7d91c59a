"""What the beam search's depth chooser (``specbeam_core.beam_search.DepthChooser``) costs and saves:
the chooser as shipped against the earlier one (one set of measurements for every request, no decay,
no re-trial), the two taking turns in one process on the demo pair.

    python benchmarks/bench_depth_chooser.py                  # B = 2, 4, 8; then the mixed-load case
    python benchmarks/bench_depth_chooser.py --beams 4 --rounds 2

Part 1 ("steady"): single prompts, B beams, 64 new tokens, EOS off; each method's time is the sum
over prompts of its fastest of ``--rounds`` runs, HF's plain beam search and the two choosers taking
turns (the order reversed every round). Part 2 ("mixed"): one request of ``--batch-prompts`` prompts
at B = 4 (16 beams, where plain beam search is cheaper here, so depth 0 wins its measurements), then ``--after``
single-prompt B = 4 requests; the time of those later requests for each chooser (fresh assistants).
Part 1 also records, per chooser, the depths its passes drafted and its own estimate of ms per beam
step for each depth. Exactness: for each B, both choosers' outputs equal HF's on two prompts
(untimed, 24 tokens); in part 2 every request's output equals HF's. Prints tables and writes JSON
(``benchmarks/results/depth_chooser/bench_depth_chooser.json``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf
from specbeam_core.beam_search import DepthChooser

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import PROMPTS, sync, write_result  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"


class SharedChooser(DepthChooser):
    """The earlier chooser: one set of measurements for all requests, never forgotten, never re-tried."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(max_depth, decay=1.0, explore_every=10**9)

    def begin_search(self, workload: object = None) -> None:
        super().begin_search(None)


def assistants(draft, target):
    shipped, shared = specbeam_hf.SpecBeam(draft), specbeam_hf.SpecBeam(draft)
    shared.beam_searcher_for(target).chooser = SharedChooser(shared.beam_depth)
    return {"shipped": shipped, "earlier": shared}


def timed(target, enc, kwargs, assistant=None):
    sync()
    t0 = time.perf_counter()
    if assistant is None:
        out = target.generate(**enc, **kwargs)
    else:
        out = target.generate(**enc, **kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
    sync()
    return time.perf_counter() - t0, out


def steady(target, draft, encs, b: int, rounds: int, max_new: int) -> dict:
    """Tokens/s of HF and of both choosers (exactness is checked by ``check_exact``, untimed)."""
    kwargs = dict(num_beams=b, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    methods = {"hf": None, **assistants(draft, target)}
    best = {m: [float("inf")] * len(encs) for m in methods}
    steps = {m: [] for m in methods if m != "hf"}
    depths = {m: collections.Counter() for m in methods if m != "hf"}
    for r in range(rounds):
        for i, enc in enumerate(encs):
            for name in list(methods)[:: -1 if r % 2 else 1]:
                seconds, _ = timed(target, enc, kwargs, methods[name])
                best[name][i] = min(best[name][i], seconds)
                if name != "hf":
                    stats = methods[name].last_beam_stats
                    steps[name].append(stats.steps_per_target_forward)
                    depths[name].update(rec["depth"] for rec in stats.records)
    tokens = len(encs) * max_new
    row = {"beams": b, "prompts": len(encs), "rounds": rounds, "tokens_per_s": {}, "steps_per_pass": {},
           "passes_by_depth": {}, "estimated_ms_per_step_by_depth": {}}
    for name in methods:
        row["tokens_per_s"][name] = tokens / sum(best[name])
        if name != "hf":
            row["steps_per_pass"][name] = sum(steps[name]) / len(steps[name])
            row["passes_by_depth"][name] = dict(sorted(depths[name].items()))
            chooser = methods[name].beam_searcher_for(target).chooser  # its measurements for this workload
            row["estimated_ms_per_step_by_depth"][name] = {
                d: 1e3 * chooser.seconds[d] / chooser.steps[d] for d in chooser.depths if chooser.steps[d] > 0
            }
    return row


def check_exact(target, draft, encs, b: int, max_new: int) -> None:
    kwargs = dict(num_beams=b, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    for name, assistant in assistants(draft, target).items():
        for enc in encs:
            _, expected = timed(target, enc, kwargs)
            _, out = timed(target, enc, kwargs, assistant)
            if not torch.equal(out, expected):
                raise AssertionError(f"{name}: beam search with B = {b} differs from HF's")


def mixed(target, draft, tok, encs, batch_prompts: int, after: int, max_new: int) -> dict:
    kwargs = dict(num_beams=4, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = tok(PROMPTS[:batch_prompts], return_tensors="pt", padding=True)
    row = {"batch_prompts": batch_prompts, "after": after, "seconds": {}, "first_batch_seconds": {}, "steps_per_pass": {}}
    expected_batch = target.generate(**batch, **kwargs)
    for name, assistant in assistants(draft, target).items():
        row["first_batch_seconds"][name], out = timed(target, batch, kwargs, assistant)
        if not torch.equal(out, expected_batch):
            raise AssertionError(f"{name}: beam search over the batch differs from HF's")
        total, steps = 0.0, []
        for i in range(after):
            enc = encs[i % len(encs)]
            seconds, out = timed(target, enc, kwargs, assistant)
            if not torch.equal(out, target.generate(**enc, **kwargs)):
                raise AssertionError(f"{name}: beam search differs from HF's")
            total += seconds
            steps.append(assistant.last_beam_stats.steps_per_target_forward)
        row["seconds"][name] = total
        row["steps_per_pass"][name] = sum(steps) / len(steps)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beams", default="2,4,8")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--after", type=int, default=8, help="single-prompt requests after the batch (part 2; 0: skip)")
    p.add_argument("--batch-prompts", type=int, default=4, help="prompts in the batched request of part 2")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "depth_chooser")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEMO / "target", padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.float32).eval()
    encs = [tok([q], return_tensors="pt") for q in PROMPTS[: args.prompts]]
    timed(target, encs[0], dict(max_new_tokens=4, do_sample=False, pad_token_id=0))  # warm-up
    console = Console()
    rows = []
    for b in [int(x) for x in args.beams.split(",") if x]:
        check_exact(target, draft, encs[:2], b, 24)
        rows.append(steady(target, draft, encs, b, args.rounds, args.max_new_tokens))
    table = Table(title=f"steady load: single prompts, demo pair float32, {args.prompts} prompts x {args.max_new_tokens} "
                        f"tokens, fastest of {args.rounds} rounds, methods taking turns")
    for col in ("B", "HF tokens/s", "shipped tokens/s", "×HF", "steps/pass", "earlier tokens/s", "×HF ", "steps/pass "):
        table.add_column(col, justify="right")
    for r in rows:
        t, s = r["tokens_per_s"], r["steps_per_pass"]
        table.add_row(str(r["beams"]), f"{t['hf']:.1f}", f"{t['shipped']:.1f}", f"{t['shipped'] / t['hf']:.2f}×",
                      f"{s['shipped']:.2f}", f"{t['earlier']:.1f}", f"{t['earlier'] / t['hf']:.2f}×",
                      f"{s['earlier']:.2f}")
    console.print(table)
    for r in rows:
        for name in ("shipped", "earlier"):
            est = ", ".join(f"{d}: {ms:.1f}" for d, ms in r["estimated_ms_per_step_by_depth"][name].items())
            console.print(f"B = {r['beams']} {name}: passes by depth {r['passes_by_depth'][name]}; its ms per beam step by depth {est}")
    result = {"steady": rows}
    if args.after:
        m = mixed(target, draft, tok, encs, args.batch_prompts, args.after, args.max_new_tokens)
        result["mixed"] = m
        table = Table(title=f"mixed load: one {args.batch_prompts}-prompt B = 4 request, then {args.after} single-prompt B = 4 requests "
                            f"({args.max_new_tokens} tokens each)")
        for col in ("chooser", f"{args.batch_prompts}-prompt request s", f"next {args.after} requests s", "their steps/pass"):
            table.add_column(col, justify="right")
        for name in m["seconds"]:
            table.add_row(name, f"{m['first_batch_seconds'][name]:.2f}", f"{m['seconds'][name]:.2f}",
                          f"{m['steps_per_pass'][name]:.2f}")
        console.print(table)
    path = args.out / "bench_depth_chooser.json"
    write_result(path, "bench_depth_chooser.py", argv, result)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
