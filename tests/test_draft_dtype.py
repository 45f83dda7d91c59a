"""``SpecBeam(draft, draft_dtype=...)``: the drafts run on a copy of their weights in another dtype
(a bfloat16 draft for a float32 target is the fast pairing on CPUs with bfloat16 matrix units).
Outputs stay the target's own: greedy chains and trees and beam search equal HF's float32
``generate`` token for token, sampling follows the target's distribution, the caller's draft model
is left untouched, and every KV block is back in its pool."""

from __future__ import annotations

import pytest
import torch

import specbeam_hf
from conftest import PAD_ID, assert_pools_free, ragged_batch
from test_beam_search import assert_same_beams
from test_sampling import P_MIN, PROMPT, VOCAB, empirical, exact_joint, fit
from specbeam_core import SamplingParams


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


@pytest.mark.parametrize("drafter", ["draft_model", "draft_tree"])
def test_bf16_draft_greedy_equals_hf_float32(llama_pair, drafter):
    target, draft = llama_pair
    before = snapshot(draft)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, drafter=drafter, draft_dtype="bfloat16")
    assert assistant.draft.dtype == torch.bfloat16 and draft.dtype == torch.float32
    ids, mask = ragged_batch([5, 9, 3], seed=8)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
    ref = target.generate(**kwargs)
    out = target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
    assert torch.equal(out, ref)
    stats = assistant.last_stats
    assert stats.mean_accepted_length > 1.0  # the bf16 copy still drafts tokens the target accepts
    engine = assistant.engine_for(target)
    assert engine.drafter.cache.dtype == torch.bfloat16 and engine.target_cache.dtype == torch.float32
    assert_pools_free(engine.target_cache, engine.drafter.cache)
    assert_untouched(draft, before)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_bf16_draft_beam_search_equals_hf_float32(llama_pair, num_beams):
    target, draft = llama_pair
    before = snapshot(draft)
    assistant = specbeam_hf.SpecBeam(draft, draft_dtype=torch.bfloat16, beam_adaptive=False)
    ids, mask = ragged_batch([6, 10], seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=20, do_sample=False,
                  pad_token_id=PAD_ID, eos_token_id=None, length_penalty=0.7, num_return_sequences=2,
                  return_dict_in_generate=True, output_scores=True)
    ref = target.generate(**kwargs)
    out = target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
    assert_same_beams(ref, out)
    searcher = assistant.beam_searcher_for(target)
    assert searcher.drafter.cache.dtype == torch.bfloat16
    assert assistant.last_beam_stats.steps_per_target_forward > 1.0
    assert_pools_free(searcher.cache, searcher.drafter.cache)
    assert_untouched(draft, before)


def test_bf16_draft_sampling_follows_the_target(small_pair):
    """The chi-square / total-variation test of test_sampling.py, with the draft run in bfloat16."""
    target, draft = small_pair
    n = 2000
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=5)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=2, draft_dtype="bfloat16")
    torch.manual_seed(0)
    out = target.generate(
        input_ids=torch.tensor([PROMPT] * n), max_new_tokens=2, do_sample=True, temperature=0.8, top_k=5, top_p=1.0,
        custom_generate=specbeam_hf.generate, assistant=assistant,
    )
    assert 0.2 < assistant.last_stats.acceptance_rate < 0.95
    pvalue, tv, bound = fit(empirical(out[:, len(PROMPT):].tolist(), 2, VOCAB), exact_joint(target, PROMPT, 2, params))
    assert pvalue > P_MIN, f"chi-square p={pvalue:.2e}"
    assert tv < bound


def test_same_dtype_is_no_copy(llama_pair):
    _, draft = llama_pair
    assistant = specbeam_hf.SpecBeam(draft, draft_dtype="float32")
    assert assistant.draft.model is draft


@pytest.mark.parametrize("value", ["bf16", "int8", 16, torch.int64, True])
def test_bad_draft_dtype_is_refused(llama_pair, value):
    _, draft = llama_pair
    with pytest.raises(ValueError, match="draft_dtype must be one of bfloat16, float16, float32"):
        specbeam_hf.SpecBeam(draft, draft_dtype=value)


def test_draft_dtype_without_a_draft_is_refused():
    with pytest.raises(ValueError, match="draft_dtype sets the dtype of the draft model, but no draft model was given"):
        specbeam_hf.SpecBeam(None, drafter="prompt_lookup", draft_dtype="bfloat16")


def test_the_copy_is_what_from_pretrained_makes_in_that_dtype(llama_pair):
    """Weights rounded to bf16, buffers kept as they are: ``model.to(bfloat16)`` would round the
    rotary embedding's ``inv_freq`` too and shift every position's angle."""
    _, draft = llama_pair
    copy = specbeam_hf.SpecBeam(draft, draft_dtype="bfloat16").draft.model
    assert copy is not draft and copy.dtype == torch.bfloat16
    params = dict(draft.named_parameters())
    for name, p in copy.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, params[name].to(torch.bfloat16)), name
    buffers = dict(draft.named_buffers())
    assert any("inv_freq" in n for n in buffers)
    for name, b in copy.named_buffers():
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    assert not copy.training


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2"])
def test_bf16_drafts_of_other_families(family_pairs, family):
    target, draft = family_pairs[family]
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, draft_dtype="bfloat16")
    ids, mask = ragged_batch([4, 8], seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
    assert torch.equal(target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant), target.generate(**kwargs))
    assert assistant.last_stats.mean_accepted_length > 1.0
    engine = assistant.engine_for(target)
    assert_pools_free(engine.target_cache, engine.drafter.cache)
