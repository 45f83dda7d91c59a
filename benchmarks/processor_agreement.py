"""How often the draft's greedy choice is the target's, with and without HF logits processors, on
the target's own greedy continuations (teacher-forced). The demo pair, the 8 code prompts of
``bench_hf.py`` one at a time, ``--max-new-tokens`` tokens each, EOS off. At every generated position
both models' logits go through the same HF processors (built by ``generate``'s own
``_get_logits_processor``) on the same prefix; "target agrees" checks the setup (it must be 100 %).

    python benchmarks/processor_agreement.py

Prints a table and writes ``benchmarks/results/processor_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_hf import PROMPTS, load_demo
from transformers import GenerationConfig

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"none": {}, "repetition_penalty 1.2": dict(repetition_penalty=1.2),
            "no_repeat_ngram_size 3": dict(no_repeat_ngram_size=3),
            "both": dict(repetition_penalty=1.2, no_repeat_ngram_size=3)}


@torch.inference_mode()
def agreement(target, draft, tok, setting: dict, max_new_tokens: int) -> tuple[int, int, int]:
    """(positions, target agrees, draft agrees) over the prompts."""
    positions = target_agrees = draft_agrees = 0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids  # [1, P]
        config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **setting)
        sequence = target.generate(ids, generation_config=config)  # [1, P + new]
        processors = target._get_logits_processor(generation_config=config, input_ids_seq_length=ids.shape[1],
                                                   encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
                                                   logits_processor=None, device=ids.device)
        target_logits = target(sequence).logits[0].float()  # [P + new, vocab]
        draft_logits = draft(sequence).logits[0].float()  # [P + new, vocab]
        for t in range(ids.shape[1], sequence.shape[1]):
            prefix = sequence[:, :t]  # [1, t]
            chosen = int(sequence[0, t])
            target_agrees += int(processors(prefix, target_logits[t - 1 : t].clone()).argmax()) == chosen
            draft_agrees += int(processors(prefix, draft_logits[t - 1 : t].clone()).argmax()) == chosen
            positions += 1
    return positions, target_agrees, draft_agrees


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, target, draft = load_demo()
    rows = []
    print("| processors | positions | target agrees | draft agrees |")
    print("|---|---|---|---|")
    for name, setting in SETTINGS.items():
        n, t, d = agreement(target, draft, tok, setting, args.max_new_tokens)
        rows.append(dict(setting=name, positions=n, target_agreement=t / n, draft_agreement=d / n))
        print(f"| {name} | {n} | {100 * t / n:.1f} % | {100 * d / n:.1f} % |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model="demo pair", prompts=len(PROMPTS), max_new_tokens=args.max_new_tokens, dtype="float32",
                torch=torch.__version__)
    (args.out / "processor_agreement.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
