"""The core drives a model written in plain torch (``tests/plain_torch_lm.py``), not only HF models.

Every other test reaches the core through ``specbeam_hf.HFCausalLM``. Here a hand-written
transformer implements ``specbeam_core.CausalLM`` directly, as a framework or an inference server
of one's own would, and the engine's outputs are checked against that model decoded the plain way
(whole sequences recomputed every step, no cache, no speculation): greedy token for token with
chains, trees and two merged drafts; beam search against a plain beam search over all
``num_beams x vocab`` continuations; sampling against the exact joint distribution (the
statistical test of ``tests/test_sampling.py``, same tolerance); and in a fresh interpreter, with
neither transformers nor vLLM ever imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_pools_free
from plain_torch_lm import PlainTorchLM
from specbeam_core import BeamTreeDrafter, DraftModelDrafter, SamplingParams, SpecBeamSearch, SpecEngine
from specbeam_core.drafting_tree import DraftTreeDrafter, MergedTreeDrafter
from test_sampling import DELTA, P_MIN, empirical, fit

PROMPTS = [[5, 9, 2, 31, 7], [17], [3, 3, 8, 40, 22, 11, 6, 29, 1]]


@pytest.fixture(scope="module")
def plain_pair():
    target = PlainTorchLM(seed=0)
    return target, target.perturbed(noise=0.05, seed=1)


def plain_greedy(model: PlainTorchLM, prompt: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(model.full_logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def plain_beam_search(model: PlainTorchLM, prompt: list[int], num_beams: int, num_tokens: int):
    """Keep the ``num_beams`` best of all ``beams x vocab`` continuations, ``num_tokens`` times (no EOS).
    Returns the beams best first and their summed log-probabilities."""
    beams = torch.tensor([prompt])  # [beams, L]
    sums = torch.zeros(1, dtype=torch.float64)  # [beams]
    for _ in range(num_tokens):
        log_probs = torch.log_softmax(model.full_logits(beams)[:, -1], dim=-1).double()  # [beams, V]
        top = (sums[:, None] + log_probs).reshape(-1).topk(num_beams)
        parent, token = top.indices // log_probs.shape[1], top.indices % log_probs.shape[1]
        beams = torch.cat([beams[parent], token[:, None]], dim=1)
        sums = top.values
    return beams[:, len(prompt):], sums


def drafter_for(kind: str, target: PlainTorchLM, draft: PlainTorchLM):
    if kind == "chain":
        return DraftModelDrafter(draft, block_size=4)
    if kind == "tree":
        return DraftTreeDrafter(draft, width=3, budget=8, block_size=4)
    return MergedTreeDrafter([DraftTreeDrafter(draft, width=2, block_size=4),
                              DraftTreeDrafter(target.perturbed(noise=0.1, seed=2), width=2, block_size=4)])


def drafter_caches(drafter):
    return [d.cache for d in getattr(drafter, "drafters", [drafter])]


@pytest.mark.parametrize("kind", ["chain", "tree", "two_drafts"])
def test_greedy_equals_plain_decoding(plain_pair, kind):
    target, draft = plain_pair
    engine = SpecEngine(target, drafter_for(kind, target, draft), num_draft_tokens=4, block_size=4)
    requests = engine.generate(PROMPTS, SamplingParams(), max_new_tokens=24)
    for prompt, request in zip(PROMPTS, requests):
        assert request.output == plain_greedy(target, prompt, 24), prompt
    assert engine.stats.mean_accepted_length > 1.5, engine.stats.summary()  # the drafts were really used
    assert_pools_free(engine.target_cache, *drafter_caches(engine.drafter))


@pytest.mark.parametrize("with_drafter", [True, False])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_plain_beam_search(plain_pair, num_beams, with_drafter):
    target, draft = plain_pair
    drafter = BeamTreeDrafter(draft, block_size=4) if with_drafter else None
    searcher = SpecBeamSearch(target, drafter, depth=3, block_size=4, adaptive=False)
    new = 12
    width = max(len(p) for p in PROMPTS)
    padded = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])  # [batch, W] left-padded
    state = searcher.run(PROMPTS, padded, num_beams=num_beams, max_length=width + new,
                         num_return_sequences=num_beams, fill_value=0)
    sequences, scores, _ = state.result()  # [batch * B, W + new], [batch * B]
    for i, prompt in enumerate(PROMPTS):
        beams, sums = plain_beam_search(target, prompt, num_beams, new)
        rows = slice(i * num_beams, (i + 1) * num_beams)
        assert torch.equal(sequences[rows, width:], beams), prompt
        torch.testing.assert_close(scores[rows].double(), sums / new, atol=1e-5, rtol=0)  # length_penalty 1: sum / new tokens
    if with_drafter:
        assert searcher.stats.target_forwards < searcher.stats.steps, searcher.stats.summary()
    assert_pools_free(searcher.cache, None if drafter is None else drafter.cache)


@torch.no_grad()
def plain_joint(model: PlainTorchLM, prompt: list[int], num_tokens: int, temperature: float) -> np.ndarray:
    """P(t1 .. tn | prompt) from whole-sequence forwards, shape [V] * n."""
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])  # [V^k, len + k]
    vocab = model.vocab_size
    for _ in range(num_tokens):
        probs = torch.softmax(model.full_logits(prefixes)[:, -1] / temperature, dim=-1).double()  # [V^k, V]
        joint = (joint[:, None] * probs).reshape(-1)  # [V^(k+1)]
        prefixes = torch.cat(
            [prefixes.repeat_interleave(vocab, dim=0), torch.arange(vocab).repeat(prefixes.shape[0])[:, None]], dim=1
        )
    return joint.reshape([vocab] * num_tokens).numpy()


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_sampling_follows_the_plain_model(kind):
    target = PlainTorchLM(vocab_size=12, seed=3, init=0.5)
    draft = target.perturbed(noise=0.1, seed=4)
    engine = SpecEngine(target, drafter_for(kind, target, draft), num_draft_tokens=2, block_size=4)
    n, prompt, temperature = 4000, [3, 7, 5], 0.9
    params = [SamplingParams(do_sample=True, temperature=temperature, seed=i) for i in range(n)]
    requests = engine.generate([prompt] * n, params, max_new_tokens=2)
    assert 0.2 < engine.stats.acceptance_rate < 0.99, engine.stats.summary()
    pvalue, tv, bound = fit(empirical([r.output for r in requests], 2, 12), plain_joint(target, prompt, 2, temperature))
    assert pvalue > P_MIN, f"chi-square p={pvalue:.2e}"
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (delta {DELTA})"
    assert_pools_free(engine.target_cache, *drafter_caches(engine.drafter))


def test_core_runs_a_plain_torch_model_without_transformers():
    """In a fresh interpreter: the engine, trees and beam search on the plain model, and afterwards
    neither transformers nor vllm has been imported by anything."""
    code = """
import sys, torch
from plain_torch_lm import PlainTorchLM
from specbeam_core import BeamTreeDrafter, DraftModelDrafter, SamplingParams, SpecBeamSearch, SpecEngine
target = PlainTorchLM(seed=0); draft = target.perturbed(noise=0.05, seed=1)
out = SpecEngine(target, DraftModelDrafter(draft), num_draft_tokens=3).generate([[5, 9, 2]], SamplingParams(), max_new_tokens=8)[0].output
ids = [5, 9, 2]
for _ in range(8):
    ids.append(int(target.full_logits(torch.tensor([ids]))[0, -1].argmax()))
assert out == ids[3:], (out, ids[3:])
SpecBeamSearch(target, BeamTreeDrafter(draft)).run([[5, 9, 2]], torch.tensor([[5, 9, 2]]), num_beams=2, max_length=9)
bad = [m for m in ("transformers", "vllm") if m in sys.modules]
print("imported:", bad)
sys.exit(1 if bad else 0)
"""
    tests_dir = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", code], cwd=tests_dir, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": f"{tests_dir}:{tests_dir.parent}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported: []" in result.stdout
