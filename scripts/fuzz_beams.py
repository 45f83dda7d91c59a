"""Fuzz exact speculative beam search on the demo pair: random prompts, batch sizes, beam-search
kwargs and specbeam options; every case must equal ``target.generate`` (sequences, beam_indices,
sequences_scores within 1e-4 absolute / 1e-6 relative: one float32 ulp of a score of 1e3).

    python scripts/fuzz_beams.py --cases 60 --seed 7
    python scripts/fuzz_beams.py --cases 60 --seed 7 --draft-dtype bfloat16   # bf16 drafts, float32 target
    python scripts/fuzz_beams.py --cases 12 --seed 5 --long-prompts           # 120-260-token prompts
    python scripts/fuzz_beams.py --cases 60 --seed 7 --sample 0.7             # beam sampling too, seeded

Prints every failing case and a count; exits 1 if any failed. Not a test: a case runs seconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"
TEXTS = [
    "def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\nimport sys\n\n\ndef main():\n",
    "    def __repr__(self):\n        return", "for i in range(10):\n", "if __name__ == '__main__':\n", "x = [",
    "# Copyright",
]


def long_texts(rng: random.Random, tok, n: int) -> list[str]:
    """``n`` random 120–260-token slices of a standard-library source file (what beams share is long)."""
    ids = tok(Path(sysconfig.get_paths()["stdlib"]).joinpath("argparse.py").read_text(), add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(ids) - 300), rng.randrange(120, 261)
        out.append(tok.decode(ids[start : start + length]))
    return out


def random_case(rng: random.Random, tok, long_prompts: bool = False, sample: float = 0.0) -> tuple[list[str], dict, dict]:
    size = rng.choice([1, 1, 2, 3])
    batch = long_texts(rng, tok, size) if long_prompts else rng.sample(TEXTS, size)
    newline = tok.convert_tokens_to_ids("\n") if "\n" in tok.get_vocab() else None
    kwargs = dict(
        num_beams=rng.choice([2, 3, 4, 6]), max_new_tokens=rng.choice([8, 20, 40]), do_sample=False,
        pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_scores=True,
        early_stopping=rng.choice([True, False, "never"]), length_penalty=rng.choice([1.0, 0.5, 1.5, -1.0]),
        eos_token_id=rng.choice([None, newline, [tok.eos_token_id]]),
    )
    if rng.random() < 0.3:
        kwargs["num_return_sequences"] = rng.randint(1, kwargs["num_beams"])
    if rng.random() < 0.3:
        kwargs["repetition_penalty"] = 1.3
    if rng.random() < 0.2:
        kwargs["no_repeat_ngram_size"] = 3
    options = dict(beam_depth=rng.choice([1, 2, 3, 4]), beam_candidates=rng.choice([None, 4, 8, 12]),
                   beam_adaptive=rng.random() < 0.5)
    if sample and rng.random() < sample:  # beam sampling (drawn only with --sample, so other seeds keep their cases)
        kwargs.update(do_sample=True, temperature=rng.choice([0.3, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 5, 50]),
                      top_p=rng.choice([1.0, 0.9]))
    return batch, kwargs, options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--long-prompts", action="store_true",
                   help="prompts are 120-260-token slices of argparse.py instead of the short code openings")
    p.add_argument("--draft-dtype", default=None, choices=["bfloat16", "float32"],
                   help="run the draft in this dtype in every case (SpecBeam's draft_dtype; default: float32, as loaded)")
    p.add_argument("--sample", type=float, default=0.0,
                   help="chance that a case is beam sampling (do_sample=True; both runs from the same seed)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEMO / "target", padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.float32).eval()
    rng = random.Random(args.seed)
    fails = 0
    for case in range(args.cases):
        batch, kwargs, options = random_case(rng, tok, args.long_prompts, args.sample)
        enc = tok(batch, return_tensors="pt", padding=True)
        torch.manual_seed(case)
        ref = target.generate(**enc, **kwargs)
        torch.manual_seed(case)
        out = target.generate(**enc, **kwargs, custom_generate=specbeam_hf.generate,
                              assistant=specbeam_hf.SpecBeam(draft, draft_dtype=args.draft_dtype, **options))
        same = (torch.equal(ref.sequences, out.sequences) and torch.equal(ref.beam_indices, out.beam_indices)
                and torch.allclose(ref.sequences_scores, out.sequences_scores, atol=1e-4, rtol=1e-6))
        if not same:
            fails += 1
            print(f"FAIL case {case}: {batch!r} {kwargs} {options}", flush=True)
    print(f"{args.cases} cases, {fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
