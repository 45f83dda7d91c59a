"""Benchmark: specbeam through HF ``generate`` against HF's own decoding, on the demo pair.

    python benchmarks/bench_hf.py                       # full run, bf16, writes benchmarks/results/
    python benchmarks/bench_hf.py --quick               # a smoke run (2 prompts, few settings)

Rows (all on the same fixed code prompts, ``--max-new-tokens`` each):

- ``hf``            target-only ``generate`` (greedy or T=0.8 sampling), the baseline;
- ``hf-assisted``   HF assisted generation (``assistant_model=draft``), batch 1 only (HF refuses
                    more), constant schedule with ``assistant_confidence_threshold`` 0 and the
                    default 0.4, and HF's ``heuristic`` schedule;
- ``specbeam``      ``generate(custom_generate=specbeam_hf.generate, assistant=SpecBeam(draft, γ))``.

Beside each specbeam row: α (per-token acceptance: accepted / judged draft positions), c (draft/target forward cost, single-token
decode at batch 1 through the same runner), the analytic bound
``(1 − α^(γ+1)) / ((1 − α)(γc + 1))`` and the share of it reached; ``exact`` says whether greedy
outputs equal the baseline's token for token ("yes"), or differ only from a near-tie of the target's
top-2 logits on (bf16 rounding: "near-tie"), or not ("NO"). Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf
from specbeam_core import build_kv_batch
from specbeam_hf.runner import HFCausalLM

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"
RESULTS = Path(__file__).parent / "results"

PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "    def __repr__(self):\n        return",
    "def read_lines(path):\n    with open(path) as f:\n",
    "for i in range(10):\n",
    "class Point:\n    \"\"\"A point in the plane.\"\"\"\n\n    def __init__(self, x, y):\n",
    "    if not isinstance(value, int):\n        raise",
]


def load_demo(dtype: torch.dtype = torch.float32, padding_side: str = "right"):
    """The shipped demo pair as users load it: ``(tokenizer, target, draft)``, both models in eval mode."""
    tok = AutoTokenizer.from_pretrained(DEMO / "target", padding_side=padding_side)
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=dtype).eval()
    return tok, target, draft


def bound(alpha: float, gamma: int, c: float) -> float:
    """Expected speed-up of chain speculation (Leviathan et al. 2023)."""
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


@torch.inference_mode()
def decode_cost(model, context: int = 64, runs: int = 60) -> float:
    """Median seconds of a single-token decode forward at batch 1 through specbeam's runner."""
    runner = HFCausalLM(model)
    cache = runner.make_cache(2 + (context + runs + 16) // 16, 16)
    seq = cache.new_sequence()
    prompt = torch.randint(1, runner.vocab_size, (1, context))
    runner.forward(prompt, build_kv_batch(cache, [seq], [context], cache.dtype), 1)
    times = []
    for i in range(runs + 5):
        token = torch.randint(1, runner.vocab_size, (1, 1))
        t0 = time.perf_counter()
        runner.forward(token, build_kv_batch(cache, [seq], [1], cache.dtype), 1)
        if i >= 5:
            times.append(time.perf_counter() - t0)
        cache.rollback(seq, 1)
    cache.free(seq)
    return statistics.median(times)


def encode(tokenizer, prompts, batch: int, device: str = "cpu"):
    """Batches of ``batch`` prompts, left-padded, on ``device``."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        out.append(tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True).to(device))
    return out


def sync() -> None:
    """Wait for queued device work before reading a clock (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def describe(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {torch.get_num_threads()} threads"


def write_result(path: Path, script: str, argv, payload: dict, device: str = "cpu") -> None:
    """``payload`` as JSON at ``path``, after a ``meta`` entry: the command line, the device that ran
    the models (the CPU and its threads, or the GPU's name), torch's version."""
    meta = {"command": " ".join([script] + (argv if argv is not None else sys.argv[1:])),
            "device": describe(device), "torch": torch.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **payload}, indent=1))


def run(target, batches, max_new: int, repeats: int, **gen_kwargs):
    """Best-of-``repeats`` wall time over all batches; returns (seconds, new tokens, outputs)."""
    best, outputs, new_tokens = float("inf"), None, 0
    for _ in range(repeats):
        outs, n_new = [], 0
        t0 = time.perf_counter()
        for enc in batches:
            seq = target.generate(**enc, max_new_tokens=max_new, **gen_kwargs)
            outs.append(seq)
            n_new += seq.shape[0] * (seq.shape[1] - enc["input_ids"].shape[1])
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed < best:
            best, outputs, new_tokens = elapsed, outs, n_new
    return best, new_tokens, outputs


def same(a, b) -> bool:
    return all(x.shape == y.shape and bool((x == y).all()) for x, y in zip(a, b))


@torch.inference_mode()
def agreement(target, batches, outs, ref_outs) -> str:
    """"yes" when equal to the baseline; "near-tie" when every row diverges first where the target's
    own top-2 logits (one forward over the baseline's sequence) are within bf16 rounding; else "NO"."""
    if same(outs, ref_outs):
        return "yes"
    for enc, out, ref in zip(batches, outs, ref_outs):
        width = enc["input_ids"].shape[1]
        for row in range(ref.shape[0]):
            a, b = out[row, width:].tolist(), ref[row, width:].tolist()
            j = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
            if j is None:
                continue
            mask = torch.cat([enc["attention_mask"][row], torch.ones(j, dtype=torch.long, device=ref.device)])
            logits = target(input_ids=ref[row : row + 1, : width + j], attention_mask=mask[None]).logits[0, -1].float()
            top2 = logits.topk(2).values
            if float(top2[0] - top2[1]) > max(0.1, 0.05 * abs(float(top2[0]))):
                return "NO"
    return "near-tie"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(DEMO / "target"))
    p.add_argument("--draft", default=str(DEMO / "draft"))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--draft-dtype", default=None, choices=["bfloat16", "float32"],
                   help="run specbeam's draft in this dtype (SpecBeam's draft_dtype; HF assisted generation keeps --dtype)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gammas", default="1,2,3,4,5,6,7,8")
    p.add_argument("--batch-gammas", default="2,3,4,5,6")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--confidence", type=float, default=0.4, help="specbeam's confidence_threshold rows at batch 1 (γ >= 4)")
    p.add_argument("--batch-confidence", type=float, default=0.7, help="the same at batch 8 (γ >= 3)")
    p.add_argument("--quick", action="store_true", help="2 prompts, 32 tokens, a few γ: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="greedy,sample", help="which of greedy, sample to run")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models (and their KV pools) run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = PROMPTS
    gammas = [int(g) for g in args.gammas.split(",") if g]
    batch_gammas = [int(g) for g in args.batch_gammas.split(",") if g]  # empty: no batch-8 rows
    if args.quick:
        prompts, gammas, batch_gammas, args.max_new_tokens = PROMPTS[:2], [2, 4], [4], 32
    dtype = getattr(torch, args.dtype)
    console = Console()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(args.device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(pad_token_id=pad, eos_token_id=None)  # fixed lengths: every run makes max_new_tokens per row

    costed = specbeam_hf.SpecBeam(draft, draft_dtype=args.draft_dtype).draft.model  # the draft specbeam runs (its --draft-dtype copy)
    t_target, t_draft = decode_cost(target), decode_cost(costed)
    c = t_draft / t_target
    console.print(f"decode cost at batch 1: target {t_target * 1e3:.2f} ms, draft {t_draft * 1e3:.2f} ms, c = {c:.4f}")

    rows: list[dict] = []
    b1 = encode(tokenizer, prompts, 1, args.device)
    b8 = encode(tokenizer, prompts, 8, args.device)
    max_new = args.max_new_tokens

    def record(name, batch, mode, gamma, secs, n_new, base_secs, extra=None):
        row = {
            "method": name, "batch": batch, "mode": mode, "gamma": gamma,
            "seconds": secs, "new_tokens": n_new, "tokens_per_s": n_new / secs,
            "speedup": base_secs / secs,
        }
        row.update(extra or {})
        rows.append(row)
        return row

    # warm-up (allocators, first-call overheads)
    target.generate(**b1[0], max_new_tokens=4, do_sample=False, **common)

    modes = args.modes.split(",")
    for mode, batches, batch in (("greedy", b1, 1), ("greedy", b8, 8), ("sample", b1, 1), ("sample", b8, 8)):
        if mode not in modes or not (gammas if batch == 1 else batch_gammas):
            continue
        sampling = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_k=0, top_p=1.0)
        torch.manual_seed(0)
        base_secs, base_new, base_out = run(target, batches, max_new, args.repeats, **sampling, **common)
        record("hf", batch, mode, 0, base_secs, base_new, base_secs)
        console.print(f"[bold]{mode} batch {batch}[/]: HF target-only {base_new / base_secs:.1f} tok/s")

        if batch == 1:
            for gamma in gammas:
                for schedule, threshold in (("constant", 0.0), ("constant", 0.4), ("heuristic", 0.4)):
                    if schedule == "heuristic" and gamma != gammas[0]:
                        continue
                    draft.generation_config.num_assistant_tokens = gamma
                    draft.generation_config.num_assistant_tokens_schedule = schedule
                    draft.generation_config.assistant_confidence_threshold = threshold
                    torch.manual_seed(0)
                    secs, n_new, out = run(target, batches, max_new, args.repeats, assistant_model=draft, **sampling, **common)
                    r = record("hf-assisted", batch, mode, gamma, secs, n_new, base_secs,
                               {"schedule": schedule, "threshold": threshold,
                                "exact": agreement(target, batches, out, base_out) if mode == "greedy" else None})
                    console.print(f"  hf-assisted γ={gamma} {schedule} thr={threshold}: {r['tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}×)")

        settings = [(g, 0.0) for g in (gammas if batch == 1 else batch_gammas)]
        if batch == 1:
            settings += [(g, args.confidence) for g in gammas if g >= 4]
        else:
            settings += [(g, args.batch_confidence) for g in batch_gammas if g >= 3]
        for gamma, confidence in settings:
            assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=gamma, confidence_threshold=confidence, draft_dtype=args.draft_dtype)
            accepted = drafted = steps = rejected = 0

            def one(enc):
                nonlocal accepted, drafted, steps, rejected
                out = target.generate(**enc, max_new_tokens=max_new, custom_generate=specbeam_hf.generate,
                                      assistant=assistant, **sampling, **common)
                s = assistant.last_stats
                accepted, drafted, steps = accepted + s.accepted, drafted + s.drafted, steps + s.row_steps
                rejected += s.recovered
                return out

            best = float("inf")
            for _ in range(args.repeats):
                accepted = drafted = steps = rejected = 0
                torch.manual_seed(0)
                t0 = time.perf_counter()
                outs = [one(enc) for enc in batches]
                sync()
                secs = time.perf_counter() - t0
                if secs < best:
                    best, best_outs, stats = secs, outs, (accepted, drafted, steps, rejected)
            n_new = sum(o.shape[0] * (o.shape[1] - enc["input_ids"].shape[1]) for o, enc in zip(best_outs, batches))
            acc, dra, st, rej = stats
            # α of the analytic model: per judged draft position (positions after a rejection are never judged)
            alpha = acc / (acc + rej) if acc + rej else 0.0
            b = None if confidence else bound(alpha, gamma, c)  # the bound assumes a fixed draft length
            speedup = base_secs / best
            r = record("specbeam", batch, mode, gamma, best, n_new, base_secs, {
                "schedule": "confidence" if confidence else "constant", "threshold": confidence,
                "alpha": alpha, "acceptance_rate": acc / dra if dra else 0.0, "c": c, "bound": b,
                "of_bound": speedup / b if b else None,
                "mean_accepted_length": (acc + st) / st if st else 0.0,
                "exact": agreement(target, batches, best_outs, base_out) if mode == "greedy" else None,
            })
            console.print(
                f"  specbeam γ={gamma}: {r['tokens_per_s']:.1f} tok/s ({speedup:.2f}×), α={alpha:.3f}, "
                + (f"bound {b:.2f}× ({speedup / b:.0%}), " if b else f"confidence {confidence}, ")
                + f"exact={r['exact']}"
            )

    drafts_in = f" (specbeam's draft {args.draft_dtype})" if args.draft_dtype not in (None, args.dtype) else ""
    table = Table(title=f"specbeam vs HF generate — demo pair, {args.dtype}{drafts_in}, {max_new} new tokens, {describe(args.device)}")
    for col in ("method", "batch", "mode", "γ", "setting", "tok/s", "speed-up", "α", "c", "bound", "of bound", "exact"):
        table.add_column(col, justify="right")
    for r in rows:
        setting = f"{r.get('schedule', '')} {r.get('threshold', '')}".strip()
        table.add_row(
            r["method"], str(r["batch"]), r["mode"], str(r["gamma"] or "-"), setting,
            f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}×",
            f"{r['alpha']:.3f}" if "alpha" in r else "", f"{r['c']:.4f}" if "c" in r else "",
            f"{r['bound']:.2f}×" if r.get("bound") else "", f"{r['of_bound']:.0%}" if r.get("of_bound") else "",
            r.get("exact") or "",
        )
    console.print(table)

    summary = {}
    for mode in ("greedy", "sample"):
        for batch in (1, 8):
            sel = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
            ours = max((r for r in sel if r["method"] == "specbeam"), key=lambda r: r["tokens_per_s"], default=None)
            fixed = max((r for r in sel if r["method"] == "specbeam" and r.get("bound")), key=lambda r: r["tokens_per_s"], default=None)
            hf_a = max((r for r in sel if r["method"] == "hf-assisted"), key=lambda r: r["tokens_per_s"], default=None)
            if ours:
                key = f"{mode}_b{batch}"
                summary[key] = {"best_gamma": ours["gamma"], "best_setting": ours.get("schedule"),
                                "speedup_vs_hf": ours["speedup"],
                                "best_fixed_gamma": fixed["gamma"] if fixed else None,
                                "of_bound_at_best_fixed_gamma": fixed["of_bound"] if fixed else None,
                                "vs_hf_assisted_best": ours["tokens_per_s"] / hf_a["tokens_per_s"] if hf_a else None}
    console.print_json(json.dumps(summary))

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "dtype": args.dtype, "draft_dtype": args.draft_dtype or args.dtype, "max_new_tokens": max_new, "prompts": prompts, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "platform": platform.platform(), "processor": platform.processor(),
        "device": describe(args.device),
        "decode_ms": {"target": t_target * 1e3, "draft": t_draft * 1e3}, "c": c,
    }
    stem = f"bench_hf_{args.dtype}" + (f"_draft_{args.draft_dtype}" if args.draft_dtype not in (None, args.dtype) else "") + ("" if args.device == "cpu" else "_" + args.device.split(":")[0]) + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    plot(rows, args.out / f"{stem}.png", args.dtype)
    console.print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


def plot(rows, path: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, batch, style in (("greedy", 1, "o-"), ("sample", 1, "s--"), ("greedy", 8, "^-"), ("sample", 8, "v--")):
        sel = sorted((r for r in rows if r["method"] == "specbeam" and r["mode"] == mode and r["batch"] == batch
                      and not r.get("threshold")), key=lambda r: r["gamma"])
        if not sel:
            continue
        base = next(r for r in rows if r["method"] == "hf" and r["mode"] == mode and r["batch"] == batch)
        label = f"{mode}, batch {batch}"
        line = ax1.plot([r["gamma"] for r in sel], [r["tokens_per_s"] for r in sel], style, label=f"specbeam {label}")[0]
        ax1.axhline(base["tokens_per_s"], color=line.get_color(), linestyle=":", linewidth=1)
        ax2.plot([r["gamma"] for r in sel], [r["alpha"] for r in sel], style, label=label)
    assisted = sorted((r for r in rows if r["method"] == "hf-assisted" and r.get("threshold") == 0.0 and r["mode"] == "greedy"), key=lambda r: r["gamma"])
    if assisted:
        ax1.plot([r["gamma"] for r in assisted], [r["tokens_per_s"] for r in assisted], "x-.", color="gray", label="HF assisted greedy, batch 1")
    ax1.set_xlabel("draft length γ")
    ax1.set_ylabel("new tokens / s (dotted: HF target-only)")
    ax1.set_title(f"throughput ({dtype})")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("draft length γ")
    ax2.set_ylabel("per-token acceptance α")
    ax2.set_ylim(0, 1)
    ax2.set_title("acceptance")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
