"""Greedy exactness through HF ``generate``: token for token equal to ``target.generate(do_sample=False)``."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import specbeam_hf
from conftest import (FAMILIES, assert_pools_free, build_model, first_difference, make_pair, ragged_batch,
                      skip_for_old_transformers)


def spec(target, assistant, **kwargs):
    return target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)


def pools(assistant, target):
    return assistant.engine_for(target).target_cache, assistant.drafter.cache


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.puts: list[list] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def first_new_token_ids(sequences, width):
    return sequences[:, width:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("lengths", [[7], [5, 9, 1, 12]], ids=["batch1", "batch4"])
def test_greedy_equals_hf(family_pairs, family, gamma, lengths):
    target, draft = family_pairs[family]
    ids, mask = ragged_batch(lengths, seed=len(lengths) + gamma)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=gamma)
    out = spec(target, assistant, **kwargs)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), first_difference(out, ref, ids.shape[1])
    stats = assistant.last_stats
    assert stats.drafted > 0 and stats.emitted == 20 * len(lengths)
    assert all(max(r.num_drafted) <= gamma for r in stats.records)
    assert_pools_free(*pools(assistant, target))


def test_acceptance_is_nontrivial(llama_pair):
    """The fixture's draft is close enough to be accepted often and far enough to be rejected sometimes."""
    target, draft = llama_pair
    ids, mask = ragged_batch([6, 9, 4], seed=3)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    spec(target, assistant, input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    stats = assistant.last_stats
    assert 0.1 < stats.acceptance_rate < 0.99
    assert stats.recovered > 0 and stats.bonus > 0


def test_self_draft_accepts_everything(llama_pair):
    target, _ = llama_pair
    ids, mask = ragged_batch([6, 11], seed=4)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(target, num_draft_tokens=5)
    out = spec(target, assistant, **kwargs)
    assert torch.equal(out, ref)
    stats = assistant.last_stats
    assert stats.acceptance_rate == 1.0
    assert all(a == d for rec in stats.records for a, d in zip(rec.num_accepted, rec.num_drafted))
    # 25 tokens per row with 5 drafts + 1 bonus per step: ceil(25 / 6) = 5 target passes
    assert stats.target_forwards == 5
    assert stats.mean_accepted_length == pytest.approx(stats.emitted / stats.row_steps)


def _pick_eos(ref, width, row=0, min_index=3, where=lambda i: True):
    """A token the target emits in ``row`` at output index >= min_index, not emitted earlier in that row."""
    out = ref[row, width:].tolist()
    for i in range(min_index, len(out) - 3):
        if out[i] not in out[:i] and where(i):
            return out[i], i
    pytest.skip("no usable EOS candidate in the reference output")


@pytest.mark.parametrize("self_draft", [True, False], ids=["self_draft", "perturbed_draft"])
@pytest.mark.parametrize("gamma", [3, 8])
def test_eos_inside_draft(llama_pair, self_draft, gamma):
    target, draft = llama_pair
    if self_draft:
        draft = target
    ids, mask = ragged_batch([5, 9, 3, 7], seed=11)
    width = ids.shape[1]
    free_run = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    # self draft: every step emits gamma + 1 tokens; put EOS at a draft position with drafts after it
    eos, index = _pick_eos(free_run, width, where=lambda i: i % (gamma + 1) < gamma - 1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=gamma)
    out = spec(target, assistant, **kwargs)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), first_difference(out, ref, width)  # includes the pad fill after EOS
    assert ref[0, width + index] == eos and ref.shape[1] > width + index + 1
    if self_draft:
        # EOS was an accepted draft token with more drafted tokens after it in the same step
        assert any(
            eos in d[:-1] and e[-1] == eos
            for rec in assistant.last_stats.records
            for d, e in zip(rec.drafted_tokens, rec.emitted_tokens)
        )
    assert_pools_free(*pools(assistant, target))


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 11])
def test_max_new_tokens_inside_draft(llama_pair, max_new_tokens):
    target, draft = llama_pair
    ids, mask = ragged_batch([4, 8], seed=12)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    ref = target.generate(**kwargs)
    for d in (draft, target):
        assistant = specbeam_hf.SpecBeam(d, num_draft_tokens=8)
        out = spec(target, assistant, **kwargs)
        assert torch.equal(out, ref)
        assert out.shape[1] == ids.shape[1] + max_new_tokens
        for rec in assistant.last_stats.records:
            assert all(len(e) <= max_new_tokens for e in rec.emitted_tokens)
        assert_pools_free(*pools(assistant, target))


def test_prompt_plus_new_tokens_at_position_limit():
    """prompt + max_new_tokens == max_position_embeddings is allowed and exact (GPT-2's learned positions)."""
    target, draft = make_pair("gpt2", max_positions=32)
    ids, mask = ragged_batch([8, 5], seed=13)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=8)
    assert torch.equal(spec(target, assistant, **kwargs), ref)


def test_streamer_batch1_receives_same_tokens(llama_pair):
    target, draft = llama_pair
    ids, _ = ragged_batch([6], seed=14)
    ref_streamer, spec_streamer = CollectingStreamer(), CollectingStreamer()
    ref = target.generate(input_ids=ids, max_new_tokens=17, do_sample=False, streamer=ref_streamer)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    out = spec(target, assistant, input_ids=ids, max_new_tokens=17, do_sample=False, streamer=spec_streamer)
    assert torch.equal(out, ref)
    assert spec_streamer.puts == ref_streamer.puts
    assert spec_streamer.ended == ref_streamer.ended == 1


def test_streamer_batch2_receives_same_columns(llama_pair):
    """HF's loop puts one column (one token per row, pad after a row ended) per step; so must specbeam."""
    target, draft = llama_pair
    ids, mask = ragged_batch([6, 9], seed=15)
    ref_streamer, spec_streamer = CollectingStreamer(), CollectingStreamer()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=17, do_sample=False)
    ref = target.generate(streamer=ref_streamer, **kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    out = spec(target, assistant, streamer=spec_streamer, **kwargs)
    assert torch.equal(out, ref)
    assert spec_streamer.puts == ref_streamer.puts


class StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class StopAtLength(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("with_eos", [True, False], ids=["with_eos", "no_eos"])
def test_custom_stopping_criteria(llama_pair, with_eos):
    """A custom criterion ends rows exactly where HF's loop ends them.

    HF pads the rows a criterion stopped only when an EOS id is configured; without one, such rows
    keep generating until every row has stopped (``has_eos_stopping_criteria`` in ``_sample``).
    """
    target, draft = llama_pair
    ids, mask = ragged_batch([5, 9, 3, 7], seed=16)
    width = ids.shape[1]
    free_run = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    token, index = _pick_eos(free_run, width, row=1)
    eos = {"eos_token_id": 95} if with_eos else {}
    for criteria in (StopOnToken(token), StopAtLength(width + 13)):
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, **eos)
        ref = target.generate(stopping_criteria=StoppingCriteriaList([criteria]), **kwargs)
        assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=6)
        out = spec(target, assistant, stopping_criteria=StoppingCriteriaList([criteria]), **kwargs)
        assert torch.equal(out, ref), type(criteria).__name__
        assert_pools_free(*pools(assistant, target))


def test_return_dict_in_generate(llama_pair):
    target, draft = llama_pair
    ids, mask = ragged_batch([4, 6], seed=17)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    ref = target.generate(**kwargs)
    out = spec(target, specbeam_hf.SpecBeam(draft, num_draft_tokens=3), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize(
    "extra",
    [
        dict(repetition_penalty=1.8),
        dict(no_repeat_ngram_size=2),
        dict(min_new_tokens=12, eos="pick"),
        # state per row of the batch: these run on a batch of copies of the row, read at the row
        dict(encoder_repetition_penalty=3.0),
        dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [t for t in range(64) if t % 4 != batch_id]),
        pytest.param(dict(per_row_ignore_length=True), marks=pytest.mark.needs_new_transformers),
    ],
    ids=["repetition_penalty", "no_repeat_ngram", "min_new_tokens", "encoder_repetition_penalty",
         "prefix_allowed_tokens_fn", "per_row_prompt_ignore_length"],
)
def test_hf_logits_processors_greedy(llama_pair, extra):
    """Processors the core does not model run position by position; rows finish at different steps.
    HF's row-wise processors run on the row alone, the others on a batch of copies of it."""
    target, draft = llama_pair
    ids, mask = ragged_batch([5, 9, 3, 7], seed=18)
    width = ids.shape[1]
    extra = dict(extra)
    if extra.pop("per_row_ignore_length", None):
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        ignore = torch.tensor([width, 0, width - 1, 2])  # [batch]: the prompt counts for some rows
        try:
            penalty = RepetitionPenaltyLogitsProcessor(5.0, prompt_ignore_length=ignore)
        except ValueError as error:  # transformers before 5.2x: an int only
            skip_for_old_transformers(f"no per-row prompt_ignore_length: {error}")
        extra["logits_processor"] = LogitsProcessorList([penalty])
    if extra.pop("eos", None):
        free_run = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
        extra["eos_token_id"], _ = _pick_eos(free_run, width, min_index=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=23, do_sample=False, pad_token_id=0, **extra)
    ref = target.generate(**kwargs)
    for gamma in (3, 8):
        assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=gamma)
        out = spec(target, assistant, **kwargs)
        assert torch.equal(out, ref), f"gamma={gamma}"


def test_assistant_reused_across_calls_and_batch_sizes(llama_pair):
    """The pools persist between calls, grow for a bigger batch and are empty after each call."""
    target, draft = llama_pair
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    for lengths, new in (([5], 8), ([3, 9, 6, 4, 7], 21), ([4, 4], 40)):
        ids, mask = ragged_batch(lengths, seed=sum(lengths))
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert torch.equal(spec(target, assistant, **kwargs), target.generate(**kwargs))
        assert_pools_free(*pools(assistant, target))


def test_eager_attention_implementation():
    target, draft = make_pair("llama", attn_implementation="eager")
    ids, mask = ragged_batch([5, 8], seed=19)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    assert torch.equal(spec(target, specbeam_hf.SpecBeam(draft, num_draft_tokens=3), **kwargs), target.generate(**kwargs))


def test_one_assistant_for_two_targets(llama_pair):
    """A SpecBeam keeps one engine per target; both stay exact."""
    target, draft = llama_pair
    other = build_model("llama", seed=5)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3)
    ids, mask = ragged_batch([6, 4], seed=20)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for model in (target, other, target):
        assert torch.equal(spec(model, assistant, **kwargs), model.generate(**kwargs))


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_confidence_threshold_shortens_drafts_and_stays_exact(llama_pair, threshold):
    target, draft = llama_pair
    ids, mask = ragged_batch([6, 9, 4], seed=31)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ref = target.generate(**kwargs)
    full = specbeam_hf.SpecBeam(draft, num_draft_tokens=6)
    short = specbeam_hf.SpecBeam(draft, num_draft_tokens=6, confidence_threshold=threshold)
    assert torch.equal(spec(target, full, **kwargs), ref)
    assert torch.equal(spec(target, short, **kwargs), ref)
    assert short.last_stats.drafted < full.last_stats.drafted  # unsure drafts end early
    assert all(max(rec.num_drafted) <= 6 for rec in short.last_stats.records)
    assert_pools_free(*pools(short, target))


def test_confidence_threshold_out_of_range(llama_pair):
    with pytest.raises(ValueError, match="confidence_threshold"):
        specbeam_hf.SpecBeam(llama_pair[1], confidence_threshold=1.5)
