"""What reading the beams' shared prefix once saves: speculative beam search with the packed scoring
row holding each shared cached key once (as shipped) against holding it once per beam (as before),
and HF's own beam search, the three taking turns in one process on the demo pair.

    python benchmarks/bench_shared_prefix.py
    python benchmarks/bench_shared_prefix.py --depth 3          # a fixed depth: the layouts alone compared
    python benchmarks/bench_shared_prefix.py --rounds 2 --workloads long-prompt
    python benchmarks/bench_shared_prefix.py --device cuda      # models and KV pools on the GPU

Beams are forks of one another in the paged cache: they share the prompt's blocks and the blocks of
every token they have in common. A scoring pass packs the beams' trees into one row; "per beam" is
the earlier layout, where that row read every beam's whole history (B × its length keys, the shared
ones B times over, in every layer); "shared once" reads each (position, slot) pair once
(``PagedKVCache.distinct_slot_table``), so a pass reads and attends the prompt once, not B times.
"Per beam" is emulated by making the cache report no shared blocks, which is what the earlier code
assumed.

Workloads (B = 4, EOS off): the benchmark prompts with 64 and with 256 new tokens, and long prompts
(~``--long-tokens`` tokens of standard-library source each, 64 new tokens: summarising or rewriting
a long input). Each method's time is the sum over prompts of its fastest of ``--rounds`` runs (the
order reversed every round); every run's output is compared with HF's (listed in the JSON and
the exit status 1 where one differs). Also recorded: keys each
scoring pass read (mean over passes of the packed row's keys, per method). Prints a table and writes
JSON (``benchmarks/results/shared_prefix/bench_shared_prefix_b4.json``; ``_b8``, ``_b4_depth3``... for other
options).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import sysconfig
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_core.model as core_model
import specbeam_hf
from specbeam_core import PagedKVCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_depth_chooser import timed  # noqa: E402
from bench_hf import PROMPTS, describe, write_result  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"
LONG_SOURCES = ["textwrap.py", "shlex.py", "bisect.py", "fnmatch.py"]


@contextlib.contextmanager
def per_beam_keys():
    """The earlier layout: the cache reports no shared blocks, so a packed row reads every beam's keys."""
    real = PagedKVCache._shared_spans
    PagedKVCache._shared_spans = lambda self, seq_ids, lengths: None
    try:
        yield
    finally:
        PagedKVCache._shared_spans = real


class KeyCounter:
    """Counts the keys of every packed scoring row (``build_packed_kv_batch``)."""

    def __init__(self) -> None:
        self.keys: list[int] = []
        self._real = core_model.build_packed_kv_batch

    def __enter__(self):
        def counting(*args, **kwargs):
            kv, packed = self._real(*args, **kwargs)
            self.keys.append(kv.kv_length)
            return kv, packed

        core_model.build_packed_kv_batch = counting
        return self

    def __exit__(self, *exc) -> None:
        core_model.build_packed_kv_batch = self._real


def long_prompts(tok, n: int, tokens: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in LONG_SOURCES[:n]:
        ids = tok(stdlib.joinpath(name).read_text(), add_special_tokens=False)["input_ids"][:tokens]
        out.append(tok.decode(ids))
    return out


def workload(target, draft, encs, b: int, max_new: int, rounds: int, depth: int | None) -> dict:
    kwargs = dict(num_beams=b, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    options = {} if depth is None else dict(beam_adaptive=False, beam_depth=depth)
    methods = {"hf": None, "shared once": specbeam_hf.SpecBeam(draft, **options), "per beam": specbeam_hf.SpecBeam(draft, **options)}
    best = {m: [float("inf")] * len(encs) for m in methods}
    steps = {m: [] for m in methods if m != "hf"}
    keys = {m: [] for m in methods if m != "hf"}
    outputs = {m: [[] for _ in encs] for m in methods}  # every run's output, per method and prompt
    for r in range(rounds):
        for i, enc in enumerate(encs):
            for name in list(methods)[:: -1 if r % 2 else 1]:
                layout = per_beam_keys() if name == "per beam" else contextlib.nullcontext()
                with layout, KeyCounter() as counter:
                    seconds, out = timed(target, enc, kwargs, methods[name])
                best[name][i] = min(best[name][i], seconds)
                outputs[name][i].append(out)
                if name != "hf":
                    steps[name].append(methods[name].last_beam_stats.steps_per_target_forward)
                    keys[name].extend(counter.keys)
    expected = [runs[0] for runs in outputs["hf"]]
    differing = [(name, i) for name in steps for i, runs in enumerate(outputs[name])
                 if not all(torch.equal(out, expected[i]) for out in runs)]
    tokens = len(encs) * max_new
    return {
        "beams": b, "prompts": len(encs), "prompt_tokens": [int(e["input_ids"].shape[1]) for e in encs],
        "max_new_tokens": max_new, "rounds": rounds, "differing_from_hf": differing,
        "tokens_per_s": {m: tokens / sum(best[m]) for m in methods},
        "steps_per_pass": {m: sum(s) / len(s) for m, s in steps.items()},
        "keys_per_packed_pass": {m: (sum(k) / len(k) if k else None) for m, k in keys.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="short-64,short-256,long-prompt")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts per workload")
    p.add_argument("--long-tokens", type=int, default=180)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=None,
                   help="draft this many levels every pass (beam_adaptive=False); default: the adaptive depth chooser")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shared_prefix")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEMO / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).to(args.device).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.float32).to(args.device).eval()
    specs = {
        "short-64": (PROMPTS[: args.prompts], 64),
        "short-256": (PROMPTS[: args.prompts], 256),
        "long-prompt": (long_prompts(tok, args.prompts, args.long_tokens), 64),
    }
    timed(target, tok(["def f("], return_tensors="pt").to(args.device), dict(max_new_tokens=4, do_sample=False, pad_token_id=0))  # warm-up
    console = Console(width=200)
    rows = []
    for name in [w for w in args.workloads.split(",") if w]:
        prompts, max_new = specs[name]
        encs = [tok([q], return_tensors="pt").to(args.device) for q in prompts]
        rows.append({"workload": name, **workload(target, draft, encs, args.beams, max_new, args.rounds, args.depth)})
    depth = "adaptive depth" if args.depth is None else f"depth {args.depth}"
    table = Table(title=f"B = {args.beams}, {depth}, demo pair float32, fastest of {args.rounds} rounds, methods taking turns, "
                        f"{describe(args.device)}")
    for col in ("workload", "prompt tokens", "new", "HF tok/s", "shared once tok/s", "×HF", "steps/pass", "keys/pass",
                "per beam tok/s", "×HF ", "steps/pass ", "keys/pass "):
        table.add_column(col, justify="right")
    for r in rows:
        t, s, k = r["tokens_per_s"], r["steps_per_pass"], r["keys_per_packed_pass"]
        fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        table.add_row(r["workload"], ",".join(map(str, r["prompt_tokens"])), str(r["max_new_tokens"]), f"{t['hf']:.1f}",
                      f"{t['shared once']:.1f}", f"{t['shared once'] / t['hf']:.2f}×", f"{s['shared once']:.2f}",
                      fmt(k["shared once"]), f"{t['per beam']:.1f}", f"{t['per beam'] / t['hf']:.2f}×",
                      f"{s['per beam']:.2f}", fmt(k["per beam"]))
    console.print(table)
    suffix = ("" if args.depth is None else f"_depth{args.depth}") + ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}")
    path = args.out / f"bench_shared_prefix_b{args.beams}{suffix}.json"
    write_result(path, "bench_shared_prefix.py", argv, {"workloads": rows}, device=args.device)
    console.print(f"wrote {path}")
    differing = {r["workload"]: r["differing_from_hf"] for r in rows if r["differing_from_hf"]}
    if differing:
        console.print(f"[red]outputs differ from HF's beam search (method, prompt): {differing}[/red]")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
