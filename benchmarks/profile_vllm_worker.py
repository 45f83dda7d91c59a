"""Where vLLM's worker process (or, with ``--process EngineCore``, the engine core) spends its time,
by py-spy sampling, at concurrency 1 (``--concurrency N``: N requests started together, repeatedly).

Starts one server on the demo pair (spec-off, vLLM's ``draft_model`` or specbeam, γ = 4), keeps one
greedy 64-token request in flight, records the ``VllmWorker`` process with ``py-spy record -f raw``
and prints the share of the worker's samples spent in the target's forward, in the proposer, and
in the proposer's matrix products, with the tokens/s measured before profiling. Needs the ``vllm``
extra and ``pip install py-spy``.

    python benchmarks/profile_vllm_worker.py --config specbeam --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

from specbeam_vllm.server import Server, specbeam_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_vllm import run_level  # noqa: E402

DEMO = os.path.join(HERE, "..", "specbeam_hf", "demo_models")
# (function, end of its file's path) as py-spy names a frame -> what it is
WATCH = {("_model_forward", "v1/worker/gpu_model_runner.py"): "target forward",
         ("propose_draft_token_ids", "v1/worker/gpu_model_runner.py"): "proposer (vLLM's call)",
         ("forward", "torch/nn/modules/linear.py"): "draft nn.Linear, torch GEMM",
         ("_packed_forward", "specbeam_vllm/cpu_gemm.py"): "draft nn.Linear, vLLM GEMM",
         ("forward", "v1/sample/rejection_sampler.py"): "rejection sampler",
         ("_sample", "v1/worker/gpu_model_runner.py"): "sampling (plain or rejection)",
         ("dequeue", "device_communicators/shm_broadcast.py"): "waiting (worker: for the scheduler)",
         ("take_draft_token_ids", "v1/executor/multiproc_executor.py"): "engine core: draft round trip",
         ("sample_tokens", "v1/executor/multiproc_executor.py"): "engine core: sample_tokens round trip"}


def _frame(frame: str) -> tuple[str, str] | None:
    """``name (path/file.py:line)`` -> the WATCH key it is, or None."""
    name, _, where = frame.partition(" (")
    name = name.rsplit(".", 1)[-1]  # newer py-spy qualifies methods: ``GPUModelRunner._model_forward``
    path = where.rsplit(":", 1)[0]
    for key in WATCH:
        if key[0] == name and path.endswith(key[1]):
            return key
    return None


def inclusive_shares(raw_path: str, main_loop: str = "worker_busy_loop") -> tuple[int, Counter]:
    """Samples of the main thread, and how many of them have each function on the stack."""
    total, hits = 0, Counter()
    with open(raw_path) as fh:
        for line in fh:
            stack, count = line.rsplit(" ", 1)
            if f"{main_loop} (" not in stack:
                continue  # other threads (the death-pipe monitor) only wait
            total += int(count)
            for key in {_frame(frame) for frame in stack.split(";")} - {None}:
                hits[key] += int(count)
    return total, hits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["spec-off", "draft_model", "specbeam"], default="specbeam")
    ap.add_argument("--specbeam-options", default="{}")
    ap.add_argument("--extra-flags", default="[]", help='JSON list of further vLLM flags, e.g. \'["--no-async-scheduling"]\'')
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=1, help="requests kept in flight")
    ap.add_argument("--process", default="Worker", help="profile the vLLM process whose name has this (Worker, EngineCore)")
    ap.add_argument("--out", default="/tmp/specbeam-worker-profile.txt", help="py-spy's raw output")
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    draft = os.path.abspath(os.path.join(DEMO, "draft"))
    flags = {"spec-off": [],
             "draft_model": ["--speculative-config", json.dumps(
                 {"method": "draft_model", "model": draft, "num_speculative_tokens": 4})],
             "specbeam": specbeam_flags(draft, 4, **json.loads(args.specbeam_options))}[args.config]
    common = ["--max-model-len", "512", "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "16",
              "--seed", "0"] + json.loads(args.extra_flags)
    with Server(os.path.abspath(os.path.join(DEMO, "target")), flags + common) as server:
        run_level(server.url, server.model, 1, 3, 64, 0.0)  # warm-up
        speed = run_level(server.url, server.model, args.concurrency, 16 * args.concurrency, 64, 0.0)["tokens_per_s"]
        group = subprocess.run(["pgrep", "-g", str(server.process.pid)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in group if args.process in open(f"/proc/{pid}/cmdline").read()]
        if not workers:
            raise SystemExit("no VllmWorker process found in the server's process group")
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                run_level(server.url, server.model, args.concurrency, args.concurrency, 64, 0.0)

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(1.0)
        subprocess.run(["py-spy", "record", "-p", workers[0], "-d", str(args.seconds), "-r", "200", "-f", "raw",
                        "-o", args.out], check=True, capture_output=True)
        stop.set()
        thread.join()
    total, hits = inclusive_shares(args.out, "worker_busy_loop" if args.process == "Worker" else "run_busy_loop")
    print(f"{args.config}: {speed:.1f} tokens/s at concurrency {args.concurrency} (before profiling); "
          f"{total} samples of the {args.process}'s main thread")
    for key, what in WATCH.items():
        print(f"  {what:28s} {100 * hits[key] / max(total, 1):5.1f} %")


if __name__ == "__main__":
    main()
