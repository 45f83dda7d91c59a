"""Which beam-search results move with bf16 rounding: for each prompt of ``bench_trees_beams.py``'s
beam benchmark, compare HF ``num_beams=B`` in float32, HF in bfloat16 and specbeam in bfloat16
(the best sequence of each), and print where they agree.

    python benchmarks/check_bf16_beams.py --beams 2,4
"""

from __future__ import annotations

import argparse

import torch
from bench_trees_beams import DEMO, PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beams", default="2,4")
    ap.add_argument("--beam-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--beam-depth", type=int, default=3)
    args = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(DEMO / "target")
    target = {dt: AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=dt).eval()
              for dt in (torch.float32, torch.bfloat16)}
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.bfloat16).eval()
    print("| B | prompt | HF bf16 = HF fp32 | specbeam bf16 = HF bf16 | specbeam bf16 = HF fp32 |\n|---|---|---|---|---|")
    for b in (int(x) for x in args.beams.split(",")):
        kwargs = dict(num_beams=b, max_new_tokens=args.max_new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id or 0, eos_token_id=None, early_stopping=False)
        for prompt in PROMPTS[: args.beam_prompts]:
            enc = tok([prompt], return_tensors="pt")
            hf32 = target[torch.float32].generate(**enc, **kwargs)[0]
            hf16 = target[torch.bfloat16].generate(**enc, **kwargs)[0]
            ours = target[torch.bfloat16].generate(**enc, custom_generate=specbeam_hf.generate,
                                                   assistant=specbeam_hf.SpecBeam(draft, beam_depth=args.beam_depth),
                                                   **kwargs)[0]
            cells = [torch.equal(hf16, hf32), torch.equal(ours, hf16), torch.equal(ours, hf32)]
            print(f"| {b} | {prompt!r} | " + " | ".join("yes" if c else "no" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
