"""How far the draft's trees reach into the target's beam search: the draft rank of the beams the
target selects, level by level.

    python benchmarks/beam_coverage.py                       # B = 2, 4, 8; 8 prompts x 64 tokens
    python benchmarks/beam_coverage.py --beams 4 --prompts 4

A speculative beam pass covers one more beam step for every drafted level at which **every** beam the
target selects is a node of the trees (``specbeam_core.beam_search``). At each level the draft ranks
its candidate (beam, token) pairs by its own cumulative score, and the tree keeps the best
``beam_candidates`` of them (default ``num_beams + 2``); the best ``num_beams`` are expanded to the
next level. This script drafts a fixed ``--depth`` with ``--width`` candidates per level (wide, so that
ranks past the default width are seen) and, at each step the target replays, records the worst draft
rank among the beams it selected ("needed rank"; "not in tree" when some selected beam is not among
the ``--width`` candidates, e.g. because its parent was not expanded). For every level, over the
passes whose earlier levels were all covered, it prints the share of steps a tree of 4, 6, 8, ... best
candidates would have covered. The ranks of the candidates below the default width are those the
default drafter orders the same way, so the ``B + 2`` column is the default's chance to go on.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf
from specbeam_core import beam_state

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import PROMPTS, write_result  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"


class Recorder:
    """Watches one speculative beam search: the draft's ranked candidates of each pass (read from
    ``BeamTreeDrafter.last_levels``) and the beams the target selects at each replayed step."""

    def __init__(self, drafter) -> None:
        self.drafter = drafter
        self.passes: list[dict] = []  # {"levels": [{prompt: [key, ...]}], "steps": [[key, ...], ...]}
        self._trees = drafter.trees
        self._step = beam_state.BeamSearchState.step

    def __enter__(self):
        recorder = self

        def trees(*args, **kwargs):
            out = recorder._trees(*args, **kwargs)
            recorder.passes.append({"levels": [dict(level) for level in recorder.drafter.last_levels], "steps": []})
            return out

        def step(state, log_probs, stop):
            out = recorder._step(state, log_probs, stop)
            if recorder.passes:
                recorder.passes[-1]["steps"].append([(b, g) for b, beams in enumerate(state.running_generated()) for g in beams])
            return out

        self.drafter.trees = trees
        beam_state.BeamSearchState.step = step
        return self

    def __exit__(self, *exc):
        del self.drafter.trees
        beam_state.BeamSearchState.step = self._step

    def needed_ranks(self, num_beams: int) -> list[list[int | str]]:
        """Per pass, per drafted level in order (up to the first not covered even at full width): the
        worst draft rank among the beams the target selected at that step; ``"parent"`` where a
        selected beam descends from a node the draft did not expand (ranked ``num_beams`` or lower
        at the level before), ``"token"`` where its token is not among the recorded candidates."""
        out = []
        for p in self.passes:
            ranks: list[int | str] = []
            for level, keys in enumerate(p["steps"][: len(p["levels"])]):
                worst: int | str = 0
                for b, gen in keys:
                    ranked = p["levels"][level].get(b, [])
                    if (b, gen) in ranked:
                        worst = max(worst, ranked.index((b, gen))) if isinstance(worst, int) else worst
                        continue
                    parents = p["levels"][level - 1].get(b, []) if level else []
                    if level and (b, gen[:-1]) not in parents[:num_beams]:
                        worst = "parent"
                        break
                    worst = "token"
                ranks.append(worst)
                if not isinstance(worst, int):
                    break
            out.append(ranks)
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beams", default="2,4,8")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=16, help="candidates kept per level and prompt while recording")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(DEMO / "target", padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=dtype).eval()
    encs = [tok([q], return_tensors="pt") for q in PROMPTS[: args.prompts]]
    console = Console()
    results = []
    for b in [int(x) for x in args.beams.split(",") if x]:
        assistant = specbeam_hf.SpecBeam(draft, beam_depth=args.depth, beam_candidates=args.width, beam_adaptive=False)
        kwargs = dict(num_beams=b, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=None, early_stopping=False)
        ranks = []
        for e in encs:
            expected = target.generate(**e, **kwargs)
            searcher = assistant.beam_searcher_for(target)
            with Recorder(searcher.drafter) as rec:
                out = target.generate(**e, **kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
            if not torch.equal(out, expected):
                raise AssertionError(f"beam search with B = {b} differs from HF's on {tok.decode(e['input_ids'][0])!r}")
            ranks += rec.needed_ranks(b)
        widths = sorted({b, b + 2, 2 * b, args.width} | {w for w in (4, 6, 8, 12) if b <= w <= args.width})
        for w in widths:
            # a tree of the best w candidates per level covers a level when every selected beam ranks < w
            covered = [next((i for i, x in enumerate(r) if not (isinstance(x, int) and x < w)), len(r)) for r in ranks]
            row = {"beams": b, "width": w, "passes": len(ranks), "steps_per_pass": 1 + sum(covered) / len(ranks), "levels": []}
            for level in range(args.depth):
                reached = [r[level] for r, c in zip(ranks, covered) if c >= level and len(r) > level]
                if reached:
                    row["levels"].append({
                        "level": level + 1, "reached": len(reached),
                        "covered": sum(1 for x in reached if isinstance(x, int) and x < w) / len(reached),
                        "parent_not_expanded": sum(1 for x in reached if x == "parent") / len(reached),
                    })
            results.append(row)
        console.print(f"B = {b}: {len(ranks)} passes recorded")
    table = Table(title=f"draft trees of the best w candidates per level: share of steps covered (demo pair, {args.dtype}, "
                        f"depth {args.depth}, {args.prompts} prompts x {args.max_new_tokens} tokens, EOS off)")
    for col in ("B", "w", *[f"level {i + 1}: covered (parent not expanded)" for i in range(args.depth)], "beam steps per pass"):
        table.add_column(col, justify="right")
    for r in results:
        cells = [f"{lv['covered']:.0%} ({lv['parent_not_expanded']:.0%}) of {lv['reached']}" for lv in r["levels"]]
        table.add_row(str(r["beams"]), str(r["width"]), *(cells + [""] * (args.depth - len(cells))), f"{r['steps_per_pass']:.2f}")
    console.print(table)
    path = args.out / f"beam_coverage_{args.dtype}.json"
    write_result(path, "beam_coverage.py", argv, {"rows": results})
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
