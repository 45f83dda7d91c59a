"""A draft forward pads every row to its longest feed, so a request that joins with a long prompt
(or one the draft skipped for a while) is caught up in a forward of its own first; the drafts are
the same as drafting each request alone."""

from __future__ import annotations

import torch

from conftest import build_model
from specbeam_core import DraftModelDrafter, Request, SamplingParams
from specbeam_core.drafting import _separate_catch_up
from specbeam_hf import HFCausalLM


def test_which_catch_ups_go_first():
    short = {0: [1], 1: [2, 3], 2: [4]}
    assert _separate_catch_up(short) == {}  # nothing long
    assert _separate_catch_up({0: list(range(40)), 1: list(range(38))}) == {}  # all alike: one forward
    feeds = {0: [1], 1: list(range(40)), 2: [2, 3], 3: [4]}
    assert _separate_catch_up(feeds) == {1: list(range(39))}  # all but its last token
    # a long row among rows nearly as long: splitting would not halve the padded slots
    assert _separate_catch_up({0: list(range(40)), 1: list(range(8)), 2: list(range(8))}) == {}


def test_drafts_with_a_long_catch_up_equal_drafting_alone():
    draft = HFCausalLM(build_model(seed=3))
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=rng).tolist() for n in (5, 70, 6, 4)]

    def request(i, tokens):
        return Request(request_id=i, prompt=tokens, params=SamplingParams(), max_new_tokens=8, tokens=list(tokens))

    alone = []
    for i, p in enumerate(prompts):
        d = DraftModelDrafter(draft)
        d.reserve(1, 128)
        alone.append(d.propose([request(i, p)], [4]).tokens[0].tolist())

    together = DraftModelDrafter(draft)
    together.reserve(4, 128)
    short = [request(i, p) for i, p in enumerate(prompts) if i != 1]
    together.propose(short, [4] * 3)  # the short rows' draft caches hold their prompts
    for r in short:
        r.tokens = r.tokens + [7]  # a committed token each (its drafts rejected): one unseen token
    alone_next = []
    for r in short:
        d = DraftModelDrafter(draft)
        d.reserve(1, 128)
        alone_next.append(d.propose([request(r.request_id, r.tokens)], [4]).tokens[0].tolist())
    fed = []
    forward = draft.forward

    def spy(tokens, kv, num_logits):
        fed.append(list(kv.num_new))
        return forward(tokens, kv, num_logits)

    draft.forward = spy
    joined = request(1, prompts[1])  # joins with 70 unseen tokens next to rows with 1
    rows = [short[0], joined, short[1], short[2]]
    out = together.propose(rows, [4] * 4).tokens.tolist()
    assert fed[0] == [69] and fed[1] == [1, 1, 1, 1]  # its catch-up first, then one short forward
    assert out[1] == alone[1]
    assert [out[0], out[2], out[3]] == alone_next
