"""Cost of one draft proposal (γ draft tokens for one request) on the CPU, with torch's linear
layers and with vLLM's prepacked GEMM (``specbeam_vllm.cpu_gemm``), each with a warm cache and after
a cache flush (what the target's forward does to the draft under vLLM). Needs the ``vllm`` extra.

    python benchmarks/bench_draft_gemm.py --out benchmarks/results/draft_gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM

from specbeam_core import DraftModelDrafter, Request, SamplingParams
from specbeam_hf.fast_draft import draft_causal_lm
from specbeam_vllm.cpu_gemm import use_vllm_cpu_gemm

HERE = os.path.dirname(os.path.abspath(__file__))
DRAFT = os.path.join(HERE, "..", "specbeam_hf", "demo_models", "draft")


def median_ms(drafter: DraftModelDrafter, gamma: int, steps: int, flush: torch.Tensor | None) -> float:
    request = Request(request_id=1, prompt=list(range(5, 60)), params=SamplingParams(), max_new_tokens=400)
    drafter.propose([request], [gamma])
    times = []
    for _ in range(steps):
        # two accepted drafts and the next proposal, as in a verification step
        out = drafter.propose([request], [gamma])
        request.tokens = request.tokens + out.tokens[0, :2].tolist()
        if len(request.tokens) > 400:
            request.tokens = request.tokens[:60]
        if flush is not None:
            flush.add_(1.0)  # streams 48 MB through the cache, as the target's weights do
        started = time.perf_counter()
        out = drafter.propose([request], [gamma])
        times.append(time.perf_counter() - started)
        request.tokens = request.tokens + out.tokens[0, :2].tolist()
    times.sort()
    return 1000 * times[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default=DRAFT)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "draft_gemm.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    flush = torch.randn(12_000_000)  # [12M] float32 = 48 MB, more than the last-level cache
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for gemm in ("torch", "vllm"):
            model = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval()
            if gemm == "vllm" and use_vllm_cpu_gemm(model) == 0:
                raise SystemExit("vLLM is not installed: python -m specbeam_vllm.install")
            drafter = DraftModelDrafter(draft_causal_lm(model), block_size=16)
            drafter.reserve(1, 600)
            for cache in ("warm", "flushed"):
                ms = median_ms(drafter, args.gamma, args.steps, flush if cache == "flushed" else None)
                rows.append({"dtype": str(dtype).split(".")[-1], "gemm": gemm, "cache": cache, "propose_ms": ms})
                print(f"{rows[-1]['dtype']:9s} {gemm:6s} {cache:8s} {ms:6.2f} ms per proposal of {args.gamma}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    print("\n| dtype | GEMM | cache | ms per proposal |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['gemm']} | {r['cache']} | {r['propose_ms']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
