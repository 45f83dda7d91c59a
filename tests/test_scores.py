"""``output_scores`` / ``output_logits`` with ``return_dict_in_generate``: what HF's own loop returns.

Greedy (chains and trees) and beam search: each step's processed scores and raw logits equal
``target.generate``'s (1e-4), the steps after a row's EOS included (HF scores the pad tokens it
feeds a finished row; specbeam runs one forward over such rows at the end). Sampling: the scores are
the ones sampled from, after temperature and top-k.
"""

from __future__ import annotations

import pytest
import torch

import specbeam_hf
from conftest import assert_pools_free
from test_model_families import IDS, MASK, build, perturbed

KW = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=12, pad_token_id=0, return_dict_in_generate=True,
          output_scores=True, output_logits=True)


@pytest.fixture(scope="module")
def pair():
    target = build("llama")
    return target, perturbed(target)


def eos_ending_row_0_early(target) -> int:
    """A token row 0 emits at its 4th step and row 1 never emits: as EOS, row 0 stops first."""
    free = target.generate(**{k: v for k, v in KW.items() if k.startswith("output") is False}, do_sample=False)
    rows = free.sequences[:, IDS.shape[1]:].tolist()
    for token in rows[0][3:8]:
        if token not in rows[0][: rows[0].index(token)] and token not in rows[1] and token != 0:
            return token
    pytest.fail(f"no EOS candidate in {rows}")


@pytest.mark.parametrize("options", [dict(), dict(drafter="draft_tree", tree_width=3)], ids=["chain", "tree"])
def test_greedy_scores_and_logits_equal_hf(pair, options):
    target, draft = pair
    eos = eos_ending_row_0_early(target)
    kwargs = dict(KW, do_sample=False, eos_token_id=eos, repetition_penalty=1.3)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, **options)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == len(out.logits) == len(ref.logits)
    new = ref.sequences[:, IDS.shape[1]:].tolist()
    lengths = [row.index(eos) + 1 if eos in row else len(row) for row in new]
    assert lengths[0] < lengths[1]  # row 0 finished early: its steps on pad tokens are compared
    for step in range(len(ref.scores)):  # row 0's steps after its EOS too: HF's scores of the pad tokens it fed
        torch.testing.assert_close(out.scores[step], ref.scores[step], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.logits[step], ref.logits[step], atol=1e-4, rtol=0)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


def test_finished_rows_are_processed_in_the_batch_hf_processes(pair):
    """The steps after row 0's EOS go through the processors in one call per step on the batch HF's
    loop holds at that step (row 0's pad tokens beside row 1's real ones, row 1's logits as recorded),
    not a call per row and step: the ids of those calls are exactly those of HF's calls."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Recording(LogitsProcessor):
        def __init__(self):
            self.calls = []

        def __call__(self, input_ids, scores):
            self.calls.append(input_ids.clone())
            return scores - 0.01 * input_ids.shape[1]  # [batch, vocab] the same shift for every row

    target, draft = pair
    eos = eos_ending_row_0_early(target)
    kwargs = dict(KW, do_sample=False, eos_token_id=eos)
    hf_calls = Recording()
    ref = target.generate(**kwargs, logits_processor=LogitsProcessorList([hf_calls]))
    ours = Recording()
    out = target.generate(**kwargs, logits_processor=LogitsProcessorList([ours]), custom_generate=specbeam_hf.generate,
                          assistant=specbeam_hf.SpecBeam(draft, num_draft_tokens=3))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    row0 = ref.sequences[0, IDS.shape[1]:].tolist()
    ended = row0.index(eos) + 1  # row 0's steps from here on are scored on pad tokens
    whole_batch = [ids for ids in ours.calls if ids.shape[0] == 2 and not torch.equal(ids[0], ids[1])]
    assert [ids.shape[1] for ids in whole_batch] == [IDS.shape[1] + step for step in range(ended, len(ref.scores))]
    for ids in whole_batch:
        assert torch.equal(ids, hf_calls.calls[ids.shape[1] - IDS.shape[1]])


@pytest.mark.parametrize("model_type, seed", [("gpt2", 0), ("opt", 2)])  # seeds whose row 0 stops first
def test_finished_row_scores_with_learned_positions(model_type, seed):
    """Left-padded row 0 finishes first: its pad-token steps sit at positions counted by the mask."""
    target = build(model_type, seed=seed)
    eos = eos_ending_row_0_early(target)
    kwargs = dict(KW, do_sample=False, eos_token_id=eos)
    ref = target.generate(**kwargs)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(perturbed(target)), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert (out.sequences[0, -1] == 0) and (out.sequences[1, -1] != 0)  # row 0 ended in padding
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_sampled_scores_are_the_warped_ones(pair):
    target, draft = pair
    temperature, top_k = 0.7, 5
    torch.manual_seed(0)
    out = target.generate(**KW, do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0,
                          custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft, num_draft_tokens=3))
    new = out.sequences[:, IDS.shape[1]:]
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        kept = torch.isfinite(scores)  # [batch, vocab]
        assert (kept.sum(-1) <= top_k).all() and (kept.sum(-1) >= 1).all()
        torch.testing.assert_close(scores[kept], (logits / temperature)[kept])
        chosen = new[:, step]
        assert kept.gather(1, chosen[:, None]).all()  # every sampled token was allowed by its scores


def test_beam_logits_equal_hf(pair):
    target, draft = pair
    kwargs = dict(KW, do_sample=False, num_beams=3, num_return_sequences=2, length_penalty=0.7)
    ref = target.generate(**kwargs)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft, beam_adaptive=False), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
