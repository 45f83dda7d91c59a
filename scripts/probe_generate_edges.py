"""Edge cases of ``generate`` against HF's own, on the shipped demo pair (float32, a left-padded
batch of three prompts): the same call with and without ``custom_generate=specbeam_hf.generate``.

Each case prints ``equal`` (sequences token for token; for dict outputs also the largest
``sequences_scores`` / per-step ``scores`` gap) or ``DIFFERENT``; the last case checks that a
request past the target's position limit is refused by name. Exits 1 if any case fails.

    python scripts/probe_generate_edges.py

Not part of CI (about six minutes); the fuzzers (``fuzz_beams.py``, ``fuzz_families.py``) draw
random cases, this lists fixed ones. Plain sampling is left out: it follows HF's distribution, not
its random stream (the statistical tests cover it); beam sampling replays HF's draw under one seed.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_hf import load_demo  # noqa: E402

import specbeam_hf  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "x ="]


def compare(tok, target, draft, prompts, seed=None, **kwargs) -> str:
    """``equal ...`` or ``DIFFERENT``: ``target.generate(**kwargs)`` with and without specbeam."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    outputs = []
    for extra in ({}, dict(custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(target.generate(**enc, **kwargs, **extra))
    ref, out = outputs
    if not torch.equal(getattr(ref, "sequences", ref), getattr(out, "sequences", out)):
        return "DIFFERENT"
    gaps = []
    if getattr(ref, "sequences_scores", None) is not None:
        gaps.append(f"Δ sequences_scores {float((ref.sequences_scores - out.sequences_scores).abs().max()):.1e}")
    if getattr(ref, "scores", None) is not None:
        if len(ref.scores) != len(out.scores):
            return "DIFFERENT (number of score steps)"
        gap = max(float((a - b).nan_to_num(0, 0, 0).abs().max()) for a, b in zip(ref.scores, out.scores))
        gaps.append(f"Δ scores {gap:.1e}")
    return " ".join(["equal", *gaps])


class Boost(LogitsProcessor):
    """A caller's processor that reads the ids: raises the token ``7 × last token mod vocab`` by 2."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[torch.arange(scores.shape[0]), (input_ids[:, -1] * 7) % scores.shape[-1]] += 2.0
        return scores


class TwoLines(StoppingCriteria):
    """A caller's criterion: a row stops once it holds two newlines (prompt included)."""

    def __init__(self, newline: int) -> None:
        self.newline = newline

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids == self.newline).sum(-1) >= 2


def alternating_halves(batch_id: int, ids: torch.Tensor) -> list[int]:
    """``prefix_allowed_tokens_fn``: tokens 0-2047 after an odd length, else 1000-4095 (the ranges overlap)."""
    return list(range(0, 2048)) if len(ids) % 2 else list(range(1000, 4096))


def main() -> int:
    warnings.filterwarnings("ignore")
    tok, target, draft = load_demo(torch.float32, padding_side="left")
    newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
    cases = {
        "beams, 1 new token": dict(num_beams=4, max_new_tokens=1),
        "beams, 2 new tokens, 4 returned": dict(num_beams=4, max_new_tokens=2, num_return_sequences=4),
        "beams, batch 1, 3 returned, scores": dict(prompts=PROMPTS[:1], num_beams=3, num_return_sequences=3, max_new_tokens=20,
                                                  return_dict_in_generate=True, output_scores=True),
        "beam sampling, 2 of 3 returned": dict(seed=5, do_sample=True, num_beams=3, num_return_sequences=2, max_new_tokens=20),
        "greedy, min_new_tokens": dict(max_new_tokens=30, min_new_tokens=10),
        "beams, min_length": dict(num_beams=4, max_new_tokens=30, min_length=15),
        "beams, two EOS ids": dict(num_beams=4, max_new_tokens=30, eos_token_id=[0, newline]),
        "greedy, two EOS ids": dict(max_new_tokens=30, eos_token_id=[0, newline]),
        "beams, a GenerationConfig object": dict(generation_config=GenerationConfig(
            num_beams=4, max_new_tokens=25, length_penalty=0.5, early_stopping=True, pad_token_id=0, eos_token_id=0)),
        "beams, max_length": dict(num_beams=2, max_length=30),
        "beams, no-repeat n-gram + repetition penalty": dict(num_beams=4, max_new_tokens=30, no_repeat_ngram_size=3,
                                                            repetition_penalty=1.3),
        "beams, early_stopping='never', length_penalty -0.5": dict(num_beams=4, max_new_tokens=30, early_stopping="never",
                                                                  length_penalty=-0.5),
        "beams, 6 of 6 returned, bad words": dict(num_beams=6, num_return_sequences=6, max_new_tokens=20,
                                                  bad_words_ids=[[5], [17, 18]]),
        "beams, top_k without sampling": dict(num_beams=4, max_new_tokens=20, top_k=5),
        "greedy, temperature without sampling": dict(max_new_tokens=20, temperature=0.5),
        "beams, renormalize_logits": dict(num_beams=3, max_new_tokens=20, renormalize_logits=True, repetition_penalty=1.2),
        "beams, output_logits": dict(num_beams=3, max_new_tokens=12, return_dict_in_generate=True, output_logits=True),
        "greedy, an empty prompt in the batch": dict(prompts=["", "x"], max_new_tokens=5),
        "greedy, sequence_bias": dict(max_new_tokens=25, sequence_bias={(newline,): -3.0, (5, 6): 2.0}),
        "beams, sequence_bias": dict(num_beams=4, max_new_tokens=25, sequence_bias={(newline,): -3.0}),
        "greedy, suppress_tokens": dict(max_new_tokens=25, suppress_tokens=[newline, 5, 6]),
        "beams, suppress_tokens + begin_suppress_tokens": dict(num_beams=3, max_new_tokens=25, suppress_tokens=[7],
                                                              begin_suppress_tokens=[newline]),
        "greedy, forced_eos_token_id": dict(max_new_tokens=20, forced_eos_token_id=0),
        "beams, forced_eos_token_id": dict(num_beams=4, max_new_tokens=20, forced_eos_token_id=0),
        "greedy, forced_bos_token_id": dict(max_new_tokens=20, forced_bos_token_id=newline),
        "beams, exponential_decay_length_penalty": dict(num_beams=4, max_new_tokens=40, eos_token_id=[0, newline],
                                                        exponential_decay_length_penalty=(10, 1.2)),
        "greedy, prefix_allowed_tokens_fn": dict(max_new_tokens=20, prefix_allowed_tokens_fn=alternating_halves),
        "beams, prefix_allowed_tokens_fn": dict(num_beams=4, max_new_tokens=20, prefix_allowed_tokens_fn=alternating_halves),
        "greedy, a caller's logits processor": dict(max_new_tokens=25, logits_processor=LogitsProcessorList([Boost()])),
        "beams, a caller's logits processor": dict(num_beams=4, max_new_tokens=25, logits_processor=LogitsProcessorList([Boost()])),
        "greedy, a caller's stopping criterion": dict(max_new_tokens=40, stopping_criteria=StoppingCriteriaList([TwoLines(newline)])),
        "beams, a caller's stopping criterion": dict(num_beams=4, max_new_tokens=40,
                                                     stopping_criteria=StoppingCriteriaList([TwoLines(newline)])),
        "beam sampling, min_p": dict(seed=3, do_sample=True, num_beams=4, max_new_tokens=25, min_p=0.1),
        "beam sampling, typical_p + temperature": dict(seed=4, do_sample=True, num_beams=3, max_new_tokens=25, typical_p=0.8,
                                                       temperature=0.7),
        "beam sampling, epsilon_cutoff": dict(seed=6, do_sample=True, num_beams=2, max_new_tokens=25, epsilon_cutoff=3e-4),
        "beam sampling, eta_cutoff": dict(seed=7, do_sample=True, num_beams=2, max_new_tokens=25, eta_cutoff=1e-3),
        "greedy, use_cache=False": dict(max_new_tokens=15, use_cache=False),
        "beams, use_cache=False": dict(num_beams=4, max_new_tokens=15, use_cache=False),
        "beams, length_penalty 0": dict(num_beams=4, max_new_tokens=30, length_penalty=0.0, eos_token_id=[0, newline]),
        "beams, length_penalty 2, early_stopping=True": dict(num_beams=4, max_new_tokens=30, length_penalty=2.0,
                                                             early_stopping=True, eos_token_id=[0, newline]),
        "beams, batch 1, 8 of 8 returned, scores": dict(prompts=PROMPTS[1:2], num_beams=8, num_return_sequences=8,
                                                       max_new_tokens=20, return_dict_in_generate=True, output_scores=True,
                                                       eos_token_id=[0, newline]),
        "greedy, scores and logits": dict(max_new_tokens=20, return_dict_in_generate=True, output_scores=True, output_logits=True),
        "beams, repetition_penalty 0.8": dict(num_beams=2, max_new_tokens=30, repetition_penalty=0.8),
        "greedy, batch 1 without padding": dict(prompts=PROMPTS[:1], max_new_tokens=20),
        "beams, cache_implementation='static'": dict(num_beams=4, max_new_tokens=15, cache_implementation="static"),
    }
    failed = 0
    for name, kwargs in cases.items():
        result = compare(tok, target, draft, kwargs.pop("prompts", PROMPTS), **kwargs)
        failed += not result.startswith("equal")
        print(f"{name:55s} {result}", flush=True)
    name = "past the position limit: refused by name"
    try:  # HF itself only warns there and runs on
        target.generate(**tok(PROMPTS, return_tensors="pt", padding=True), custom_generate=specbeam_hf.generate,
                        assistant=specbeam_hf.SpecBeam(draft), max_new_tokens=target.config.max_position_embeddings)
        result, failed = "DIFFERENT (not refused)", failed + 1
    except ValueError as e:
        ok = "position limit" in str(e)
        result, failed = ("refused" if ok else f"DIFFERENT ({e})"), failed + (not ok)
    print(f"{name:55s} {result}")
    print(f"{len(cases) + 1} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
