"""Deliberately broken variants of specbeam's exactness-critical code ("mutants").

Each :class:`Mutant` names the real object it replaces and a function that builds the broken
version from the real one. ``apply(mutant, monkeypatch)`` swaps it in wherever specbeam's modules
hold it (a function is rebound in every ``specbeam_*`` and ``test_*`` module that imported it, so
the swap follows the code when it moves between modules; a method is replaced on its class). ``test_mutants.py``
then runs the suite's own checks — the very test functions the real code passes — and requires
each to fail. A new mutant is one entry in :data:`MUTANTS`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

import specbeam_core
from specbeam_core import BeamSearchState, VerifyResult
from specbeam_core.beam_state import NEG
from specbeam_core.sampling import sample
from specbeam_hf import HFCausalLM


@dataclass(frozen=True)
class Check:
    """One test function of the suite, called with these arguments (fixtures fill the rest)."""

    module: str  # test module name, e.g. "test_sampling"
    function: str
    kwargs: dict = field(default_factory=dict)
    label: str = ""  # the parameters as the table shows them (default: the kwargs' values)

    def __str__(self) -> str:
        args = self.label or ",".join(f"{v}" for v in self.kwargs.values())
        return f"{self.module}.py::{self.function}" + (f"[{args}]" if args else "")


@dataclass(frozen=True)
class Mutant:
    name: str
    owner: object  # a module (its function is rebound everywhere) or a class (its attribute replaced)
    attr: str
    make: Callable[[Callable], Callable]  # real -> broken
    checks: tuple[Check, ...]
    doc: str = ""


def apply(mutant: Mutant, monkeypatch) -> int:
    """Swap the mutant in; returns how many places now hold it (at least one)."""
    real = getattr(mutant.owner, mutant.attr)
    broken = mutant.make(real)
    if isinstance(mutant.owner, type):
        monkeypatch.setattr(mutant.owner, mutant.attr, broken)
        return 1
    places = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith(("specbeam_core", "specbeam_hf", "test_")) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is real:
                monkeypatch.setattr(module, attr, broken)
                places += 1
    assert places, f"{mutant.name}: {mutant.attr} is bound nowhere"
    return places


# ---------------------------------------------------------------------------- the broken variants


def residual_skipped(real):
    """Chain verifier that, after a rejection, draws the recovered token from p itself instead of
    normalise(max(0, p - q)) (the acceptance rule is right)."""

    def verify(draft_tokens, num_draft, target_probs, draft_probs, generators) -> VerifyResult:
        n_rows, g_max = draft_tokens.shape
        within = torch.arange(g_max)[None, :] < torch.tensor(num_draft)[:, None]
        p_draft = target_probs[:, :g_max].gather(2, draft_tokens[:, :, None]).squeeze(2)
        q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs.gather(2, draft_tokens[:, :, None]).squeeze(2)
        uniform = torch.ones(n_rows, g_max, dtype=target_probs.dtype)
        for r, g in enumerate(num_draft):
            if g:
                uniform[r, :g] = torch.rand(g, generator=generators[r], dtype=target_probs.dtype)
        accept = (uniform * q_draft < p_draft) & within
        num_accepted = accept.int().cumprod(dim=1).sum(dim=1).tolist()
        p_next = target_probs[torch.arange(n_rows), torch.tensor(num_accepted)]  # WRONG: p even after a rejection
        drafts = draft_tokens.tolist()
        outputs = [drafts[r][: num_accepted[r]] + [int(sample(p_next[r : r + 1], generators[r]))] for r in range(n_rows)]
        return VerifyResult(num_accepted, outputs, [num_accepted[r] == num_draft[r] for r in range(n_rows)])

    return verify


def accept_everything(real):
    """Chain verifier that keeps every draft token, then a bonus token from the target."""

    def verify(draft_tokens, num_draft, target_probs, draft_probs, generators) -> VerifyResult:
        outputs = []
        for r, g in enumerate(num_draft):
            bonus = int(sample(target_probs[r, g][None], generators[r]))
            outputs.append(draft_tokens[r, :g].tolist() + [bonus])
        return VerifyResult(list(num_draft), outputs, [True] * len(num_draft))

    return verify


def tree_without_residual(real):
    """Tree verifier whose siblings are all tried against the unchanged p (no residual update)."""
    return functools.partial(real, update_residual=False)


def greedy_off_by_one(real):
    """Greedy verifier that compares draft token i with the target's argmax at position i + 1
    (logits misaligned by one position)."""

    def verify(draft_tokens, num_draft, target_logits):
        shifted = torch.cat([target_logits[:, 1:], target_logits[:, -1:]], dim=1)
        return real(draft_tokens, num_draft, shifted)

    return verify


def drops_a_finished_hypothesis(real):
    """Beam replay that forgets the first hypothesis each prompt finishes (its score and its
    finished flag are cleared right after the step that stored it)."""

    def step(self, log_probs, stop):
        real(self, log_probs, stop)
        dropped = self.__dict__.setdefault("_mutant_dropped", set())
        for b in range(self.batch):
            if b not in dropped and bool(self.is_sent_finished[b].any()):
                i = int(torch.where(self.is_sent_finished[b], self.beam_scores[b], NEG).argmax())
                self.beam_scores[b, i], self.is_sent_finished[b, i] = NEG, False
                dropped.add(b)

    return step


def bf16_ulps(x: torch.Tensor) -> torch.Tensor:
    """bfloat16's unit in the last place at ``|x|`` (8 significand bits): ``2^(floor(log2|x|) - 7)``."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=2.0**-126))) - 7)


def logit_noise(ulps: float, seed: int = 0):
    """Greedy verifier that sees the target's logits plus Gaussian noise of standard deviation
    ``ulps`` bf16 ulps of each position's top logit (the rounding scale at that position)."""

    def make(real):
        gen = torch.Generator().manual_seed(seed)

        def verify(draft_tokens, num_draft, target_logits):
            logits = target_logits.float()
            sigma = ulps * bf16_ulps(logits.max(dim=-1, keepdim=True).values)
            return real(draft_tokens, num_draft, logits + sigma * torch.randn(logits.shape, generator=gen))

        return verify

    return make


def forward_noise(ulps: float, seed: int = 0):
    """A model wrapper (``HFCausalLM.forward``) whose logits carry Gaussian noise of ``ulps`` bf16
    ulps of each position's top logit: the beam search's scores, the draft's too (harmless there)."""

    def make(real):
        gen = torch.Generator().manual_seed(seed)

        def forward(self, tokens, kv, num_logits):
            logits = real(self, tokens, kv, num_logits)
            sigma = ulps * bf16_ulps(logits.max(dim=-1, keepdim=True).values)
            return logits + sigma * torch.randn(logits.shape, generator=gen)

        return forward

    return make


# ---------------------------------------------------------------------------- what must catch them

SAMPLING_ENGINE = tuple(Check("test_sampling", "test_speculative_sampling_is_exact", {"case": c})
                        for c in ("temperature", "top_k", "top_p", "all"))
CHAIN_ONE_HOT = Check("test_sampling", "test_chain_verifier_per_position_chi_square", {"drafts": "one_hot"})
CHAIN_SAMPLED = Check("test_sampling", "test_chain_verifier_per_position_chi_square", {"drafts": "sampled_from_q"})
BF16_DEMO = Check("test_demo_pair", "test_demo_pair_bf16_greedy_up_to_near_ties")


def bf16_family(family: str, lengths: list[int], seed: int) -> Check:
    return Check("test_bf16", "test_bf16_greedy_matches_up_to_near_ties", {"family": family, "lengths": lengths, "seed": seed})


MUTANTS: tuple[Mutant, ...] = (
    Mutant("residual_skipped", specbeam_core, "verify_rejection_sampling", residual_skipped,
           (CHAIN_ONE_HOT, CHAIN_SAMPLED, *SAMPLING_ENGINE)),
    Mutant("accept_everything", specbeam_core, "verify_rejection_sampling", accept_everything,
           (CHAIN_ONE_HOT, CHAIN_SAMPLED, *SAMPLING_ENGINE)),
    Mutant("tree_without_residual", sys.modules["specbeam_core.tree_verification"], "verify_tree_rejection_sampling",
           tree_without_residual,
           (Check("test_tree_decoding", "test_tree_verifier_per_node_chi_square"),
            Check("test_tree_decoding", "test_tree_sampling_is_exact", {"case": "temperature"}),
            Check("test_tree_decoding", "test_tree_sampling_is_exact", {"case": "all"}),
            # prompt lookup proposes its drafts as trees (chains): one child per level, so here the
            # missing residual update is the chain verifier's skipped residual
            Check("test_prompt_lookup", "test_engine_sampling_follows_the_target"))),
    Mutant("greedy_off_by_one", specbeam_core, "verify_greedy", greedy_off_by_one,
           (Check("test_greedy_hf", "test_greedy_equals_hf", {"family": "llama", "gamma": 3, "lengths": [7]}),
            Check("test_greedy_hf", "test_eos_inside_draft", {"self_draft": True, "gamma": 3}))),
    Mutant("drops_a_finished_hypothesis", BeamSearchState, "step", drops_a_finished_hypothesis,
           (Check("test_beam_search", "test_core_spec_beam_search_equals_hf", {"with_drafter": True}),
            Check("test_beam_search", "test_beam_search_equals_hf_with_eos",
                  {"num_beams": 2, "lengths": [5, 9], "length_penalty": 1.0, "early_stopping": False, "nrs": 1}),
            Check("test_beam_search", "test_beam_search_equals_hf_with_eos",
                  {"num_beams": 4, "lengths": [5, 9], "length_penalty": 0.5, "early_stopping": True, "nrs": 1}))),
    # sigma in bf16 ulps of each position's top logit (0.0625 on the demo pair's top logits of 8-16,
    # 0.0078 on the tiny models' of 1-2); the bf16 checks allow a divergence within 4 ulps. Each
    # check below catches its sigma with this noise seed (docs/testing.md: which catch which)
    Mutant("beam_logit_noise_4ulp", HFCausalLM, "forward", forward_noise(4.0),
           (Check("test_demo_pair", "test_demo_pair_bf16_beam_search_up_to_rounding",
                  {"num_beams": 2, "prompts": ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n"]},
                  label="2 beams, 2 prompts"),)),
    Mutant("logit_noise_2ulp", specbeam_core, "verify_greedy", logit_noise(2.0),
           (BF16_DEMO, bf16_family("llama", [4, 10, 6], 3), bf16_family("gpt2", [4, 10, 6], 0))),
    Mutant("logit_noise_4ulp", specbeam_core, "verify_greedy", logit_noise(4.0),
           (BF16_DEMO, bf16_family("llama", [7], 0), bf16_family("llama", [4, 10, 6], 0),
            bf16_family("qwen2", [7], 0), bf16_family("qwen2", [4, 10, 6], 0))),
)


def scan_noise(ulps=(0.5, 1, 1.5, 2, 3, 4, 6, 8), seeds=(0, 1, 2)) -> None:
    """Print, for each bf16 check, which noise levels (in bf16 ulps of the top logit) it catches
    under each noise seed ("X" caught, "." passed): ``python tests/mutants.py``."""
    import contextlib

    import pytest

    torch.set_num_threads(1)
    import test_bf16
    import test_demo_pair

    checks = {"demo pair": test_demo_pair.test_demo_pair_bf16_greedy_up_to_near_ties}
    for family in ("llama", "qwen2", "gpt2"):
        for seed in (0, 3):
            for lengths in ([7], [4, 10, 6]):
                checks[f"{family} seed {seed} batch {len(lengths)}"] = functools.partial(
                    test_bf16.test_bf16_greedy_matches_up_to_near_ties, family, lengths, seed)
    print(f"{'check':24s} " + " ".join(f"{u:>{len(seeds)}g}" for u in ulps) + "   (sigma in ulps; one column per noise seed)")
    for name, check in checks.items():
        marks = []
        for u in ulps:
            cell = ""
            for s in seeds:
                with pytest.MonkeyPatch.context() as mp, contextlib.suppress(AssertionError):
                    apply(Mutant("noise", specbeam_core, "verify_greedy", logit_noise(u, s), ()), mp)
                    check()
                    cell += "."
                    continue
                cell += "X"
            marks.append(cell)
        print(f"{name:24s} " + " ".join(marks), flush=True)


if __name__ == "__main__":
    scan_noise()
