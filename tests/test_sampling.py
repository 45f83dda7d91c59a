"""Sampling exactness: speculative sampling draws from exactly the target's processed distribution.

Many requests share one batch, each with its own seed, all continuing one prompt. The empirical
joint distribution of their first tokens is compared with the exact joint distribution computed
from full (non-paged, non-speculative) target forwards and HF's own warpers:

* a chi-square goodness-of-fit test (cells with expected count < 5 merged into one) must give
  ``p > 1e-3`` (the runs are seeded, so the outcome is deterministic; a correct sampler fails such a
  test with probability 1e-3);
* the total variation distance must stay below ``E[TV] + sqrt(ln(1/delta) / 2N)`` with
  ``E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N)`` and ``delta = 1e-4`` (McDiarmid: one sample moves the
  empirical TV by at most 1/N).

``test_mutants.py`` runs these same tests, every sampling case, with broken verifiers (one that
accepts every draft, one that skips the residual ``max(0, p - q)`` after a rejection) and requires
each run to fail, which shows they have the power to catch a wrong acceptance or recovery rule. The
verifier-level tests at the end (per-position chi-square, drafted tokens of mid-range target
probability) have a stated false-alarm rate of 1e-3 each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import specbeam_core
import specbeam_core.engine
import specbeam_hf
from conftest import SMALL_VOCAB, assert_pools_free
from specbeam_core import DraftModelDrafter, SamplingParams, SpecEngine
from specbeam_hf import HFCausalLM

VOCAB = SMALL_VOCAB
PROMPT = [3, 7, 5, 9]
N_SAMPLES = 6000
P_MIN = 1e-3
DELTA = 1e-4


def hf_warpers(params: SamplingParams) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    return procs


@torch.no_grad()
def exact_joint(model, prompt: list[int], num_tokens: int, params: SamplingParams) -> np.ndarray:
    """P(t1, ..., tn | prompt) from plain full-sequence forwards and HF's warpers, shape [V] * n."""
    warp = hf_warpers(params)
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])  # [V^k, len + k]
    for _ in range(num_tokens):
        logits = model(prefixes).logits[:, -1].float()  # [V^k, V]
        probs = torch.softmax(warp(prefixes, logits), dim=-1).double()  # [V^k, V]
        joint = (joint[:, None] * probs).reshape(-1)  # [V^(k+1)]
        v = logits.shape[-1]
        prefixes = torch.cat(
            [prefixes.repeat_interleave(v, dim=0), torch.arange(v).repeat(prefixes.shape[0])[:, None]], dim=1
        )
    return joint.reshape([logits.shape[-1]] * num_tokens).numpy()


def empirical(outputs: list[list[int]], num_tokens: int, vocab: int) -> np.ndarray:
    counts = np.zeros([vocab] * num_tokens)
    for out in outputs:
        counts[tuple(out[:num_tokens])] += 1
    return counts


def fit(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float, float]:
    """(chi-square p-value with small cells merged, total variation, TV bound at DELTA)."""
    n = counts.sum()
    obs, p = counts.reshape(-1), probs.reshape(-1) / probs.sum()
    impossible = p == 0
    assert obs[impossible].sum() == 0, "a token the target's processed distribution excludes was sampled"
    exp = n * p
    small = exp < 5
    f_obs = np.append(obs[~small], obs[small & ~impossible].sum())
    f_exp = np.append(exp[~small], exp[small & ~impossible].sum())
    if f_exp[-1] == 0:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    pvalue = float(chisquare(f_obs, f_exp * (f_obs.sum() / f_exp.sum())).pvalue)
    tv = 0.5 * float(np.abs(obs / n - p).sum())
    bound = 0.5 * float(np.sqrt(p * (1 - p) / n).sum()) + math.sqrt(math.log(1 / DELTA) / (2 * n))
    return pvalue, tv, bound


def run_engine(target, draft, params: SamplingParams, num_tokens: int, gamma: int, n: int = N_SAMPLES):
    engine = SpecEngine(HFCausalLM(target), DraftModelDrafter(HFCausalLM(draft)), num_draft_tokens=gamma)
    per_request = [
        SamplingParams(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=i)
        for i in range(n)
    ]
    requests = engine.generate([PROMPT] * n, per_request, max_new_tokens=num_tokens)
    assert all(len(r.output) == num_tokens and r.finish_reason == "length" for r in requests)
    assert_pools_free(engine.target_cache, engine.drafter.cache)
    return [r.output for r in requests], engine.stats


SAMPLING_CASES = {
    "temperature": SamplingParams(do_sample=True, temperature=0.8),
    "top_k": SamplingParams(do_sample=True, top_k=4),
    "top_p": SamplingParams(do_sample=True, top_p=0.75),
    "all": SamplingParams(do_sample=True, temperature=0.7, top_k=6, top_p=0.9),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_speculative_sampling_is_exact(small_pair, case):
    """3 tokens per request with gamma=2: drafts at two positions, then the bonus/recovered token."""
    target, draft = small_pair
    params = SAMPLING_CASES[case]
    outputs, stats = run_engine(target, draft, params, num_tokens=3, gamma=2)
    pvalue, tv, bound = fit(empirical(outputs, 3, VOCAB), exact_joint(target, PROMPT, 3, params))
    assert pvalue > P_MIN, f"chi-square p={pvalue:.2e}"
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    # both the accept and the reject branch ran many times
    assert 0.2 < stats.acceptance_rate < 0.95 and stats.recovered > 500 and stats.bonus > 500


def test_seeded_request_is_reproducible_whatever_shares_the_batch(small_pair):
    target, draft = small_pair
    params = SamplingParams(do_sample=True, temperature=0.9, seed=1234)
    engine = SpecEngine(HFCausalLM(target), DraftModelDrafter(HFCausalLM(draft)), num_draft_tokens=3)
    alone = engine.generate([PROMPT], params, max_new_tokens=20)[0].output
    again = engine.generate([PROMPT], params, max_new_tokens=20)[0].output
    others = [SamplingParams(do_sample=True, seed=s) for s in (1, 2)] + [SamplingParams()]
    crowd = engine.generate([[4, 4], PROMPT + [1, 2, 3], [5]] + [PROMPT], others + [params], max_new_tokens=20)
    assert alone == again == crowd[-1].output


def test_greedy_and_sampled_rows_in_one_batch(small_pair):
    """Greedy rows stay token-for-token equal to HF greedy while sampled rows share their batch."""
    target, draft = small_pair
    engine = SpecEngine(HFCausalLM(target), DraftModelDrafter(HFCausalLM(draft)), num_draft_tokens=4)
    prompts = [PROMPT, [2, 8, 1], PROMPT, [6, 6, 6, 1, 0, 11]]
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=3), SamplingParams(do_sample=True, temperature=0.0),
              SamplingParams(do_sample=True, top_k=3, seed=5)]
    requests = engine.generate(prompts, params, max_new_tokens=16)
    for r, p in zip(requests, prompts):
        if r.params.greedy:
            ref = target.generate(input_ids=torch.tensor([p]), max_new_tokens=16, do_sample=False)
            assert r.output == ref[0, len(p):].tolist()
    assert_pools_free(engine.target_cache, engine.drafter.cache)


def test_hf_generate_sampling_is_exact(small_pair):
    """``do_sample=True`` through HF generate (one call, many identical rows, seeded by torch.manual_seed)."""
    target, draft = small_pair
    n = 2000
    ids = torch.tensor([PROMPT] * n)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=5)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=1)
    torch.manual_seed(0)
    out = target.generate(
        input_ids=ids, max_new_tokens=2, do_sample=True, temperature=0.8, top_k=5, top_p=1.0,
        custom_generate=specbeam_hf.generate, assistant=assistant,
    )
    stats = assistant.last_stats
    assert 0.2 < stats.acceptance_rate < 0.95
    pvalue, tv, bound = fit(empirical(out[:, len(PROMPT):].tolist(), 2, VOCAB), exact_joint(target, PROMPT, 2, params))
    assert pvalue > P_MIN, f"chi-square p={pvalue:.2e}"
    assert tv < bound
    # seeded by the global torch seed: the same seed gives the same samples
    torch.manual_seed(0)
    again = target.generate(
        input_ids=ids[:50], max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, top_p=1.0,
        custom_generate=specbeam_hf.generate, assistant=assistant,
    )
    torch.manual_seed(0)
    third = target.generate(
        input_ids=ids[:50], max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, top_p=1.0,
        custom_generate=specbeam_hf.generate, assistant=assistant,
    )
    assert torch.equal(again, third)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


def test_core_probabilities_match_hf_warpers():
    """``specbeam_core.probabilities`` equals HF's temperature → top-k → top-p, ties included."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 20, generator=gen)
    logits[:8, :4] = 2.5  # exact ties at the top
    logits[8:16, 5:12] = -0.25  # ties in the middle (top-k / top-p thresholds)
    for params in [
        SamplingParams(do_sample=True, temperature=0.6),
        SamplingParams(do_sample=True, top_k=3),
        SamplingParams(do_sample=True, top_k=9),
        SamplingParams(do_sample=True, top_p=0.5),
        SamplingParams(do_sample=True, temperature=1.3, top_k=7, top_p=0.8),
    ]:
        ref = torch.softmax(hf_warpers(params)(torch.zeros(64, 1, dtype=torch.long), logits.clone()), dim=-1)
        torch.testing.assert_close(specbeam_core.probabilities(logits, params), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("drafter", ["draft_model", "draft_tree"])
@pytest.mark.parametrize("processors", [dict(repetition_penalty=1.8, temperature=0.9), dict(min_p=0.08, top_k=0)],
                         ids=["repetition_penalty", "min_p"])
def test_hf_generate_sampling_with_position_by_position_processors_is_exact(small_pair, drafter, processors):
    """Processors the core does not fold into its own temperature / top-k / top-p run position by
    position on the target's and the draft's logits (``specbeam_hf.generate``); the samples still
    follow the target's processed distribution, chains and trees alike."""
    from transformers import GenerationConfig

    target, draft = small_pair
    n = 3000
    ids = torch.tensor([PROMPT] * n)
    config = GenerationConfig(do_sample=True, max_new_tokens=2, **processors)
    warp = target._get_logits_processor(generation_config=config, input_ids_seq_length=len(PROMPT),
                                        encoder_input_ids=ids[:1], prefix_allowed_tokens_fn=None,
                                        logits_processor=None, device="cpu")
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([PROMPT])  # [V^k, len + k]
    with torch.no_grad():
        for _ in range(2):
            logits = target(prefixes).logits[:, -1].float()  # [V^k, V]
            probs = torch.softmax(warp(prefixes, logits), dim=-1).double()  # [V^k, V]
            joint = (joint[:, None] * probs).reshape(-1)  # [V^(k+1)]
            prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, dim=0),
                                  torch.arange(VOCAB).repeat(prefixes.shape[0])[:, None]], dim=1)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=2, drafter=drafter)
    torch.manual_seed(1)
    out = target.generate(input_ids=ids, generation_config=config, pad_token_id=0,
                          custom_generate=specbeam_hf.generate, assistant=assistant)
    pvalue, tv, bound = fit(empirical(out[:, len(PROMPT):].tolist(), 2, VOCAB), joint.reshape(VOCAB, VOCAB).numpy())
    assert pvalue > P_MIN, f"chi-square p={pvalue:.2e}"
    assert tv < bound
    assert 0 < assistant.last_stats.acceptance_rate < 1


# ---------------------------------------------------------------------------- the chain verifier alone

ALPHA = 1e-3  # false-alarm rate of each verifier-level statistical test (Bonferroni over its positions)
V_SYN = 8
P_BASE = [0.40, 0.25, 0.15, 0.09, 0.06, 0.05, 0.0, 0.0]  # target: mid-range mass on the drafted tokens
Q_BASE = [0.10, 0.45, 0.05, 0.20, 0.0, 0.05, 0.15, 0.0]  # draft: over- and under-weights, and mass where p = 0


def synthetic_chain(g: int):
    """Per position ``i`` of ``g`` drafts (+ the bonus position): target ``p_i`` and draft ``q_i``,
    both the base distributions rolled by ``i`` ([g + 1, V] and [g, V]); ``p_i`` is what the target
    gives after the drafted prefix, whatever it is (the verifier cannot tell)."""
    p = torch.stack([torch.tensor(P_BASE).roll(i) for i in range(g + 1)]).double()
    q = torch.stack([torch.tensor(Q_BASE).roll(i) for i in range(g)]).double()
    return p, q


def per_position_fit(outputs: list[list[int]], p: torch.Tensor) -> list[tuple[int, int, float]]:
    """``(position, samples, chi-square p-value)`` of the token at each position among the rows that
    reached it (every earlier draft accepted): it must follow ``p[position]``."""
    fits = []
    for i in range(p.shape[0]):
        tokens = [o[i] for o in outputs if len(o) > i]
        counts = np.bincount(tokens, minlength=p.shape[1]).astype(float)
        fits.append((i, len(tokens), fit(counts, p[i].numpy())[0]))
    return fits


@pytest.mark.parametrize("drafts", ["one_hot", "sampled_from_q"])
def test_chain_verifier_per_position_chi_square(drafts):
    """``verify_rejection_sampling`` on 20000 rows of 3 drafts whose tokens carry 40 % / 25 % of the
    target's mass (one-hot drafts) or are drawn from a draft distribution that over- and
    under-weights the target's tokens: at every position, among the rows that reached it, the
    emitted token follows the target's distribution there (chi-square, each position at
    ``ALPHA / 4``, so a false alarm has probability <= 1e-3; fixed seeds, so the outcome is fixed).
    Mid-range drafted probabilities are where skipping the residual shows most."""
    n, g = 20000, 3
    p, q = synthetic_chain(g)
    gen = torch.Generator().manual_seed(0)
    if drafts == "one_hot":
        draft_tokens = torch.stack([p[i].argsort(descending=True)[i % 2] for i in range(g)])[None].repeat(n, 1)
        draft_probs = None
    else:
        draft_tokens = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(g)], 1)
        draft_probs = q[None].repeat(n, 1, 1)
    res = specbeam_core.verify_rejection_sampling(draft_tokens, [g] * n, p[None].repeat(n, 1, 1), draft_probs, [gen] * n)
    fits = per_position_fit(res.output_tokens, p)
    print(f"\nchain verifier ({drafts}): " + ", ".join(f"pos {i}: n={m} p={pv:.3g}" for i, m, pv in fits))
    assert all(m > 500 for _, m, _ in fits)  # every position, the bonus one included, sampled often
    for i, m, pvalue in fits:
        assert pvalue > ALPHA / len(fits), f"position {i}: chi-square p={pvalue:.2e} over {m} samples"
