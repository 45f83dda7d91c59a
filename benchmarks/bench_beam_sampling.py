"""Beam sampling (``num_beams = B, do_sample=True``): HF ``generate`` against specbeam on the demo
pair, 4 code prompts one at a time, ``--max-new-tokens`` tokens each (EOS off). Both runs of a prompt
start from the same seed, so "same as HF" is token equality of every returned sequence. In each of
``--repeats`` rounds every method takes its turn on each prompt; a method's seconds are the sum over
prompts of its fastest run. specbeam's assistant is the default (the beam depth measured cheapest,
0 .. 3), reused across rounds.

    python benchmarks/bench_beam_sampling.py --repeats 2

Prints a table and writes ``benchmarks/results/bench_beam_sampling.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_hf import PROMPTS, load_demo

import specbeam_hf

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beams", default="2,4")
    p.add_argument("--temperatures", default="1.0,0.7")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--beam-candidates", type=int, default=None,
                   help="SpecBeam's beam_candidates (draft candidates per level and prompt; default num_beams + 2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="bench_beam_sampling")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, target, draft = load_demo()
    prompts = PROMPTS[: args.prompts]
    rows = []
    print("| B | temperature | HF tokens/s | specbeam tokens/s | speed-up | beam steps per target pass | same as HF |")
    print("|---|---|---|---|---|---|---|")
    for beams in [int(b) for b in args.beams.split(",")]:
        for temperature in [float(t) for t in args.temperatures.split(",")]:
            assistant = specbeam_hf.SpecBeam(draft, beam_candidates=args.beam_candidates)
            best = {"hf": [float("inf")] * len(prompts), "specbeam": [float("inf")] * len(prompts)}
            same, steps, passes = True, 0, 0
            for round_ in range(args.repeats + 1):  # round 0: warm-up, outputs compared, not timed
                for i, prompt in enumerate(prompts):
                    kwargs = dict(**tok(prompt, return_tensors="pt"), num_beams=beams, do_sample=True, top_k=0,
                                  temperature=temperature, max_new_tokens=args.max_new_tokens,
                                  min_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
                    outputs = {}
                    for method in ("hf", "specbeam"):
                        extra = {} if method == "hf" else dict(custom_generate=specbeam_hf.generate, assistant=assistant)
                        torch.manual_seed(1000 * round_ + i)
                        start = time.perf_counter()
                        outputs[method] = target.generate(**kwargs, **extra)
                        seconds = time.perf_counter() - start
                        if round_:
                            best[method][i] = min(best[method][i], seconds)
                    same &= torch.equal(outputs["hf"], outputs["specbeam"])
                    steps += assistant.last_beam_stats.steps
                    passes += assistant.last_beam_stats.target_forwards
            tokens = len(prompts) * args.max_new_tokens
            hf_s, sb_s = sum(best["hf"]), sum(best["specbeam"])
            rows.append(dict(beams=beams, temperature=temperature, hf_tokens_per_s=tokens / hf_s,
                             tokens_per_s=tokens / sb_s, speed_up=hf_s / sb_s, steps_per_pass=steps / passes,
                             same_as_hf=bool(same)))
            r = rows[-1]
            print(f"| {beams} | {temperature} | {r['hf_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['speed_up']:.2f}× | "
                  f"{r['steps_per_pass']:.2f} | {'yes' if same else 'no'} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model="demo pair", prompts=len(prompts), beam_candidates=args.beam_candidates, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                threads=args.threads, top_k=0, torch=torch.__version__, dtype="float32")
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
