"""Fuzz specbeam against HF ``generate`` on tiny random models of many transformers families.

Each case builds a random 2-layer target of one family (sliding windows on some) and a draft that is
either the target with noise added or an unrelated model of another family (its own KV shapes;
nearly every draft rejected), then runs greedy decoding (chains, trees or prompt lookup) or beam
search with random kwargs: ragged left-padded batches of 1-3 prompts, EOS ids, ``length_penalty``,
``early_stopping``, ``num_return_sequences``, repetition penalty, ``no_repeat_ngram_size``,
``min_new_tokens``. Every case must equal ``target.generate`` without the assistant: sequences,
``scores`` (and ``logits``) step by step, and for beams ``beam_indices`` and ``sequences_scores``
within 1e-4. After a row's EOS, greedy ``scores`` are not compared: HF scores the pad tokens it
feeds a finished row, specbeam returns 0 at the pad token and -inf elsewhere (README, HF section).

    python scripts/fuzz_families.py --cases 150 --seed 3

Prints every failing case and a count; exits 1 if any failed. The model builder is the one of
``tests/test_model_families.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_model_families import WINDOW, build, perturbed  # noqa: E402

import specbeam_hf  # noqa: E402

FAMILIES = ["llama", "gpt2", "qwen2", "mistral", "phi", "gpt_neox", "gemma2", "opt", "falcon", "qwen3", "olmo2"]
WINDOWED = {"mistral", "gemma2", "qwen2"}
VOCAB = 96


def random_models(rng: random.Random):
    family = rng.choice(FAMILIES)
    window = WINDOW if family in WINDOWED and rng.random() < 0.5 else None
    target = build(family, sliding_window=window, seed=rng.randrange(1000))
    if rng.random() < 0.4:
        return target, perturbed(target, noise=rng.choice([0.005, 0.02, 0.05])), f"{family}(window={window}) / perturbed"
    other = rng.choice(FAMILIES)
    return target, build(other, seed=rng.randrange(1000)), f"{family}(window={window}) / {other}"


def random_inputs(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [rng.randint(1, 12) for _ in range(rng.choice([1, 2, 3]))]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # [batch, width], left-padded with 0
    mask = torch.zeros(len(lengths), width, dtype=torch.long)  # [batch, width]
    gen = torch.Generator().manual_seed(rng.randrange(10**6))
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(2, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def random_kwargs(rng: random.Random) -> tuple[dict, dict]:
    beams = rng.choice([1, 2, 3, 4, 5])
    kwargs = dict(
        max_new_tokens=rng.choice([5, 12, 25]), do_sample=False, pad_token_id=0, num_beams=beams,
        return_dict_in_generate=True, output_scores=True, output_logits=rng.random() < 0.3,
        eos_token_id=rng.choice([None, rng.randrange(2, VOCAB), [rng.randrange(2, VOCAB), rng.randrange(2, VOCAB)]]),
    )
    if beams > 1:
        kwargs.update(early_stopping=rng.choice([True, False, "never"]), length_penalty=rng.choice([1.0, 0.5, 2.0, -1.0]))
        if rng.random() < 0.4:
            kwargs["num_return_sequences"] = rng.randint(1, beams)
        options = dict(beam_depth=rng.choice([1, 2, 3]), beam_candidates=rng.choice([None, 4, 8]),
                       beam_adaptive=rng.random() < 0.5)
    else:
        options = dict(num_draft_tokens=rng.choice([1, 3, 5]), drafter=rng.choice(["draft_model", "draft_tree", "prompt_lookup"]))
    if rng.random() < 0.2:
        kwargs["repetition_penalty"] = 1.3
    if rng.random() < 0.15:
        kwargs["no_repeat_ngram_size"] = 2
    if rng.random() < 0.15:
        kwargs["min_new_tokens"] = 3
    return kwargs, options


def same_steps(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], greedy: bool) -> str | None:
    """None when every step's ``[rows, vocab]`` tensor equals HF's (within 1e-4); else what differs."""
    if len(ours) != len(ref):
        return f"{len(ours)} steps against {len(ref)}"
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a.shape != b.shape:
            return f"step {step}: shape {tuple(a.shape)} against {tuple(b.shape)}"
        if greedy:  # rows already finished: 0 at the pad token, -inf elsewhere (not HF's pad-token scores)
            live = ~((torch.isfinite(a).sum(-1) == 1) & (a[:, 0] == 0))  # [rows]
            a, b = a[live], b[live]
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite):
            return f"step {step}: -inf at other tokens"
        if not torch.allclose(a[finite], b[finite], atol=1e-4, rtol=1e-5):
            return f"step {step}: max difference {(a[finite] - b[finite]).abs().max().item():.2e}"
    return None


def run_case(rng: random.Random) -> tuple[str, str | None]:
    target, draft, models = random_models(rng)
    ids, mask = random_inputs(rng)
    kwargs, options = random_kwargs(rng)
    described = f"{models}, prompt lengths {mask.sum(1).tolist()}, {kwargs}, {options}"
    with torch.no_grad():
        ref = target.generate(input_ids=ids, attention_mask=mask, **kwargs)
    out = target.generate(input_ids=ids, attention_mask=mask, **kwargs,
                          custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft, **options))
    if not torch.equal(out.sequences, ref.sequences):
        return described, f"sequences differ:\n  HF       {ref.sequences.tolist()}\n  specbeam {out.sequences.tolist()}"
    greedy = kwargs["num_beams"] == 1
    if not greedy:
        if not torch.allclose(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-6):
            return described, f"sequences_scores {out.sequences_scores.tolist()} against {ref.sequences_scores.tolist()}"
        if not torch.equal(out.beam_indices, ref.beam_indices):
            return described, "beam_indices differ"
    for field in ("scores", "logits"):
        if getattr(ref, field) is not None:
            problem = same_steps(getattr(out, field), getattr(ref, field), greedy)
            if problem:
                return described, f"{field}: {problem}"
    return described, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    fails = 0
    for case in range(args.cases):
        try:
            described, problem = run_case(rng)
        except Exception:  # a crash is a failure too, reported with its case
            fails += 1
            print(f"ERROR case {case}:\n{traceback.format_exc()}", flush=True)
            continue
        if problem:
            fails += 1
            print(f"FAIL case {case}: {described}\n  {problem}", flush=True)
    print(f"{args.cases} cases, {fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
