"""The decoding modes compared, each run through HF ``generate`` on the same prompts.

- ``greedy``       the target's own greedy search (``target.generate``), the baseline;
- ``beam``         the target's own beam search, ``num_beams`` beams, all of them returned;
- ``speculative``  exact speculative decoding with draft chains of γ tokens (``SpecBeam(draft, γ)``);
- ``spec_beam``    exact speculative beam search (``SpecBeam(draft)`` with ``num_beams``);
- ``tree``         speculative decoding with draft token trees (``drafter="draft_tree"``).

Every row generates exactly ``max_new_tokens`` per prompt (no EOS stop), batch 1, so tokens/s is
comparable across modes; a warm-up call per mode runs first (KV pools, allocator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("greedy", "beam", "speculative", "spec_beam", "tree")
BASELINE = {"speculative": "greedy", "tree": "greedy", "spec_beam": "beam"}  # must equal these token for token


@dataclass(frozen=True)
class ModeSpec:
    mode: str
    gamma: int = 4  # draft length (chains) or tree depth
    num_beams: int = 4
    tree_width: int = 3
    tree_budget: int | None = None  # default width × depth

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")

    @property
    def beams(self) -> bool:
        return self.mode in ("beam", "spec_beam")

    @property
    def speculative(self) -> bool:
        return self.mode in ("speculative", "spec_beam", "tree")

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mode in ("speculative", "tree"):
            out["gamma"] = self.gamma
        if self.beams:
            out["num_beams"] = self.num_beams
        if self.mode == "tree":
            out["tree_width"] = self.tree_width
            out["tree_budget"] = self.tree_budget if self.tree_budget is not None else self.tree_width * self.gamma
        return out

    def label(self) -> str:
        s = self.settings()
        return self.mode + "".join(f" {k.replace('tree_', '')}={v}" for k, v in s.items())


@dataclass
class ModeRun:
    """What one mode produced over all prompts."""

    spec: ModeSpec
    outputs: list[list[list[int]]]  # [prompt][beam] new token ids (one "beam" for non-beam modes), best first
    seconds: float  # generate() wall time summed over prompts (warm-up excluded)
    new_tokens: int  # new tokens of the best sequence, summed over prompts
    stats: dict[str, float] = field(default_factory=dict)  # acceptance / passes (speculative modes)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def make_assistant(spec: ModeSpec, draft):
    import specbeam_hf

    if spec.mode == "speculative":
        return specbeam_hf.SpecBeam(draft, num_draft_tokens=spec.gamma)
    if spec.mode == "tree":
        return specbeam_hf.SpecBeam(draft, num_draft_tokens=spec.gamma, drafter="draft_tree",
                                    tree_width=spec.tree_width, tree_budget=spec.tree_budget)
    if spec.mode == "spec_beam":
        return specbeam_hf.SpecBeam(draft)
    return None


def _generate_kwargs(spec: ModeSpec, pad_id: int, max_new_tokens: int, assistant) -> dict[str, Any]:
    import specbeam_hf

    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=None,
        return_dict_in_generate=True,
    )
    if spec.beams:
        kwargs.update(num_beams=spec.num_beams, num_return_sequences=spec.num_beams, early_stopping=False)
    if assistant is not None:
        kwargs.update(custom_generate=specbeam_hf.generate, assistant=assistant)
    return kwargs


@torch.inference_mode()
def run_mode(
    spec: ModeSpec, target, draft, prompts: list[list[int]], pad_id: int, max_new_tokens: int, repeats: int = 1
) -> ModeRun:
    """Run ``spec`` on every prompt (batch 1); returns outputs, time and speculation statistics.

    With ``repeats`` > 1 the whole pass over the prompts runs that many times and the fastest is kept
    (greedy decoding: outputs and statistics are the same every time)."""
    best: ModeRun | None = None
    for _ in range(repeats):
        run = _run_once(spec, target, draft, prompts, pad_id, max_new_tokens)
        if best is None or run.seconds < best.seconds:
            best = run
    return best


def _run_once(spec: ModeSpec, target, draft, prompts: list[list[int]], pad_id: int, max_new_tokens: int) -> ModeRun:
    assistant = make_assistant(spec, draft)
    kwargs = _generate_kwargs(spec, pad_id, max_new_tokens, assistant)
    warm = dict(kwargs, max_new_tokens=min(4, max_new_tokens))
    target.generate(input_ids=torch.tensor([prompts[0]]), **warm)  # warm-up: KV pools, allocator

    outputs: list[list[list[int]]] = []
    seconds = 0.0
    totals = dict.fromkeys(
        ("drafted", "accepted", "recovered", "bonus", "row_steps", "target_forwards", "beam_steps"), 0
    )
    for prompt in prompts:
        ids = torch.tensor([prompt])  # [1, P]
        started = time.perf_counter()
        out = target.generate(input_ids=ids, **kwargs)
        seconds += time.perf_counter() - started
        sequences = out.sequences[:, ids.shape[1] :]  # [beams or 1, N] new tokens only, best beam first
        outputs.append([row.tolist() for row in sequences])
        if spec.mode in ("speculative", "tree"):
            s = assistant.last_stats
            for k in ("drafted", "accepted", "recovered", "bonus", "row_steps", "target_forwards"):
                totals[k] += getattr(s, k)
        elif spec.mode == "spec_beam":
            s = assistant.last_beam_stats
            totals["beam_steps"] += s.steps
            totals["target_forwards"] += s.target_forwards
    new_tokens = sum(len(o[0]) for o in outputs)
    stats: dict[str, float] = {}
    if spec.mode in ("speculative", "tree"):
        judged = totals["accepted"] + totals["recovered"]
        stats = {
            "drafted": totals["drafted"],
            "accepted": totals["accepted"],
            "recovered": totals["recovered"],
            "bonus": totals["bonus"],
            "target_forwards": totals["target_forwards"],
            "acceptance_rate": totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0,
            "per_token_acceptance": totals["accepted"] / judged if judged else 0.0,
            "tokens_per_target_pass": (totals["accepted"] + totals["row_steps"]) / totals["row_steps"]
            if totals["row_steps"]
            else 0.0,
        }
    elif spec.mode == "spec_beam":
        stats = {
            "target_forwards": totals["target_forwards"],
            "beam_steps_per_target_pass": totals["beam_steps"] / totals["target_forwards"]
            if totals["target_forwards"]
            else 0.0,
        }
    return ModeRun(spec, outputs, seconds, new_tokens, stats)
