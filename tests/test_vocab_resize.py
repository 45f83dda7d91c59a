"""A draft whose embedding has another size than the target's, one tokenizer (Qwen2.5 0.5B-7B have
151,936 rows, 14B+ 152,064): opt-in through ``SpecBeam(draft, vocab_size=...)`` /
``specbeam_core.VocabResizedDraft``; without it the mismatch is an error that says what to do.

The drafts here are the target with noise, resized with ``resize_token_embeddings``: smaller ones
lose the target's last ids (which the random target does emit, so the fallback id is fed to the draft
and the residual draws them), larger ones get rows the target lacks.
"""

from __future__ import annotations

import pytest
import torch

import specbeam_hf
from conftest import assert_pools_free, build_model, make_pair, perturbed_copy, ragged_batch
from specbeam_core import DraftModelDrafter, SamplingParams, SpecEngine, VocabResizedDraft, build_kv_batch
from specbeam_core.drafting_tree import DraftTreeDrafter
from specbeam_hf import HFCausalLM
from test_sampling import PROMPT, SAMPLING_CASES, VOCAB, empirical, exact_joint, fit

TARGET_VOCAB = 96


def resized(model, vocab_size: int):
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    assert model.get_output_embeddings().weight.shape[0] == vocab_size
    return model


@pytest.fixture(scope="module")
def pair():
    return make_pair("llama")


def test_mismatch_without_the_option_is_an_error_naming_the_way_out(pair):
    target, draft = pair
    small = resized(perturbed_copy(draft), 80)
    ids, mask = ragged_batch([6])
    for beams in (1, 3):
        with pytest.raises(ValueError, match=r"draft has 80 tokens, target has 96.*VocabResizedDraft.*vocab_size="):
            target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=beams,
                            custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(small))


@pytest.mark.parametrize("draft_vocab", [80, 112])
def test_greedy_trees_and_beams_equal_the_target(pair, draft_vocab):
    target, draft = pair
    draft = resized(perturbed_copy(draft), draft_vocab)
    ids, mask = ragged_batch([7, 12], seed=3)
    ids[0, -3:] = torch.tensor([90, 85, 95])  # prompt ids a smaller draft has no embedding for
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for beams, options in [(1, {}), (1, dict(drafter="draft_tree", tree_width=3)), (3, dict(beam_adaptive=False))]:
        ref = target.generate(**kwargs, num_beams=beams)
        assistant = specbeam_hf.SpecBeam(draft, vocab_size=TARGET_VOCAB, **options)
        out = target.generate(**kwargs, num_beams=beams, custom_generate=specbeam_hf.generate, assistant=assistant)
        assert torch.equal(out, ref), (draft_vocab, beams, options)
        if beams == 1:
            assert assistant.last_stats.mean_accepted_length > 1.0  # the resized draft still agrees often
            assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)
        else:
            assert_pools_free(assistant.beam_searcher_for(target).cache, assistant._beam_drafter.cache)


def test_resized_logits_and_fed_ids():
    draft = HFCausalLM(build_model("llama", vocab_size=80))
    wider, narrower = VocabResizedDraft(draft, 96, fallback_token=3), VocabResizedDraft(draft, 64)
    cache = draft.make_cache(8, 4)
    seen = []
    original = draft.forward

    def recording(tokens, kv, n):
        seen.append(tokens.clone())
        return original(tokens, kv, n)

    draft.forward = recording
    seq = cache.new_sequence()
    logits = wider.forward(torch.tensor([[5, 85, 79]]), build_kv_batch(cache, [seq], [3], cache.dtype), 2)  # [1, 2, 96]
    assert logits.shape == (1, 2, 96) and torch.isinf(logits[..., 80:]).all() and torch.isfinite(logits[..., :80]).all()
    assert seen[-1].tolist() == [[5, 3, 79]]  # 85 is past the draft's 80 rows: fed as the fallback id
    cache.free(seq)
    seq = cache.new_sequence()
    logits = narrower.forward(torch.tensor([[5, 63]]), build_kv_batch(cache, [seq], [2], cache.dtype), 1)  # [1, 1, 64]
    assert logits.shape == (1, 1, 64)
    cache.free(seq)
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        VocabResizedDraft(draft, 0)
    with pytest.raises(ValueError, match="fallback_token"):
        VocabResizedDraft(draft, 96, fallback_token=90)


@pytest.mark.parametrize("drafter", ["chain", "tree"])
def test_sampling_stays_exact_with_a_smaller_draft_vocabulary(small_pair, drafter):
    """The draft knows only the target's first 9 of 12 ids: it never proposes the last three and gives
    them probability 0, so every one of them comes from a residual; the chi-square and total-variation
    test of ``test_sampling.py`` on the 3-token joint distribution."""
    target, draft = small_pair
    small = VocabResizedDraft(HFCausalLM(resized(perturbed_copy(draft, noise=0.0), VOCAB - 3)), VOCAB)
    made = DraftModelDrafter(small) if drafter == "chain" else DraftTreeDrafter(small, width=3, budget=5)
    engine = SpecEngine(HFCausalLM(target), made, num_draft_tokens=2)
    params = SAMPLING_CASES["temperature"]
    n = 6000
    per_request = [SamplingParams(do_sample=True, temperature=params.temperature, seed=i) for i in range(n)]
    requests = engine.generate([PROMPT] * n, per_request, max_new_tokens=3)
    outputs = [r.output for r in requests]
    assert_pools_free(engine.target_cache, made.cache)
    assert engine.stats.accepted > 500 and engine.stats.recovered > 500
    assert sum(t >= VOCAB - 3 for o in outputs for t in o) > 100  # ids only the residual can give
    pvalue, tv, bound = fit(empirical(outputs, 3, VOCAB), exact_joint(target, PROMPT, 3, params))
    assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}"
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
