"""Before/after figures of a draft against its target on held-out text.

* greedy agreement: how often the draft's argmax equals the target's, over held-out positions
  (full-sequence forwards over windows of the held-out stream);
* mean accepted length: tokens a greedy chain of ``gamma`` drafted tokens gains per target pass,
  from specbeam's own statistics, over held-out prompts;
* beam steps per target pass: of exact speculative beam search with ``num_beams`` beams, drafting
  ``beam_depth`` levels every pass (the depth chooser off, so the figure does not depend on timing).
"""

from __future__ import annotations

import torch

from specbeam_hf.assistant import SpecBeam
from specbeam_hf.generate import generate as specbeam_generate


@torch.no_grad()
def greedy_agreement(target, draft, ids: torch.Tensor, positions: int, window: int = 256, batch: int = 8) -> float:
    """Fraction of the first ``positions`` held-out positions where both models' argmax agree."""
    window = min(window, ids.numel())
    count = max(1, min(positions, ids.numel()) // window)
    windows = torch.stack([ids[i * window : (i + 1) * window] for i in range(count)])  # [count, window]
    agree = 0
    for start in range(0, count, batch):
        chunk = windows[start : start + batch].to(target.device)  # [b, window]
        a = target(input_ids=chunk).logits.argmax(-1)  # [b, window]
        d = draft(input_ids=chunk).logits[..., : target.config.vocab_size].argmax(-1)  # [b, window]
        agree += int((a == d).sum())
    return agree / windows.numel()


def _runs(target, assistant, prompts: torch.Tensor, eos: int, **options):
    for prompt in prompts:
        input_ids = prompt.unsqueeze(0).to(target.device)  # [1, prompt_length]
        target.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        custom_generate=specbeam_generate, assistant=assistant, eos_token_id=eos, pad_token_id=eos,
                        **options)
        yield assistant


def chain_accepted_length(target, draft, prompts: torch.Tensor, eos: int, new_tokens: int, gamma: int) -> float:
    """Mean tokens gained per target pass by greedy chains of ``gamma`` drafted tokens (all prompts pooled)."""
    assistant = SpecBeam(draft, num_draft_tokens=gamma)
    gained = passes = 0
    for a in _runs(target, assistant, prompts, eos, do_sample=False, max_new_tokens=new_tokens):
        stats = a.last_stats
        gained += stats.accepted + stats.row_steps
        passes += stats.row_steps
    return gained / passes if passes else 0.0


def beam_steps_per_pass(target, draft, prompts: torch.Tensor, eos: int, new_tokens: int, num_beams: int,
                        depth: int) -> float:
    """Beam steps per target pass of speculative beam search at ``depth`` levels a pass (all prompts pooled)."""
    assistant = SpecBeam(draft, beam_depth=depth, beam_adaptive=False)
    steps = passes = 0
    for a in _runs(target, assistant, prompts, eos, do_sample=False, num_beams=num_beams,
                   max_new_tokens=new_tokens, early_stopping=True):
        steps += a.last_beam_stats.steps
        passes += a.last_beam_stats.target_forwards
    return steps / passes if passes else 0.0


def measure(target, draft, eval_ids: torch.Tensor, prompts: torch.Tensor, eos: int, *, positions: int,
            new_tokens: int, gamma: int = 4, num_beams: int = 4, beam_depth: int = 3) -> dict:
    """The three figures, as a dict."""
    was_training = draft.training
    draft.eval()
    try:
        return {
            "greedy_agreement": greedy_agreement(target, draft, eval_ids, positions),
            "mean_accepted_length": chain_accepted_length(target, draft, prompts, eos, new_tokens, gamma),
            "beam_steps_per_pass": beam_steps_per_pass(target, draft, prompts, eos, new_tokens, num_beams,
                                                       beam_depth),
        }
    finally:
        draft.train(was_training)
