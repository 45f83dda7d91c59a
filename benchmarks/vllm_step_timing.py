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

from specbeam_vllm.server import Server, specbeam_flags

from bench_vllm import DEMO, run_level

DEFAULT_VARIANTS = {"spec-off, no async scheduling": {"spec_off": True, "server_flags": ["--no-async-scheduling"]},
                    "specbeam": {}}
COLUMNS = ("wall", "busy", "forward", "rest of busy", "between", "prepare inputs", "sample", "proposer")


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
          "proposer": spent("propose_draft_token_ids")}
    return {"steps": steps, "ms_per_step": {k: 1000.0 * v / steps for k, v in ms.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.path.join(DEMO, "target"))
    ap.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    ap.add_argument("--variants", default=json.dumps(DEFAULT_VARIANTS), help="JSON: name -> specbeam options")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="per variant and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "vllm_step_timing.json"))
    args = ap.parse_args(argv)
    variants = json.loads(args.variants)
    common = ["--max-model-len", "512", "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "16",
              "--seed", "0"]
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers, dirs = {}, {}
        for i, (name, options) in enumerate(variants.items()):
            options = {"spec_off": True} if options is None else dict(options)
            extra = list(options.pop("server_flags", []))
            spec_off = options.pop("spec_off", False)
            flags = extra if spec_off else extra + specbeam_flags(os.path.abspath(args.draft), args.gamma, **options)
            dirs[name] = os.path.join(tmp, f"timing{i}")
            servers[name] = stack.enter_context(Server(
                os.path.abspath(args.target), flags + common, log_path=os.path.join(tmp, f"server{i}.log"),
                env={"SPECBEAM_STEP_TIMING": dirs[name]}))
            run_level(servers[name].url, servers[name].model, 1, 2, 16, 0.0)  # warm-up
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                before = worker_totals(dirs[name])
                level = run_level(servers[name].url, servers[name].model, args.concurrency, args.requests, 64, 0.0)
                run = per_step(before, worker_totals(dirs[name]), level["seconds"])
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
