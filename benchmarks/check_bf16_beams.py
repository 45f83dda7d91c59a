"""Which beam-search results move with bf16 rounding, and whether they part at a near-tie.

For each prompt of ``bench_trees_beams.py``'s beam benchmark, compare HF ``num_beams=B`` in float32,
HF in bfloat16 and specbeam in bfloat16 (the best sequence of each). Where two of them differ, the
float32 beam search is replayed step by step (a logits processor records the running beams) up to
the step where the differing sequences part, and at every step:

- ``gap``: float32 score of the B-th best (beam, token) candidate minus that of the (B+1)-th, the
  margin by which the step's selection was decided;
- ``err``: the largest |bf16 − fp32| over the step's top 2B candidate scores (beam score plus
  log-prob, both models scoring the same running beams).

A step with ``gap < 2·err`` is a near-tie: bf16 rounding alone can swap the B-th and (B+1)-th
candidates, so either result is the target's beam search up to rounding. The table gives the step
with the smallest gap / err.

    python benchmarks/check_bf16_beams.py --beams 2,4
"""

from __future__ import annotations

import argparse

import torch
from bench_trees_beams import DEMO, PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

import specbeam_hf


class RecordBeams(LogitsProcessor):
    """Records the running beams (``[B, length]`` token ids) at every beam-search step."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(input_ids.clone())
        return scores


@torch.no_grad()
def candidate_scores(model, beams: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``[B * vocab]`` float32 scores of every (beam, next token): the beam's summed log-probs of its
    generated tokens plus the next token's log-prob (HF's running beam score before length penalty)."""
    log_probs = torch.log_softmax(model(beams).logits.float(), -1)  # [B, length, vocab]
    generated = beams[:, prompt_len:]  # [B, t]
    beam_scores = log_probs[:, prompt_len - 1 : -1].gather(-1, generated[..., None]).sum((1, 2))  # [B]
    return (beam_scores[:, None] + log_probs[:, -1]).flatten()  # [B * vocab]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n


def closest_step(models, enc, kwargs, b: int, until: int) -> tuple[int, float, float]:
    """(step, gap, err) at the step up to ``until`` (a position in the sequence) with the smallest gap / err."""
    rec = RecordBeams()
    models[torch.float32].generate(**enc, **kwargs, logits_processor=LogitsProcessorList([rec]))
    prompt_len = enc["input_ids"].shape[1]
    best = (0, float("inf"), 0.0)
    for beams in rec.steps:
        step = beams.shape[1] - prompt_len
        if beams.shape[1] > until:
            break
        fp32 = candidate_scores(models[torch.float32], beams, prompt_len)  # [B * vocab]
        bf16 = candidate_scores(models[torch.bfloat16], beams, prompt_len)  # [B * vocab]
        top, idx = fp32.topk(2 * b)  # [2B]
        gap = float(top[b - 1] - top[b])
        err = float((bf16[idx] - fp32[idx]).abs().max())
        if gap / max(err, 1e-12) < best[1] / max(best[2], 1e-12):
            best = (step, gap, err)
    return best


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
    print("| B | prompt | HF bf16 = HF fp32 | specbeam bf16 = HF bf16 | specbeam bf16 = HF fp32 "
          "| where they differ: closest step before the split (gap, bf16 err) |\n|---|---|---|---|---|---|")
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
            where = ""
            if not all(cells):
                x, y = next(p for p in ((ours, hf16), (hf16, hf32), (ours, hf32)) if not torch.equal(*p))
                split = first_difference(x, y)  # the first sequence position where they differ
                step, gap, err = closest_step(target, enc, kwargs, b, split)
                verdict = "near-tie" if gap < 2 * err else "NOT a near-tie"
                where = f"step {step}: gap {gap:.4f}, err {err:.4f} — {verdict}"
            print(f"| {b} | {prompt!r} | " + " | ".join("yes" if c else "no" for c in cells) + f" | {where} |", flush=True)


if __name__ == "__main__":
    main()
