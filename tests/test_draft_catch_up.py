"""A draft forward pads every row to its longest feed, so a request that joins with a long prompt
(or one the draft skipped for a while) is caught up in a forward of its own first; the drafts are
the same as drafting each request alone."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, record_feeds
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
    fed = record_feeds(draft)
    joined = request(1, prompts[1])  # joins with 70 unseen tokens next to rows with 1
    rows = [short[0], joined, short[1], short[2]]
    out = together.propose(rows, [4] * 4).tokens.tolist()
    assert fed[0] == [69] and fed[1] == [1, 1, 1, 1]  # its catch-up first, then one short forward
    assert out[1] == alone[1]
    assert [out[0], out[2], out[3]] == alone_next


def test_which_catch_ups_a_budget_lets_through():
    from specbeam_core.drafting import _bounded_catch_up

    feeds = {0: [1], 1: list(range(40)), 2: list(range(30)), 3: [2, 3], 4: list(range(20))}
    # everything fits: the same choice as without a budget
    assert _bounded_catch_up(feeds, 1000) == (_separate_catch_up(feeds), set())
    # shortest first: row 4 (19) fits; rows 4 and 2 padded to 29 would not (58 > 50), so row 2 gets a
    # chunk of 25 (2 x 25 slots) and waits, as does the longer row 1; short rows never wait
    assert _bounded_catch_up(feeds, 50) == ({4: list(range(19)), 2: list(range(25))}, {1, 2})
    assert _bounded_catch_up(feeds, 38) == ({4: list(range(19)), 2: list(range(19))}, {1, 2})
    # a chunk shorter than row 4's catch-up would not shrink the padded forward: no chunk
    assert _bounded_catch_up(feeds, 37) == ({4: list(range(19))}, {1, 2})
    # the shortest long row larger than the whole budget is fed a chunk of it
    assert _bounded_catch_up(feeds, 16) == ({4: list(range(16))}, {1, 2, 4})
    # nothing waits and one forward would be cheaper unbudgeted, but it would pad 2 x 17 slots: separate
    assert _separate_catch_up({0: [1], 1: list(range(17))}) == {}
    assert _bounded_catch_up({0: [1], 1: list(range(17))}, 16) == ({1: list(range(16))}, set())


def test_bounded_catch_up_feeds_at_most_the_budget_and_drafts_as_alone():
    """Rows that join with long prompts are caught up over several calls, at most ``budget`` catch-up
    tokens a call; a row drafts nothing until it is caught up, and then exactly what it drafts alone."""
    draft = HFCausalLM(build_model(seed=3))
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=rng).tolist() for n in (5, 70, 45, 4, 33)]
    budget = 32

    def request(i, tokens):
        return Request(request_id=i, prompt=tokens, params=SamplingParams(), max_new_tokens=8, tokens=list(tokens))

    def alone(i, tokens):
        d = DraftModelDrafter(draft)
        d.reserve(1, 128)
        return d.propose([request(i, tokens)], [4]).tokens[0].tolist()

    with pytest.raises(ValueError, match="max_catch_up_tokens"):
        DraftModelDrafter(draft, max_catch_up_tokens=0)
    single = DraftModelDrafter(draft, max_catch_up_tokens=32)  # one row alone is caught up at once
    single.reserve(1, 128)
    assert single.propose([request(1, prompts[1])], [4]).tokens[0].tolist() == alone(1, prompts[1])
    drafter = DraftModelDrafter(draft, max_catch_up_tokens=budget)
    drafter.reserve(5, 128)
    fed = record_feeds(draft)
    rows = [request(i, p) for i, p in enumerate(prompts)]
    drafted_at: dict[int, int] = {}
    for call in range(8):
        fed.clear()
        out = drafter.propose(rows, [4] * len(rows))
        # the first forward is either a catch-up forward within the budget (padded slots) or the drafting
        # forward of rows with short feeds only (at most 8 tokens of catch-up and the last one each)
        assert len(fed[0]) * max(fed[0]) <= budget or max(fed[0]) <= 9, fed
        for j, r in enumerate(rows):
            n = out.num_draft[j]
            if n == 0:
                assert j not in drafted_at, "a row that drafted must not wait again"
                continue
            assert out.tokens[j, :n].tolist() == alone(r.request_id, r.tokens)[:n]
            drafted_at.setdefault(j, call)
        for j, r in enumerate(rows):  # every row commits one token a step (its drafts rejected)
            r.tokens = r.tokens + [7]
    # short prompts draft at once, and the 32-token catch-up that fits the budget; then the 44 and 69
    # tokens (growing by a committed token a call), shortest first, 32 slots a call
    assert drafted_at == {0: 0, 3: 0, 4: 0, 2: 2, 1: 4}


def test_engine_with_a_catch_up_budget_equals_target_greedy():
    """Through the core engine a row that waits for its catch-up is verified without drafts: the
    output stays the target's own greedy continuation, and every block comes back."""
    from conftest import assert_pools_free, greedy_continuations, perturbed_copy
    from specbeam_core import SpecEngine

    target_model = build_model(seed=0)
    draft_model = perturbed_copy(target_model, noise=0.01, seed=1)
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=rng).tolist() for n in (60, 5, 41)]
    expected = greedy_continuations(target_model, prompts, 12)
    drafter = DraftModelDrafter(HFCausalLM(draft_model), max_catch_up_tokens=16)
    engine = SpecEngine(HFCausalLM(target_model), drafter, 3)
    done = engine.generate(prompts, max_new_tokens=12)
    assert [r.tokens[len(r.prompt):] for r in done] == expected
    assert engine.stats.mean_accepted_length > 1.0  # the rows drafted once caught up
    assert_pools_free(engine.target_cache, drafter.cache)
