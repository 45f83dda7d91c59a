"""Engine calls, engine steps and wall time of vLLM's offline beam search and specbeam's exact
speculative one (:func:`specbeam_vllm.beam_search`) on the demo pair. Prints a table and writes JSON.

    python benchmarks/bench_vllm_beam.py --out benchmarks/results/vllm_beam.json

One ``vllm.LLM`` on the target serves both; per beam width, each search runs once to warm up and
then ``--repeats`` times (median wall time). The speculative beams are compared with vLLM's
(tokens, order, cumulative log-probs) and the run fails if they differ.

engine calls: ``LLM._run_engine`` calls (one batch of requests run to completion; vLLM's loop makes
one per beam step). engine steps: ``LLMEngine.step`` calls (engine-core outputs read by the front end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "specbeam_hf", "demo_models")
PROMPTS = ["def main(", "import os\nclass ", "    for i in range(", "# Copyright", "def parse_args(argv):", "class Config:"]


def same_beams(ref, out) -> bool:
    """Same sequences in the same order with the same cumulative log-probs (to 1e-9)."""
    return all(
        len(r.sequences) == len(o.sequences)
        and all(a.tokens == b.tokens and abs(a.cum_logprob - b.cum_logprob) <= 1e-9 for a, b in zip(r.sequences, o.sequences))
        for r, o in zip(ref, out)
    )


def run_vllm(llm, prompts, beam_width: int, max_tokens: int):
    from vllm.sampling_params import BeamSearchParams

    from specbeam_vllm.beam import count_engine_calls

    with count_engine_calls(llm) as counter:
        started = time.perf_counter()
        out = llm.beam_search(prompts, BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens))
        seconds = time.perf_counter() - started
    return out, {"engine_calls": counter.calls, "engine_steps": counter.steps, "seconds": seconds}


def run_specbeam(llm, prompts, beam_width: int, max_tokens: int, draft: str, depth: int, width: int):
    from specbeam_vllm.beam import SpecBeamStats, beam_search

    stats = SpecBeamStats()
    out = beam_search(
        llm, prompts, beam_width, max_tokens, draft, num_draft_steps=depth, draft_width=width, stats=stats
    )
    return out, {
        "engine_calls": stats.engine_calls, "engine_steps": stats.engine_steps, "seconds": stats.wall_seconds,
        "draft_seconds": stats.draft_seconds, "scored_paths": stats.scored_paths, "plain_steps": stats.plain_steps,
        "top_ties": stats.top_ties, "cached_tokens": stats.cached_tokens,
        "beam_steps_per_pass": stats.steps_per_pass,
    }


def measure(run, repeats: int):
    """One warm-up run, then ``repeats`` runs; the last run's output and counts, the median seconds."""
    run()
    results = [run() for _ in range(repeats)]
    out, row = results[-1]
    row["seconds"] = statistics.median(r[1]["seconds"] for r in results)
    return out, row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.path.join(DEMO, "target"))
    ap.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    ap.add_argument("--beam-widths", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--draft-configs", nargs="+", default=["4x2", "8x2"],
                    help="DEPTHxMULT: draft tree depth (num_draft_steps) and draft beams kept per level "
                         "(draft_width = MULT * beam_width)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the draft model")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vllm_beam.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm

    torch.set_num_threads(args.threads)
    llm = vllm.LLM(args.target, max_model_len=512, enforce_eager=True, dtype="bfloat16",
                   max_num_seqs=args.max_num_seqs, seed=0)
    prompts = PROMPTS[: args.num_prompts]
    draft_configs = [tuple(int(x) for x in c.split("x")) for c in args.draft_configs]
    rows = []
    for beam_width in args.beam_widths:
        ref, ref_row = measure(lambda: run_vllm(llm, prompts, beam_width, args.max_tokens), args.repeats)
        for depth, mult in draft_configs:
            out, spec_row = measure(
                lambda: run_specbeam(llm, prompts, beam_width, args.max_tokens, args.draft, depth, mult * beam_width),
                args.repeats,
            )
            if not same_beams(ref, out):
                raise SystemExit(f"beam_width={beam_width}, draft {depth}x{mult}: specbeam's beams differ from vLLM's")
            rows.append({"beam_width": beam_width, "num_draft_steps": depth, "draft_width": mult * beam_width,
                         "vllm": ref_row, "specbeam": spec_row, "same_beams": True})

    print(f"\n{len(prompts)} prompts, max_tokens={args.max_tokens}, median wall time of {args.repeats} runs "
          f"after a warm-up (shared 2-core CPU: wall times are noisy)")
    print(f"{'B':>3} | {'vLLM calls':>10} {'steps':>6} {'wall s':>7} | {'depth':>5} {'width':>5} | "
          f"{'specbeam calls':>14} {'steps':>6} {'wall s':>7} {'draft s':>7} {'paths':>6} | {'calls ratio':>11} | same")
    for r in rows:
        v, s = r["vllm"], r["specbeam"]
        print(f"{r['beam_width']:>3} | {v['engine_calls']:>10} {v['engine_steps']:>6} {v['seconds']:>7.2f} | "
              f"{r['num_draft_steps']:>5} {r['draft_width']:>5} | "
              f"{s['engine_calls']:>14} {s['engine_steps']:>6} {s['seconds']:>7.2f} {s['draft_seconds']:>7.2f} "
              f"{s['scored_paths']:>6} | {v['engine_calls'] / s['engine_calls']:>11.2f} | {r['same_beams']}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"target": os.path.relpath(args.target, HERE), "draft": os.path.relpath(args.draft, HERE),
                   "prompts": prompts, "max_tokens": args.max_tokens,
                   "repeats": args.repeats, "max_num_seqs": args.max_num_seqs, "vllm": vllm.__version__,
                   "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
