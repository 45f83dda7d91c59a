"""Token-tree speculative decoding in the engine: greedy exactness, sampling exactness (recursive
rejection sampling over siblings), merged drafters, and the KV pools.

The sampling test is the one of ``test_sampling.py`` (chi-square with small cells merged, p > 1e-3,
and total variation under its McDiarmid bound at delta = 1e-4) on trees; ``test_mutants.py`` runs
it with a verifier that skips the residual update (siblings tried against the unchanged target
distribution), which must fail it.
"""

from __future__ import annotations


import pytest
import torch

import specbeam_hf
from conftest import assert_pools_free, build_model, make_pair, ragged_batch
from specbeam_core import SamplingParams, SpecEngine, TokenTree
from specbeam_core.request import Request
from specbeam_core.drafting_tree import DraftTreeDrafter, MergedTreeDrafter, merge_trees
from specbeam_core.tree_verification import verify_tree_greedy, verify_tree_rejection_sampling
from specbeam_hf import HFCausalLM
from test_sampling import PROMPT, SAMPLING_CASES, VOCAB, empirical, exact_joint, fit


def spec(target, assistant, **kwargs):
    return target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)


@pytest.mark.parametrize("depth", [1, 3, 6])
@pytest.mark.parametrize("lengths", [[7], [5, 9, 1, 12]], ids=["batch1", "batch4"])
def test_tree_greedy_equals_hf(llama_pair, lengths, depth, rows_layout):
    """Both layouts of a batch's ragged tree rows (packed into one row, left-padded)."""
    target, draft = llama_pair
    ids, mask = ragged_batch(lengths, seed=40 + depth)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=depth, drafter="draft_tree", tree_budget=6, tree_width=2)
    out = spec(target, assistant, **kwargs)
    assert torch.equal(out, ref)
    stats = assistant.last_stats
    assert stats.accepted > 0
    assert all(max(len(t) for t in rec.drafted_tokens) <= 6 for rec in stats.records)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)
    assert bool(rows_layout) == (len(lengths) > 1)  # one row needs no layout choice


def test_tree_accepts_more_per_target_pass_than_a_chain(llama_pair):
    target, draft = llama_pair
    ids, mask = ragged_batch([6, 9, 4, 7], seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    chain = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    tree = specbeam_hf.SpecBeam(draft, num_draft_tokens=4, drafter="draft_tree", tree_budget=12, tree_width=3)
    assert torch.equal(spec(target, chain, **kwargs), spec(target, tree, **kwargs))
    assert tree.last_stats.mean_accepted_length > chain.last_stats.mean_accepted_length


def test_eos_inside_a_tree(llama_pair):
    target, draft = llama_pair
    ids, mask = ragged_batch([6, 8], seed=5)
    free = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    eos = int(free[0, ids.shape[1] + 5])  # a token the target emits mid-sequence
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=6, drafter="draft_tree", tree_budget=10)
    assert torch.equal(spec(target, assistant, **kwargs), ref)


def test_merged_drafters_exact_and_deduplicated(llama_pair):
    target, draft = llama_pair
    other = make_pair("llama", seed=5)[1]
    ids, mask = ragged_batch([7, 4], seed=9)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam([draft, draft], num_draft_tokens=4, tree_budget=6)  # identical drafts
    assert isinstance(assistant.drafter, MergedTreeDrafter)
    assert torch.equal(spec(target, assistant, **kwargs), ref)
    assert all(max(len(t) for t in rec.drafted_tokens) <= 6 for rec in assistant.last_stats.records)  # deduplicated
    mixed = specbeam_hf.SpecBeam([draft, other], num_draft_tokens=4, tree_budget=6)
    assert torch.equal(spec(target, mixed, **kwargs), ref)
    for d in mixed.drafter.drafters:
        assert_pools_free(d.cache)


def test_merge_trees_shares_prefixes():
    a = TokenTree([5, 6, 7], [-1, 0, 0])
    b = TokenTree([5, 6, 9, 8], [-1, 0, 1, -1])
    merged = merge_trees([a, b])
    paths = {merged.path_tokens(i) for i in range(len(merged))}
    assert paths == {(5,), (5, 6), (5, 7), (5, 6, 9), (8,)}
    assert len(merged) == 5


def test_tree_verification_greedy_by_hand():
    tree = TokenTree([3, 4, 5, 6], [-1, -1, 0, 1])  # 3 -> 5, 4 -> 6
    logits = torch.full((5, 8), -5.0)
    logits[0, 4] = 1.0  # root: argmax 4 (second child)
    logits[2, 6] = 1.0  # after node 1 (token 4): argmax 6 (its child)
    logits[4, 2] = 1.0  # after node 3 (token 6, a leaf): bonus 2
    res = verify_tree_greedy(tree, logits)
    assert res.accepted_nodes == [1, 3] and res.output_tokens == [4, 6, 2] and res.bonus
    logits[2, 6], logits[2, 7] = -5.0, 1.0  # now the target wants 7 after token 4: recovered
    res = verify_tree_greedy(tree, logits)
    assert res.accepted_nodes == [1] and res.output_tokens == [4, 7] and not res.bonus


def run_tree_engine(target, draft, params: SamplingParams, n: int = 6000):
    drafter = DraftTreeDrafter(HFCausalLM(draft), width=3, budget=5)
    engine = SpecEngine(HFCausalLM(target), drafter, num_draft_tokens=2)
    per_request = [
        SamplingParams(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=i)
        for i in range(n)
    ]
    requests = engine.generate([PROMPT] * n, per_request, max_new_tokens=3)
    assert all(len(r.output) == 3 for r in requests)
    assert_pools_free(engine.target_cache, drafter.cache)
    return [r.output for r in requests], engine.stats


@pytest.mark.parametrize("case", ["temperature", "all"])
def test_tree_sampling_is_exact(small_pair, case):
    target, draft = small_pair
    params = SAMPLING_CASES[case]
    outputs, stats = run_tree_engine(target, draft, params)
    assert stats.accepted > 500 and stats.recovered > 500  # siblings tried, residuals used
    pvalue, tv, bound = fit(empirical(outputs, 3, VOCAB), exact_joint(target, PROMPT, 3, params))
    assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}"
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


def test_tree_sampling_is_exact_with_a_draft_of_another_family(small_pair):
    """A GPT-2 draft (learned positions, its own KV shapes) that knows nothing of the llama target:
    its distributions differ from the target's everywhere, so most siblings are rejected and most
    tokens come from residuals updated several times."""
    target, _ = small_pair
    draft = build_model("gpt2", vocab_size=VOCAB, seed=5, init=0.2)
    params = SAMPLING_CASES["all"]
    outputs, stats = run_tree_engine(target, draft, params)
    assert stats.recovered > 2 * stats.accepted > 500
    pvalue, tv, bound = fit(empirical(outputs, 3, VOCAB), exact_joint(target, PROMPT, 3, params))
    assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}"
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


def test_tree_drafter_rejects_bad_options():
    model = HFCausalLM(build_model("llama"))
    with pytest.raises(ValueError, match="tree width"):
        DraftTreeDrafter(model, width=0)
    with pytest.raises(ValueError, match="node budget"):
        DraftTreeDrafter(model, budget=-1)


def offered_paths(draft, prompt: list[int], width: int, depth: int):
    """What DraftTreeDrafter offers, from full (uncached) draft forwards: every level offers the
    top-``width`` children of the previous level's ``width`` most probable offers and of the greedy
    chain's node. Returns {path: cumulative draft log-probability} and the greedy chain's paths."""

    def log_probs(path):
        with torch.no_grad():
            return torch.log_softmax(draft(torch.tensor([prompt + list(path)])).logits[0, -1].float(), -1)  # [vocab]

    offered: dict[tuple[int, ...], float] = {}
    chain: list[tuple[int, ...]] = []
    frontier = [((), 0.0)]
    for level in range(depth):
        level_offers = []
        for path, cum in frontier:
            top_lp, top_tok = torch.topk(log_probs(path), width)  # [width]
            level_offers += [(path + (t,), cum + lp) for lp, t in zip(top_lp.tolist(), top_tok.tolist())]
            if path == (chain[-1] if chain else ()):
                chain.append(path + (top_tok[0].item(),))
        offered.update(level_offers)
        frontier = sorted(level_offers, key=lambda c: -c[1])[:width]
        if all(p != chain[-1] for p, _ in frontier):
            frontier.append((chain[-1], offered[chain[-1]]))
    return offered, chain


@pytest.mark.parametrize("width,depth,budget", [(2, 3, 4), (3, 3, 7), (4, 4, 10), (3, 5, 9)])
def test_tree_is_the_chain_and_the_most_probable_offers(llama_pair, width, depth, budget):
    """The tree holds the draft's greedy chain (so it never accepts less than the chain), and the rest
    of the budget goes to the most probable offers of any depth (EAGLE-2's reranking), not an even
    share per level."""
    _, draft = llama_pair
    prompt = [5, 17, 3, 9, 22, 4]
    drafter = DraftTreeDrafter(HFCausalLM(draft), width=width, budget=budget)
    drafter.reserve(1, 64)
    request = Request(request_id=0, prompt=prompt, params=SamplingParams(), max_new_tokens=8)
    (tree,) = drafter.propose_trees([request], [depth])
    offered, chain = offered_paths(draft, prompt, width, depth)
    chosen = {tree.path_tokens(i) for i in range(len(tree))}
    assert len(chosen) == len(tree) == budget and chosen <= offered.keys()
    assert set(chain) <= chosen and len(chain) == depth
    # the rest: the most probable offers (up to float rounding between cached and full forwards)
    rest = chosen - set(chain)
    if rest:
        assert min(offered[p] for p in rest) >= max(offered[p] for p in offered.keys() - chosen) - 1e-5
    drafter.release(request)
    assert_pools_free(drafter.cache)


def test_large_tree_budget_fits_the_pools(llama_pair):
    """A tree pass appends every node to the target cache: the pools are sized for the budget, not γ."""
    target, draft = llama_pair
    ids, mask = ragged_batch([6, 9], seed=8)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, drafter="draft_tree", tree_width=8, tree_budget=40)
    assert torch.equal(spec(target, assistant, **kwargs), target.generate(**kwargs))
    assert max(len(t) for rec in assistant.last_stats.records for t in rec.drafted_tokens) > 16
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


def test_tree_verifier_per_node_chi_square():
    """``verify_tree_rejection_sampling`` alone, 20000 draws on a hand tree whose siblings carry
    40 %, 25 % and 15 % of the target's mass (where a missing residual update shows most): after
    every accepted node (and at the root) the next emitted token follows the target's distribution
    there (chi-square per node, each at ``ALPHA`` / the number of nodes tested, so a false alarm
    has probability <= 1e-3; fixed seed)."""
    from test_sampling import ALPHA, P_BASE, fit

    import numpy as np

    # root -> 0, 1, 2; token 0 -> 3, 4; token 1 -> 5; token 3 -> 6
    tree = TokenTree([0, 1, 2, 3, 4, 5, 6], [-1, -1, -1, 0, 0, 1, 3])
    rolls = [0, 3, 5, 7, 6, 1, 2, 4]  # p[1 + i] after node i: its children's tokens get 40 % and 25 %
    p = torch.stack([torch.tensor(P_BASE).roll(s) for s in rolls]).double()
    gen = torch.Generator().manual_seed(0)
    after: dict[int, list[int]] = {}
    for _ in range(20000):
        res = verify_tree_rejection_sampling(tree, p, gen)
        for depth, token in enumerate(res.output_tokens):
            after.setdefault(-1 if depth == 0 else res.accepted_nodes[depth - 1], []).append(token)
    tested = {node: toks for node, toks in after.items() if len(toks) > 200}
    fits = {node: fit(np.bincount(toks, minlength=len(P_BASE)).astype(float), p[node + 1].numpy())[0]
            for node, toks in tested.items()}
    print("\ntree verifier: " + ", ".join(f"after node {k}: n={len(tested[k])} p={v:.3g}" for k, v in sorted(fits.items())))
    assert set(tested) == {-1, 0, 1, 2, 3, 4, 5, 6}  # every node accepted often, leaves' bonus tokens included
    for node, pvalue in fits.items():
        assert pvalue > ALPHA / len(fits), f"after node {node}: chi-square p={pvalue:.2e}"
