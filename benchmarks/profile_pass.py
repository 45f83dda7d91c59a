"""Where one speculative pass spends its time: the model forwards against specbeam's own host work.

    python benchmarks/profile_pass.py                    # CPU
    python benchmarks/profile_pass.py --device cuda      # GPU (benchmarks/gpu_check.sh runs it)

For each workload (greedy chain, greedy tree, beam search B = 4 at a fixed depth) on the demo pair:
wall time per target pass, the share of it inside model forwards (target and draft, timed around
``CausalLM.forward`` with a device synchronisation), and the rest, which is specbeam's host work
(drafting bookkeeping, masks, verification, beam replay) plus launch gaps. ``--torch-profile``
adds torch.profiler's top operators by self CPU time; ``--rounds N`` keeps each row's fastest of N
timings. With ``PYTHONPATH`` pointing at another checkout's packages it times that checkout (A/B runs;
the JSON records which one ran).
Prints a table and writes JSON.
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
from specbeam_hf import HFCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import PROMPTS, describe, sync  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"


class ForwardTimer:
    """Wraps the ``forward`` of ``HFCausalLM`` and its subclasses (the fast draft's included) to sum
    their wall time, the device synchronised before and after each call."""

    def __init__(self, target_runner) -> None:
        self.seconds = {"target": 0.0, "draft": 0.0}
        self.calls = {"target": 0, "draft": 0}
        self.target_id = id(target_runner)
        self.originals = {cls: cls.__dict__["forward"] for cls in (HFCausalLM, *HFCausalLM.__subclasses__())
                          if "forward" in cls.__dict__}

    def _wrap(self, original):
        def forward(runner, tokens, kv, num_logits):
            sync()
            t0 = time.perf_counter()
            out = original(runner, tokens, kv, num_logits)
            sync()
            role = "target" if id(runner) == self.target_id else "draft"
            self.seconds[role] += time.perf_counter() - t0
            self.calls[role] += 1
            return out
        return forward

    def __enter__(self):
        for cls, original in self.originals.items():
            cls.forward = self._wrap(original)
        return self

    def __exit__(self, *exc):
        for cls, original in self.originals.items():
            cls.forward = original


def measure(name: str, run, runner) -> dict:
    """One timed ``run()``: wall time per target pass, and the share inside target and draft forwards."""
    with ForwardTimer(runner) as timer:
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - t0
    passes = timer.calls["target"]
    row = {
        "workload": name, "passes": passes, "ms_per_pass": wall / passes * 1e3,
        "target_ms_per_pass": timer.seconds["target"] / passes * 1e3,
        "draft_ms_per_pass": timer.seconds["draft"] / passes * 1e3,
        "draft_forwards_per_pass": timer.calls["draft"] / passes,
    }
    row["host_ms_per_pass"] = row["ms_per_pass"] - row["target_ms_per_pass"] - row["draft_ms_per_pass"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16"], help="run the draft in this dtype (default: --dtype)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--torch-profile", action="store_true", help="also print torch.profiler's top operators")
    p.add_argument("--workloads", default="chain,tree,beam", help="which of chain, tree, beam to time")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each row this many times and keep the fastest")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(DEMO / "target", padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=dtype).to(args.device).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=dtype).to(args.device).eval()
    encs = [tok([q], return_tensors="pt").to(args.device) for q in PROMPTS[: args.prompts]]
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    workloads = {
        "chain γ=4": (dict(num_draft_tokens=4), {}),
        "tree γ=4 w=3": (dict(num_draft_tokens=4, drafter="draft_tree", tree_width=3), {}),
        "beam B=4 depth 3": (dict(beam_adaptive=False, beam_depth=3), dict(num_beams=4, early_stopping=False)),
    }
    console = Console()
    rows = []
    wanted = args.workloads.split(",")
    for name, (options, extra) in workloads.items():
        if name.split()[0] not in wanted:
            continue
        assistant = specbeam_hf.SpecBeam(draft, draft_dtype=args.draft_dtype, **options)
        run = lambda: [target.generate(**e, **common, **extra, custom_generate=specbeam_hf.generate, assistant=assistant)  # noqa: E731
                       for e in encs]
        run()  # warm-up: pools sized, kernels chosen
        beams = "num_beams" in extra
        runner = assistant.beam_searcher_for(target).target if beams else assistant.engine_for(target).target
        rows.append(min((measure(name, run, runner) for _ in range(args.rounds)), key=lambda row: row["ms_per_pass"]))
        if args.torch_profile:
            with torch.profiler.profile() as prof:
                run()
            console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    drafts_in = f" (draft {args.draft_dtype})" if args.draft_dtype not in (None, args.dtype) else ""
    fastest = f", fastest of {args.rounds}" if args.rounds > 1 else ""
    table = Table(title=f"one pass, demo pair, {args.dtype}{drafts_in}, {describe(args.device)}{fastest} (timing syncs the device around each forward)")
    for col in ("workload", "passes", "ms / pass", "target forward", "draft forwards", "draft calls / pass", "specbeam host + gaps"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["workload"], str(r["passes"]), f"{r['ms_per_pass']:.2f}", f"{r['target_ms_per_pass']:.2f}",
                      f"{r['draft_ms_per_pass']:.2f}", f"{r['draft_forwards_per_pass']:.1f}",
                      f"{r['host_ms_per_pass']:.2f} ({r['host_ms_per_pass'] / r['ms_per_pass']:.0%})")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"profile_pass_{args.dtype}" + (f"_draft_{args.draft_dtype}" if drafts_in else "") + f"_{args.device.split(':')[0]}.json")
    meta = {"command": " ".join(["profile_pass.py"] + (argv if argv is not None else sys.argv[1:])),
            "device": describe(args.device), "torch": torch.__version__,
            "specbeam": str(Path(specbeam_hf.__file__).parent.parent)}  # which checkout ran (A/B runs)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
