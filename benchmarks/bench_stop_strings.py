"""What a stop string costs: greedy decoding of the demo pair with HF's ``StopStringCriteria`` for a
string that never occurs (every row runs its full length), HF ``generate`` against specbeam at a
fixed γ. Besides tokens/s it counts the criterion's calls and the seconds spent inside them (the
class's ``__call__`` wrapped for the run), which this shared machine's noise does not blur.

    python benchmarks/bench_stop_strings.py --batches 1,8,32 --repeats 3

Prints a table and writes ``benchmarks/results/bench_stop_strings.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_hf import PROMPTS, load_demo
from transformers import StoppingCriteriaList, StopStringCriteria

import specbeam_hf

RESULTS = Path(__file__).parent / "results"


class CriterionClock:
    """Counts the calls of ``StopStringCriteria`` and the seconds inside them while active."""

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0
        self._original = StopStringCriteria.__call__

    def __enter__(self):
        original = self._original

        def timed(criterion, input_ids, scores, **kwargs):
            start = time.perf_counter()
            try:
                return original(criterion, input_ids, scores, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - start

        StopStringCriteria.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        StopStringCriteria.__call__ = self._original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--stop", default="@@@@", help="the stop string (one that does not occur keeps every row running)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="bench_stop_strings")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, target, draft = load_demo(padding_side="left")
    criteria = StoppingCriteriaList([StopStringCriteria(tok, [args.stop])])
    rows = []
    print("| batch | method | tokens/s | criterion calls | ms in the criterion | share of the run | same as HF |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        enc = tok((PROMPTS * batch)[:batch], return_tensors="pt", padding=True)
        kwargs = dict(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id, stopping_criteria=criteria)
        assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=args.gamma)
        runs = {"hf": lambda: target.generate(**kwargs),
                f"specbeam γ={args.gamma}": lambda: target.generate(**kwargs, custom_generate=specbeam_hf.generate,
                                                                     assistant=assistant)}
        outputs = {m: run() for m, run in runs.items()}  # warm-up, and the outputs compared
        best = {m: (float("inf"), 0, 0.0) for m in runs}  # seconds, calls, seconds in the criterion
        for _ in range(args.repeats):
            for method, run in runs.items():
                with CriterionClock() as clock:
                    start = time.perf_counter()
                    run()
                    seconds = time.perf_counter() - start
                if seconds < best[method][0]:
                    best[method] = (seconds, clock.calls, clock.seconds)
        for method, (seconds, calls, in_criterion) in best.items():
            rows.append(dict(batch=batch, method=method, tokens_per_s=batch * args.max_new_tokens / seconds,
                             criterion_calls=calls, criterion_ms=1e3 * in_criterion, share=in_criterion / seconds,
                             same_as_hf=bool(torch.equal(outputs["hf"], outputs[method]))))
            r = rows[-1]
            print(f"| {batch} | {method} | {r['tokens_per_s']:.1f} | {calls} | {r['criterion_ms']:.1f} | "
                  f"{100 * r['share']:.1f} % | {'yes' if r['same_as_hf'] else 'no'} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model="demo pair", stop=args.stop, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                repeats=args.repeats, threads=args.threads, torch=torch.__version__, dtype="float32")
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
