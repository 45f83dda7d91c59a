"""Milliseconds per engine step inside vLLM's worker, spec-off against specbeam, measured directly.

Throughput rounds at 16 concurrent requests move by ±10 % between two identical servers on a small
host; the worker's own clock does not. Every variant's server is started with
``SPECBEAM_STEP_TIMING`` (:mod:`specbeam_vllm.step_timing`: the worker times its runner methods), the
variants take turns for ``--rounds`` rounds of ``--requests`` greedy 64-token requests, and each
round reports, per engine step: the round's wall time, the worker's busy time, the target's forward
within it, the rest of the busy time (input preparation, sampling, bookkeeping, the proposer: what
speculative mode and the proposer add), and the worker's wait for the engine core between calls.
Prints medians over rounds and writes JSON.

    python benchmarks/vllm_step_timing.py --rounds 4 \\
        --variants '{"spec-off, no async scheduling": {"spec_off": true, "server_flags": ["--no-async-scheduling"]}, "specbeam": {}}' \\
        --out benchmarks/results/vllm_step_timing.json

Variants as in ``bench_vllm_proposer.py`` (``null``: a spec-off server; ``"spec_off"`` and
``"server_flags"`` are the benchmark's keys, the rest specbeam options). Run it from the
repository root: the servers import specbeam from the current directory first.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import tempfile
import time

from bench_vllm_proposer import add_arguments, measured_rounds, start_servers

DEFAULT_VARIANTS = {"spec-off, no async scheduling": {"spec_off": True, "server_flags": ["--no-async-scheduling"]},
                    "specbeam": {}}
COLUMNS = ("wall", "busy", "forward", "rest of busy", "between", "prepare inputs", "sample", "proposer",
           "gc", "gc2 per 1000 steps")


def worker_totals(directory: str) -> dict:
    """The cumulative timings of the process that ran the model (after the writer's next tick)."""
    time.sleep(1.2)
    for path in glob.glob(os.path.join(directory, "timing-*.json")):
        with open(path) as fh:
            data = json.load(fh)
        if data["calls"].get("_model_forward"):
            return data
    raise RuntimeError(f"no worker timings in {directory}: is specbeam's vllm.general_plugins entry point installed?")


def per_step(before: dict, after: dict, round_seconds: float) -> dict:
    def spent(key: str) -> float:
        return after["seconds"].get(key, 0.0) - before["seconds"].get(key, 0.0)

    steps = after["calls"]["_model_forward"] - before["calls"]["_model_forward"]
    busy = spent("Worker.execute_model") + spent("Worker.sample_tokens")
    ms = {"wall": round_seconds, "busy": busy, "forward": spent("_model_forward"),
          "rest of busy": busy - spent("_model_forward"), "between": spent("between"),
          "prepare inputs": spent("_prepare_inputs"), "sample": spent("_sample"),
          "proposer": spent("propose_draft_token_ids"), "gc": spent("gc0") + spent("gc1") + spent("gc2")}
    per = {k: 1000.0 * v / steps for k, v in ms.items()}
    per["gc2 per 1000 steps"] = 1000.0 * (after["calls"].get("gc2", 0) - before["calls"].get("gc2", 0)) / steps
    return {"steps": steps, "ms_per_step": per, "gc_max_ms_so_far": 1000.0 * after["seconds"].get("gc_max", 0.0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, DEFAULT_VARIANTS, concurrency=16, requests=256, rounds=4, out="vllm_step_timing.json")
    args = ap.parse_args(argv)
    variants = json.loads(args.variants)
    names = list(variants)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        dirs = {name: os.path.join(tmp, f"timing{i}") for i, name in enumerate(names)}
        servers, _ = start_servers(stack, tmp, args, variants, stats=False,
                                   env=lambda i, name: {"SPECBEAM_STEP_TIMING": dirs[name]})
        for r, name, before, level, after in measured_rounds(servers, names, args, lambda n: worker_totals(dirs[n])):
            run = per_step(before, after, level["seconds"])
            run["tokens_per_s"] = level["tokens_per_s"]
            runs[name].append(run)
            cells = " ".join(f"{k} {run['ms_per_step'][k]:.2f}" for k in COLUMNS[:5])
            print(f"{name:32s} round {r + 1}: {level['tokens_per_s']:7.1f} tok/s, {run['steps']} steps; ms/step: {cells}",
                  flush=True)
    result = {"args": vars(args), "variants": {}}
    print(f"\nconcurrency {args.concurrency}, γ = {args.gamma}, medians over {args.rounds} rounds, ms per engine step\n")
    print("| variant | tokens/s | steps | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for name in names:
        med = {k: statistics.median(run["ms_per_step"][k] for run in runs[name]) for k in COLUMNS}
        tps = statistics.median(run["tokens_per_s"] for run in runs[name])
        steps = statistics.median(run["steps"] for run in runs[name])
        result["variants"][name] = {"options": variants[name], "runs": runs[name], "median_ms_per_step": med,
                                    "tokens_per_s": tps}
        print(f"| {name} | {tps:.1f} | {steps:.0f} | " + " | ".join(f"{med[k]:.2f}" for k in COLUMNS) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
