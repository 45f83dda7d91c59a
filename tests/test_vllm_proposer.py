"""The vLLM proposer (``specbeam_vllm.proposer.SpecBeamProposer``) driven the way vLLM drives it,
without vLLM: a fake ``vllm_config`` (SimpleNamespace) and the ``propose`` calling convention
(``token_ids_cpu`` [max_reqs, max_model_len] int32, ``num_tokens_no_spec``, per-row committed tokens,
``[]`` for prefill rows). Between steps some drafts are accepted and one recovered/bonus token is
appended, as vLLM's rejection sampler would. Also the plain-torch expand kernel of ``cpu_fix``.
"""

from __future__ import annotations

import itertools
import json
import types

import numpy as np
import pytest
import torch
from conftest import record_feeds
from model_folders import save, small_vocab_pair, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from specbeam_core import Request, SamplingParams, build_kv_batch, hookimpl
from specbeam_vllm.cpu_fix import expand_kernel_impl
from specbeam_vllm.policy import LookupGate, batch_draft_length
import specbeam_vllm.proposer as proposer_module
from specbeam_vllm.proposer import UNCLAIMED_STEPS, SpecBeamProposer

VOCAB = 32
MAX_LEN = 128
MAX_REQS = 8
GAMMA = 3


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(target folder, draft folder) of a 32-token word vocabulary."""
    return small_vocab_pair(tmp_path_factory.mktemp("vllm_pair"))


@pytest.fixture(scope="module")
def draft_hf(folders):
    """The draft loaded independently, for from-scratch references."""
    return AutoModelForCausalLM.from_pretrained(folders[1], dtype=torch.float32).eval()


def vllm_config(draft, *, gamma=GAMMA, max_model_len=MAX_LEN, max_num_seqs=MAX_REQS, tokenizer=None,
                vocab=VOCAB, seed=0, additional=None, **options):
    """A stand-in for vLLM's ``VllmConfig`` with what the proposer reads."""
    model_config = types.SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: vocab, seed=seed,
                                         dtype=torch.float32, tokenizer=tokenizer)
    if additional is None:
        additional = {"specbeam": {"draft": draft, **options}}
    return types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=gamma),
        model_config=model_config,
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs),
        additional_config=additional,
        device_config=types.SimpleNamespace(device_type="cpu"),
    )


def make_proposer(folders, **kwargs):
    """A proposer that drafts the full length for every batch size unless the test sets the policy."""
    kwargs.setdefault("tokenizer", folders[0])
    full_length = {"full_draft_max_batch": MAX_REQS, "no_draft_min_batch": MAX_REQS + 1}
    section = (kwargs.get("additional") or {}).get("specbeam")
    if isinstance(section, dict):
        kwargs["additional"] = {"specbeam": {**full_length, **section}}
    elif "full_draft_max_batch" not in kwargs and "no_draft_min_batch" not in kwargs:
        kwargs.update(full_length)
    return SpecBeamProposer(vllm_config(folders[1], **kwargs))


_junk = np.random.default_rng(12345)


def call(proposer, rows, committed, max_len=MAX_LEN):
    """One ``propose`` call as vLLM makes it: row i holds ``rows[i]``; ``committed[i]`` is what this
    step committed for row i (``[]`` for a prefill row). Stale junk fills every slot past a row's
    verified tokens (vLLM leaves rejected drafts there), and the unused rows of the matrix."""
    token_ids = _junk.integers(3, VOCAB, size=(MAX_REQS, max_len)).astype(np.int32)
    num = _junk.integers(0, max_len, size=MAX_REQS).astype(np.int32)
    for i, toks in enumerate(rows):
        token_ids[i, : len(toks)] = toks
        num[i] = len(toks)
    out = proposer.propose([list(c) for c in committed], num, token_ids)
    assert isinstance(out, list) and len(out) == len(rows)
    return out


def greedy_reference(model, tokens, g):
    """The draft's own greedy continuation, recomputed from scratch with plain HF forwards."""
    ids = list(tokens)
    out = []
    with torch.no_grad():
        for _ in range(g):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def advance(tokens, drafts, k, rng):
    """Accept ``k`` drafts and append a recovered token (differs from the next draft) or a bonus token."""
    k = min(k, len(drafts))
    extra = int(rng.integers(3, VOCAB))
    if k < len(drafts):
        while extra == drafts[k]:
            extra = int(rng.integers(3, VOCAB))
    committed = list(drafts[:k]) + [extra]
    return list(tokens) + committed, committed


def prompts(n, rng, low=4, high=30):
    return [rng.integers(3, VOCAB, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------- 1. greedy = reference


def test_greedy_drafts_equal_reference_with_rollback(folders, draft_hf):
    p = make_proposer(folders)
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, VOCAB, size=n).tolist() for n in (5, 17, 30)]  # 17 > KEY_LEN: crosses the key
    # step 1: row 0 still in prefill (its committed list is empty), rows 1-2 got their first token
    committed = [[], [rows[1][-1]], [rows[2][-1]]]
    out = call(p, rows, committed)
    assert out[0] == []
    for i in (1, 2):
        assert out[i] == greedy_reference(draft_hf, rows[i], GAMMA)
    rows[0] = rows[0] + [7]  # prefill done, first token sampled
    committed = [[7], [], []]
    accept_plan = [0, 1, 2, 3, 3, 0, 2, 1]  # 3 = all drafts accepted plus a bonus token
    drafts = out
    for step in range(6):
        new_rows, committed = [], []
        for i, toks in enumerate(rows):
            if step == 0 and i == 0:
                new_rows.append(toks)
                committed.append([7])
                continue
            t, c = advance(toks, drafts[i], accept_plan[(step + i) % len(accept_plan)], rng)
            new_rows.append(t)
            committed.append(c)
        rows = new_rows
        drafts = call(p, rows, committed)
        for i, toks in enumerate(rows):
            assert drafts[i] == greedy_reference(draft_hf, toks, GAMMA), f"step {step}, row {i}"
    assert p.stats()["states_created"] == 3
    assert p.take_last_draft_probs() is None  # greedy rows only: no probabilities


# ----------------------------------------------------------------------------- 2. reordered rows


@pytest.mark.parametrize("with_ids", [False, True], ids=["by-tokens", "by-request-id"])
def test_reordered_dropped_and_added_rows(folders, draft_hf, with_ids):
    """Rows follow their requests through reordering, dropping and adding: matched by their tokens
    alone, or by vLLM's request ids where the runner hook passes them (the same states either way)."""
    p = make_proposer(folders)
    rng = np.random.default_rng(2)
    shared = rng.integers(3, VOCAB, size=20).tolist()
    reqs = {
        "A": rng.integers(3, VOCAB, size=9).tolist(),
        "B": shared + [5, 6],  # B and E share their first 20 tokens (same matcher key)
        "C": rng.integers(3, VOCAB, size=25).tolist(),
        "E": shared + [6, 5],
    }
    drafts: dict[str, list[int]] = {}
    seen: dict[str, list[int]] = {}  # per request: tokens its draft KV should hold
    first_feeds = record_feeds(p.drafter.model)

    def step(order, prefill=()):
        rows = [reqs[r] for r in order]
        committed = [[] if r in prefill else [reqs[r][-1]] for r in order]
        first_feeds.clear()
        p.batch_req_ids = list(order) if with_ids else None
        out = call(p, rows, committed)
        decoding = [r for r in order if r not in prefill]
        # each row continues its own request's draft KV: only its unseen tokens are fed
        expected = []
        for r in decoding:
            toks = reqs[r]
            expected.append(len(toks) - min(lcp(seen.get(r, []), toks), len(toks) - 1))
        if len(first_feeds[0]) == len(expected):
            assert first_feeds[0] == expected, order
        else:  # long catch-ups went first, in a forward of their own (all but their last token)
            long = [e > 8 for e in expected]
            assert first_feeds[0] == [e - 1 for e, is_long in zip(expected, long) if is_long], order
            assert first_feeds[1] == [1 if is_long else e for e, is_long in zip(expected, long)], order
        for r, d in zip(order, out):
            if r in prefill:
                assert d == []
            else:
                assert d == greedy_reference(draft_hf, reqs[r], GAMMA), r
                drafts[r] = d
                seen[r] = reqs[r] + d[:-1]

    def move_on(names, k=1):
        for r in names:
            reqs[r], _ = advance(reqs[r], drafts[r], k, rng)

    step(["A", "B", "C", "E"])
    assert p.stats()["states_created"] == 4
    move_on("ABCE", 2)
    step(["E", "C", "A", "B"])  # reordered
    assert p.stats()["states_created"] == 4
    move_on("ABCE", 0)
    reqs["D"] = rng.integers(3, VOCAB, size=12).tolist()
    step(["C", "D", "E", "A"], prefill={"D"})  # B dropped, D added (prefill)
    assert p.stats()["states_created"] == 4
    move_on("ACE", 3)
    reqs["D"] = reqs["D"] + [11]
    step(["D", "A", "E", "C"])  # D decoding now, everything reordered again
    assert p.stats()["states_created"] == 5
    move_on("ACDE", 1)
    step(["A", "C", "D", "E"])
    assert p.stats()["states_created"] == 5
    assert p.stats()["states"] == 4  # B's state was freed after UNCLAIMED_STEPS steps


def test_request_ids_decide_over_tokens(folders):
    """With the batch's request ids, a new request whose tokens equal a live one's gets its own state,
    and a known id whose tokens no longer extend its state (never seen from vLLM) starts afresh."""
    p = make_proposer(folders)
    rng = np.random.default_rng(21)
    prompt = rng.integers(3, VOCAB, size=12).tolist()
    p.batch_req_ids = ["x"]
    call(p, [prompt], [[prompt[-1]]])
    x_state = p.matcher.states()[0]
    assert x_state.req_id == "x" and p.stats()["states_created"] == 1
    p.batch_req_ids = ["y", "x"]  # y: same tokens as x, a different request
    call(p, [prompt, prompt], [[prompt[-1]], [prompt[-1]]])
    assert p.stats()["states_created"] == 2 and p._by_req_id["x"] is x_state
    assert p._by_req_id["y"] is not x_state
    other = rng.integers(3, VOCAB, size=12).tolist()
    p.batch_req_ids = ["x", "y"]
    call(p, [other, prompt], [[other[-1]], [prompt[-1]]])
    assert p.stats()["states_created"] == 3 and p._by_req_id["x"] is not x_state
    for _ in range(UNCLAIMED_STEPS):
        call(p, [other, prompt], [[other[-1]], [prompt[-1]]])
    assert p.stats()["states"] == 2  # x's first state, no longer claimed, was freed
    p.finish_requests(["x", "y"])
    s = p.stats()
    assert s["states"] == 0 and s["free_blocks"] == s["baseline_free_blocks"]


# ----------------------------------------------------------------------------- 3. fed tokens


def test_accepted_tokens_are_not_recomputed(folders):
    p = make_proposer(folders)
    calls = record_feeds(p.drafter.model)
    rng = np.random.default_rng(3)
    rows = prompts(3, rng, 6, 40)
    committed = [[r[-1]] for r in rows]
    seen: list[list[int]] = [[] for _ in rows]  # what the draft KV should hold per row
    plan = [[0, 3, 1], [2, 0, 3], [3, 3, 0], [1, 2, 2], [0, 0, 0]]
    for step in range(len(plan) + 1):
        calls.clear()
        out = call(p, rows, committed)
        feeds = [len(r) - min(lcp(s, r), len(r) - 1) for s, r in zip(seen, rows)]
        assert len(calls) == GAMMA
        assert calls[0] == feeds, f"step {step}"
        assert all(c == [1, 1, 1] for c in calls[1:])
        if step > 0:
            assert sum(map(sum, calls)) == sum(feeds) + len(rows) * (GAMMA - 1)
            assert max(feeds) <= GAMMA + 1  # never more than the drafts accepted plus the bonus
        seen = [list(r) + d[:-1] for r, d in zip(rows, out)]
        if step < len(plan):
            new = [advance(r, d, k, rng) for r, d, k in zip(rows, out, plan[step])]
            rows = [t for t, _ in new]
            committed = [c for _, c in new]


# ----------------------------------------------------------------------------- 4. states, seeds, freeing


def test_same_prompt_states_seeds_and_freeing(folders):
    p = make_proposer(folders)
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, VOCAB, size=10).tolist()
    rows = [prompt + [9], prompt + [9]]  # two requests, same prompt, same first token
    p.batch_params = [SamplingParams(do_sample=True, temperature=1.0)] * 2
    p.batch_req_ids = ["r0", "r1"]
    out = call(p, rows, [[9], [9]])
    assert all(len(d) == GAMMA for d in out)
    states = p.matcher.states()
    assert len(states) == 2 and p.stats()["states_created"] == 2
    assert states[0] is not states[1]
    assert states[0].request.params.seed != states[1].request.params.seed
    gens = [s.request.generator for s in states]
    assert all(g is not None for g in gens)
    assert gens[0].initial_seed() != gens[1].initial_seed()
    assert {s.req_id for s in states} == {"r0", "r1"}

    rows = [advance(r, d, 1, rng)[0] for r, d in zip(rows, out)]
    call(p, rows, [[r[-1]] for r in rows])
    assert p.stats()["states"] == 2 and p.stats()["states_created"] == 2

    # r1 stops appearing: kept for UNCLAIMED_STEPS - 1 steps, freed at the UNCLAIMED_STEPS-th
    p.batch_params, p.batch_req_ids = p.batch_params[:1], ["r0"]
    for k in range(1, UNCLAIMED_STEPS + 1):
        rows = [rows[0] + [4]]
        call(p, rows, [[4]])
        expected = 2 if k < UNCLAIMED_STEPS else 1
        assert p.stats()["states"] == expected, k
    assert p.stats()["states_freed"] == 1
    assert [s.req_id for s in p.matcher.states()] == ["r0"]

    p.finish_requests([])  # nothing
    p.finish_requests(["unknown"])
    assert p.stats()["states"] == 1
    p.finish_requests(["r0"])  # vLLM reports r0 finished: freed at once
    s = p.stats()
    assert s["states"] == 0 and s["states_freed"] == 2
    assert s["free_blocks"] == s["baseline_free_blocks"] and s["used_blocks"] == 0
    assert p.cache.num_sequences == 0


def test_unclaimed_states_freed_by_empty_steps_and_no_leak(folders):
    p = make_proposer(folders)
    rng = np.random.default_rng(5)
    rows = prompts(4, rng)
    call(p, rows, [[r[-1]] for r in rows])
    assert p.stats()["used_blocks"] > 0
    for _ in range(UNCLAIMED_STEPS):
        call(p, [], [])  # steps with no decoding rows still age the states
    s = p.stats()
    assert s["states"] == 0 and s["states_freed"] == 4
    assert s["free_blocks"] == s["baseline_free_blocks"]


# ----------------------------------------------------------------------------- 5. bounded pool


def test_bounded_pool_skips_and_evicts(folders):
    # 64 slots of 16 tokens: 4 + 2 blocks, 5 usable; a row of 20 tokens + 3 drafts needs 2 blocks
    p = make_proposer(folders, draft_kv_tokens=64, block_size=16)
    assert p.stats()["total_blocks"] == 5
    rng = np.random.default_rng(6)
    a, b, c = (rng.integers(3, VOCAB, size=20).tolist() for _ in range(3))
    out = call(p, [a], [[a[-1]]])
    assert len(out[0]) == GAMMA
    a, _ = advance(a, out[0], 1, rng)
    out = call(p, [a, b], [[a[-1]], [b[-1]]])
    assert all(len(d) == GAMMA for d in out)
    assert p.stats()["free_blocks"] == 1
    a, _ = advance(a, out[0], 1, rng)
    b, _ = advance(b, out[1], 1, rng)
    out = call(p, [c, a, b], [[c[-1]], [a[-1]], [b[-1]]])  # no room for c; a and b are busy
    assert out[0] == [] and len(out[1]) == GAMMA and len(out[2]) == GAMMA
    assert p.stats()["rows_skipped_pool_full"] == 1
    a, _ = advance(a, out[1], 0, rng)
    out = call(p, [a, c], [[a[-1]], [c[-1]]])  # b idle this step: evicted to make room for c
    assert len(out[0]) == GAMMA and len(out[1]) == GAMMA
    assert p.stats()["states_freed"] == 1 and p.stats()["states"] == 2
    p.batch_req_ids = None
    for _ in range(UNCLAIMED_STEPS):
        call(p, [], [])
    s = p.stats()
    assert s["states"] == 0 and s["free_blocks"] == s["baseline_free_blocks"]


def test_bounded_pool_many_new_rows_at_once(folders):
    p = make_proposer(folders, draft_kv_tokens=64, block_size=16)
    rng = np.random.default_rng(7)
    rows = [rng.integers(3, VOCAB, size=20).tolist() for _ in range(4)]  # 2 blocks each, 5 usable
    out = call(p, rows, [[r[-1]] for r in rows])  # must not raise
    assert sum(1 for d in out if d == []) >= 2
    assert all(len(d) in (0, GAMMA) for d in out)
    assert p.stats()["rows_skipped_pool_full"] >= 2
    p.batch_req_ids = None
    for _ in range(UNCLAIMED_STEPS):
        call(p, [], [])
    assert p.stats()["free_blocks"] == p.stats()["baseline_free_blocks"]


# ----------------------------------------------------------------------------- 6. tensor-parallel seeding


def _tp_run(p, advance_global, steps=3):
    """Run a fixed call sequence; advance the process's global RNGs between calls."""
    rng = np.random.default_rng(8)
    rows = prompts(6, rng)
    params = [SamplingParams(do_sample=True, temperature=1.0), SamplingParams(do_sample=True, temperature=1.5),
              SamplingParams(do_sample=True, temperature=0.8, top_k=8), SamplingParams(),
              SamplingParams(do_sample=True, temperature=1.0, top_p=0.9), SamplingParams(do_sample=True)]
    results = []
    for step in range(steps):
        advance_global(step)
        p.batch_params = params
        out = call(p, rows, [[r[-1]] for r in rows])
        probs = p.take_last_draft_probs()
        results.append((out, probs))
        rows = [advance(r, d, 1, rng)[0] for r, d in zip(rows, out)]
    return results


def test_tensor_parallel_ranks_draft_alike(folders):
    def rank_a(step):
        torch.manual_seed(100 + step)
        np.random.seed(100 + step)

    def rank_b(step):
        torch.manual_seed(7 * step + 1)
        torch.rand(1000)
        np.random.seed(3 + step)
        np.random.rand(77)

    ra = _tp_run(make_proposer(folders, seed=5), rank_a)
    rb = _tp_run(make_proposer(folders, seed=5), rank_b)
    for (out_a, probs_a), (out_b, probs_b) in zip(ra, rb):
        assert out_a == out_b
        assert probs_a is not None and torch.equal(probs_a, probs_b)

    # the seed comes from the configuration: another option seed, other drafts
    rc = _tp_run(make_proposer(folders, seed=5, additional={"specbeam": {"draft": folders[1], "seed": 77}}), rank_a)
    assert [o for o, _ in ra] != [o for o, _ in rc]
    # vLLM's --seed is the default when the option is not set
    rd = _tp_run(make_proposer(folders, seed=77), rank_b)
    assert [o for o, _ in rd] == [o for o, _ in rc]


# ----------------------------------------------------------------------------- 7. draft probabilities


def test_draft_probabilities(folders, draft_hf):
    # every row caught up at once: row 4's 125-token catch-up padded with the others' would pass the default budget
    p = make_proposer(folders, max_catch_up_tokens=0)
    rng = np.random.default_rng(9)
    rows = prompts(5, rng)
    rows[4] = rng.integers(3, VOCAB, size=MAX_LEN - 2).tolist()  # room for one draft only
    committed = [[], [rows[1][-1]], [rows[2][-1]], [rows[3][-1]], [rows[4][-1]]]
    p.batch_params = [SamplingParams(do_sample=True), SamplingParams(),
                      SamplingParams(do_sample=True, temperature=1.0),
                      SamplingParams(do_sample=True, temperature=0.7, top_k=5),
                      SamplingParams(do_sample=True, temperature=1.3)]
    out = call(p, rows, committed)
    probs = p.take_last_draft_probs()
    assert p.take_last_draft_probs() is None  # handed over once
    assert probs is not None and probs.shape == (5, GAMMA, VOCAB)
    assert out[0] == [] and torch.all(probs[0] == 0)  # prefill row: no drafts, zeros
    # greedy row: one-hot at each drafted token
    assert len(out[1]) == GAMMA
    expected = torch.zeros(GAMMA, VOCAB)
    expected[torch.arange(GAMMA), torch.tensor(out[1])] = 1.0
    assert torch.equal(probs[1], expected)
    assert out[1] == greedy_reference(draft_hf, rows[1], GAMMA)
    # sampled rows: distributions, positive at the drafted token
    for i in (2, 3, 4):
        g = len(out[i])
        assert g == (1 if i == 4 else GAMMA)
        assert torch.allclose(probs[i, :g].sum(-1), torch.ones(g), atol=1e-5)
        assert torch.all(probs[i, :g] >= 0)
        assert all(float(probs[i, j, t]) > 0 for j, t in enumerate(out[i]))
        assert torch.all(probs[i, g:] == 0)
    assert int((probs[3] > 0).sum(-1).max()) <= 5  # top-k 5
    # they are the draft's own distributions (temperature 1, no filtering) along the drafted chain
    with torch.no_grad():
        for j in range(GAMMA):
            logits = draft_hf(torch.tensor([rows[2] + out[2][:j]])).logits[0, -1]
            assert torch.allclose(probs[2, j], torch.softmax(logits, -1), atol=1e-4)
        logits = draft_hf(torch.tensor([rows[4]])).logits[0, -1]
        assert torch.allclose(probs[4, 0], torch.softmax(logits / 1.3, -1), atol=1e-4)

    # every row greedy: no probabilities
    p.batch_params = [SamplingParams()] * 5
    call(p, rows, committed)
    assert p.take_last_draft_probs() is None
    # sample_drafts off: sampled rows draft greedily, verified as one-hot (no probabilities)
    q = make_proposer(folders, sample_drafts=False)
    q.batch_params = [SamplingParams(do_sample=True)] * 5
    out = call(q, rows, committed)
    assert q.take_last_draft_probs() is None
    assert out[2] == greedy_reference(draft_hf, rows[2], GAMMA)


# ----------------------------------------------------------------------------- 8. draft-length policy


def test_batch_draft_length_shape():
    for default, full, none in [(4, 4, 12), (3, 1, 4), (5, 0, 1), (8, 2, 30)]:
        values = [batch_draft_length(b, default, full, none) for b in range(none + 5)]
        assert all(v == default for v in values[: full + 1])
        assert all(v == 0 for v in values[none:])
        assert all(0 <= v <= default for v in values)
        assert all(x >= y for x, y in itertools.pairwise(values)), values
    assert batch_draft_length(8, 4, 4, 12) == 2  # halfway: half the draft


def test_default_batch_policy_applies_in_proposer(folders):
    p = make_proposer(folders, full_draft_max_batch=1, no_draft_min_batch=4)
    rng = np.random.default_rng(10)
    rows = prompts(5, rng)
    committed = [[r[-1]] for r in rows]
    # 2 decoding rows (+1 prefill row, which does not count): batch_draft_length(2, 3, 1, 4) == 2
    out = call(p, rows[:3], [[]] + committed[1:3])
    assert out[0] == [] and [len(d) for d in out[1:]] == [batch_draft_length(2, GAMMA, 1, 4)] * 2 == [2, 2]
    # 4 decoding rows: no drafting at all, no draft forward
    before = p.drafter.model.forward_count
    out = call(p, rows[:4], committed[:4])
    assert out == [[]] * 4 and p.drafter.model.forward_count == before


def test_catch_up_after_a_load_drop_is_bounded_per_step(folders, draft_hf):
    """Rows decoded without drafts while the batch was large are caught up within
    ``max_catch_up_tokens`` a step once it shrinks; each drafts as soon as it is caught up, exactly
    the draft's own greedy continuation; the unbounded setting catches them all up at once."""
    from specbeam_vllm.options import catch_up_budget, parse_options

    assert make_proposer(folders).drafter.max_catch_up_tokens == 256  # the default on the CPU
    assert make_proposer(folders, max_catch_up_tokens=0).drafter.max_catch_up_tokens is None  # unbounded
    options = parse_options({"specbeam": {"draft": folders[1]}})
    scheduler = types.SimpleNamespace(max_num_batched_tokens=2048)
    assert catch_up_budget(options, on_cpu=False, scheduler_config=scheduler) == 2048  # the target's step budget
    assert catch_up_budget(options, on_cpu=False, scheduler_config=types.SimpleNamespace()) is None
    options = parse_options({"specbeam": {"draft": folders[1], "max_catch_up_tokens": 64}})
    assert catch_up_budget(options, on_cpu=False, scheduler_config=scheduler) == 64
    rng = np.random.default_rng(21)
    start = prompts(6, rng, low=20, high=26)
    for budget, bounded in ((16, True), (0, False)):
        p = make_proposer(folders, full_draft_max_batch=2, no_draft_min_batch=4, max_catch_up_tokens=budget)
        assert p.drafter.max_catch_up_tokens == (budget or None)
        rows = [list(r) for r in start]
        for _ in range(6):  # 6 decoding rows: no drafting, the draft sees none of their tokens
            assert call(p, rows, [[r[-1]] for r in rows]) == [[]] * 6
            rows = [r + [int(rng.integers(3, VOCAB))] for r in rows]
        rows = rows[:2]  # the batch drops to 2 rows: each has ~30 tokens the draft has not seen
        fed = record_feeds(p.drafter.model)
        waited = [0, 0]
        for _ in range(6):
            fed.clear()
            out = call(p, rows, [[r[-1]] for r in rows])
            if bounded:
                assert len(fed[0]) * max(fed[0]) <= budget or max(fed[0]) <= 9, fed
            for j, d in enumerate(out):
                if not d:
                    waited[j] += 1
                else:
                    assert d == greedy_reference(draft_hf, rows[j], GAMMA)
            rows = [r + [int(rng.integers(3, VOCAB))] for r in rows]
        assert (waited[0] > 0 and waited[1] > waited[0]) if bounded else waited == [0, 0], waited
        assert p.stats()["rows_waiting_for_catch_up"] == sum(waited)
        assert all(d for d in out)  # both caught up and drafting by the end


def test_user_plugin_sets_draft_length(folders):
    p = make_proposer(folders)
    rng = np.random.default_rng(10)
    rows = prompts(5, rng)
    committed = [[r[-1]] for r in rows]
    seen_batches = []

    class OneToken:
        @hookimpl
        def specbeam_draft_length(self, requests, default):
            seen_batches.append((len(requests), default))
            return 1

    plugin = OneToken()
    p.pm.register(plugin)
    out = call(p, rows[:4], [[]] + committed[1:4])
    assert out[0] == [] and [len(d) for d in out[1:]] == [1, 1, 1]
    assert seen_batches[-1] == (3, GAMMA)
    p.pm.unregister(plugin)

    class Zero:
        @hookimpl
        def specbeam_draft_length(self, requests, default):
            return 0

    p.pm.register(Zero())
    before = p.drafter.model.forward_count
    out = call(p, rows[:2], committed[:2])
    assert out == [[], []] and p.drafter.model.forward_count == before
    assert p.take_last_draft_probs() is None


def test_batch_policy_alone_decides_without_the_hook_call(folders, monkeypatch):
    """With only the built-in batch policy answering, a batch it gives no drafts returns at once
    (no per-row view is built for the hook); a plugin registered later is asked as before."""
    p = make_proposer(folders, full_draft_max_batch=1, no_draft_min_batch=2)
    rows = prompts(3, np.random.default_rng(17))
    committed = [[r[-1]] for r in rows]
    made = []
    monkeypatch.setattr(proposer_module, "Request", lambda **kw: made.append(kw) or Request(**kw))
    assert p._batch_policy_decides()
    assert call(p, rows, committed) == [[], [], []] and p.step == 1
    assert made == []  # decided from the row count alone: no placeholder requests for the hook
    assert [len(d) for d in call(p, rows[:1], committed[:1])] == [GAMMA]  # one row: full length

    class Two:
        @hookimpl
        def specbeam_draft_length(self, requests, default):
            return 2

    p.pm.register(Two())
    assert not p._batch_policy_decides()
    assert [len(d) for d in call(p, rows, committed)] == [2, 2, 2]


def test_plugin_draft_length_above_num_speculative_tokens(folders):
    p = make_proposer(folders)

    class Six:
        @hookimpl
        def specbeam_draft_length(self, requests, default):
            return 6

    p.pm.register(Six())
    rng = np.random.default_rng(11)
    rows = prompts(2, rng)
    committed = [[r[-1]] for r in rows]
    try:
        out = call(p, rows, committed)
        assert all(len(d) <= GAMMA for d in out)
        p.batch_params = [SamplingParams(do_sample=True)] * 2
        out = call(p, rows, committed)
        assert all(len(d) <= GAMMA for d in out)
    except ValueError as err:  # refusing it with a message is fine too
        assert "num_speculative_tokens" in str(err)


def test_lookup_drafts_where_the_policy_gives_the_draft_nothing(folders):
    """At a batch the policy gives no draft-model drafts, ``lookup_draft_tokens`` drafts by prompt
    lookup (no draft forward), only for rows whose last tokens occurred before, capped at γ and at
    the context; the next step's committed tokens are their verdict."""
    p = make_proposer(folders, full_draft_max_batch=1, no_draft_min_batch=4, lookup_draft_tokens=2)
    line = [5, 9, 14, 7]
    rows = [line * 3 + line[:2], [3, 4, 5, 6, 7, 8], line + [20, 21] + line[:3], [10, 11, 10, 11, 10]]
    forwards = p.drafter.model.forward_count
    out = call(p, rows, [[r[-1]] for r in rows])
    assert out == [[14, 7], [], [7, 20], [11, 10]]
    assert p.drafter.model.forward_count == forwards and len(p.matcher) == 0  # no model, no draft state
    # the verdict: row 0 kept both drafts (+ bonus), row 1 had none, row 2 none kept, row 3 one
    committed = [[14, 7, 5], [9], [8], [11, 4]]
    rows = [r + c for r, c in zip(rows, committed)]
    out = call(p, rows, committed)
    assert (p.counters["lookup_tokens"], p.counters["lookup_accepted"]) == (6 + sum(map(len, out)), 3)
    assert p.lookup_gate.rate == 0.5
    # a plugin's draft length is capped at γ; the context caps it too
    p = make_proposer(folders, full_draft_max_batch=1, no_draft_min_batch=4, lookup_draft_tokens=8)
    near_end = ([1, 2, 3] * 50)[: MAX_LEN - 2]
    out = call(p, [rows[0], [10, 11, 10, 11, 10], near_end, rows[1]], [[1]] * 4)
    assert [len(d) for d in out] == [GAMMA, GAMMA, 1, 0]
    # below no_draft_min_batch the draft model drafts, not the lookup
    assert [len(d) for d in call(p, rows[:1], [[1]])] == [GAMMA] and p.counters["proposals"] == 1


def test_lookup_gate_closes_when_lookups_do_not_pay(folders):
    p = make_proposer(folders, full_draft_max_batch=1, no_draft_min_batch=2, lookup_draft_tokens=3,
                      lookup_min_acceptance=0.5)
    rows = [[5, 6, 7, 5, 6], [8, 9, 8, 9]]
    drafted = []
    for _ in range(20):  # every draft rejected: the row goes on with a token that never repeats
        out = call(p, rows, [[r[-1]] for r in rows])
        drafted.append(sum(map(len, out)))
        rows = [r + [30 - len(r)] + r[:3] for r in rows]  # a new token, then the start again: lookups find it
    # judged tokens pass the 16 of evidence after 3 steps of 6; then one probing step in 16
    assert drafted[:3] == [6, 6, 6] and drafted[3:18] == [0] * 15 and drafted[18] == 6


def test_lookup_gate_per_request(folders):
    """With vLLM's request ids, each request has its own gate: one whose lookups keep failing stops
    drafting by lookup (then probes one step in 4) while the batch's other request goes on."""
    p = make_proposer(folders, full_draft_max_batch=1, no_draft_min_batch=2, lookup_draft_tokens=2)
    loop, fails = [5, 6, 7, 5, 6], [8, 9, 8, 9]
    drafted = {"loop": [], "fails": []}
    committed = [[6], [9]]
    for step in range(22):
        p.batch_req_ids = ["loop", "fails"]
        out = call(p, [loop, fails], committed)
        drafted["loop"].append(len(out[0]))
        drafted["fails"].append(len(out[1]))
        bonus = [5, 6, 7][(len(loop) + len(out[0])) % 3]  # "loop" repeats 5 6 7: its drafts are all kept
        committed = [out[0] + [bonus], [20 + step % 8]]  # and none of "fails"'s
        loop = loop + committed[0]
        fails = fails + [20 + step % 8] + fails[:2]  # a new token, then a repeat: lookups find a match, then fail
    assert drafted["loop"] == [2] * 22  # the batch gate stays open: half of all lookup tokens kept at first
    # "fails" judged on 2 tokens a step: past 4 tokens of evidence after its third verdict, then a probe in 4
    assert drafted["fails"][:3] == [2, 2, 2] and drafted["fails"][3:] == ([0, 0, 0, 2] * 5)[:19]
    assert p.counters["lookup_accepted"] == 2 * 21 and set(p._lookup_gates) == {"loop", "fails"}
    p.finish_requests(["fails"])
    assert set(p._lookup_gates) == {"loop"}


def test_lookup_gate_rate_and_probes():
    gate = LookupGate(0.4, decay=0.5, min_evidence=4, probe_every=3)
    assert gate.open() and gate.rate is None
    gate.record(4, 1)  # 25 %: below the threshold, with enough evidence
    assert [gate.open() for _ in range(6)] == [False, False, True, False, False, True]
    gate.record(4, 4)  # (1 * 0.5 + 4) / (4 * 0.5 + 4) = 75 %
    assert gate.rate == 0.75 and gate.open()


def test_drafts_capped_at_max_model_len(folders, draft_hf):
    max_len = 40
    p = make_proposer(folders, max_model_len=max_len)
    p.pm.unregister(name="specbeam-vllm-batch-policy")  # six rows: keep the full draft length
    rng = np.random.default_rng(12)
    lengths = [34, 36, 37, 38, 39, 40]
    rows = [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]
    out = call(p, rows, [[r[-1]] for r in rows], max_len=max_len)
    for toks, d in zip(rows, out):
        allowed = max(0, min(GAMMA, max_len - len(toks) - 1))  # drafts + the bonus token fit
        assert len(d) == allowed
        assert len(toks) + len(d) + 1 <= max_len or not d
        assert d == greedy_reference(draft_hf, toks, allowed)


# ----------------------------------------------------------------------------- 9. bad setups


def permuted_tokenizer(vocab_size, seed=0):
    perm = np.random.default_rng(seed).permutation(vocab_size)
    vocab = {f"w{int(perm[i])}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"w{int(perm[0])}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def bad_drafts(tmp_path_factory, folders):
    root = tmp_path_factory.mktemp("bad_drafts")
    vocab40 = save(tiny_llama(40, seed=3), root / "vocab40")
    permuted = save(tiny_llama(VOCAB, seed=4), root / "permuted")
    permuted_tokenizer(VOCAB).save_pretrained(permuted)
    empty = root / "empty"
    empty.mkdir()
    return {"vocab40": vocab40, "permuted": permuted, "empty": str(empty)}


@pytest.mark.parametrize("case, match", [
    ("no_additional_config", r"needs a draft model.*additional-config"),
    ("empty_additional_config", r"needs a draft model"),
    ("section_not_object", r"must be a JSON object"),
    ("missing_folder", r"does not exist"),
    ("no_config_json", r"no config\.json"),
    ("unknown_key", r"bad specbeam option.*gamma"),
    ("policy_order", r"no_draft_min_batch \(4\) must be greater than full_draft_max_batch \(4\)"),
    ("bad_dtype", r"dtype must be float32, bfloat16 or float16"),
    ("catch_up_negative", r"bad specbeam option.*max_catch_up_tokens"),
    ("lookup_negative", r"bad specbeam option.*lookup_draft_tokens"),
    ("lookup_ngrams", r"lookup_max_ngram \(2\) must be at least lookup_min_ngram \(3\)"),
    ("vocab40", r"vocabulary"),
    ("vocab40_no_tokenizer", r"vocabulary of 32 tokens but the target has 40"),
    ("permuted_tokenizer", r"different vocabulary.*token/id pairs differ"),
    ("too_long", r"handles 256 positions but --max-model-len is 300"),
])
def test_bad_setup_errors(folders, bad_drafts, case, match):
    target, draft = folders
    kwargs = {"tokenizer": target}
    if case == "no_additional_config":
        cfg = vllm_config(draft, additional={}, **kwargs)
        cfg.additional_config = None
    elif case == "empty_additional_config":
        cfg = vllm_config(draft, additional={"other": 1}, **kwargs)
    elif case == "section_not_object":
        cfg = vllm_config(draft, additional={"specbeam": draft}, **kwargs)
    elif case == "missing_folder":
        cfg = vllm_config(draft + "-missing", **kwargs)
    elif case == "no_config_json":
        cfg = vllm_config(bad_drafts["empty"], **kwargs)
    elif case == "unknown_key":
        cfg = vllm_config(draft, additional={"specbeam": {"draft": draft, "gamma": 3}}, **kwargs)
    elif case == "policy_order":
        cfg = vllm_config(draft, full_draft_max_batch=4, no_draft_min_batch=4, **kwargs)
    elif case == "bad_dtype":
        cfg = vllm_config(draft, dtype="int8", **kwargs)
    elif case == "catch_up_negative":
        cfg = vllm_config(draft, max_catch_up_tokens=-1, **kwargs)
    elif case == "lookup_negative":
        cfg = vllm_config(draft, lookup_draft_tokens=-1, **kwargs)
    elif case == "lookup_ngrams":
        cfg = vllm_config(draft, lookup_min_ngram=3, lookup_max_ngram=2, **kwargs)
    elif case == "vocab40":
        cfg = vllm_config(bad_drafts["vocab40"], **kwargs)
    elif case == "vocab40_no_tokenizer":  # target 40, draft 32: smaller than the target
        cfg = vllm_config(draft, vocab=40, tokenizer=None)
    elif case == "permuted_tokenizer":
        cfg = vllm_config(bad_drafts["permuted"], **kwargs)
    else:
        cfg = vllm_config(draft, max_model_len=300, **kwargs)
    with pytest.raises(ValueError, match=match):
        SpecBeamProposer(cfg)


def test_padded_draft_vocab_never_proposes_ids_outside_target(folders, tmp_path):
    # a draft with 40 output rows but the target's 32-word tokenizer (a padded embedding matrix),
    # made to always prefer the padding ids 35 / 36
    model = tiny_llama(40, seed=3)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[35, 0] = 100.0
        model.lm_head.weight[36, 0] = -100.0
    draft = save(model, tmp_path / "padded", vocab_size=VOCAB)
    try:
        p = SpecBeamProposer(vllm_config(draft, tokenizer=folders[0]))
    except ValueError:
        return  # refusing such a draft is fine
    rows = prompts(3, np.random.default_rng(13))
    out = call(p, rows, [[r[-1]] for r in rows])
    assert all(0 <= t < VOCAB for d in out for t in d), out


def test_smaller_draft_vocab_with_the_target_tokenizer(folders):
    """The target's embedding padded to 40 rows around the draft's own 32-word tokenizer (Qwen2.5 0.5B
    drafting for 14B+): accepted once the tokenizers are the same; the draft proposes only its own ids,
    with probabilities over the target's 40, and an id past its embedding in a prompt (which only the
    target can emit) is fed to it as id 0."""
    p = SpecBeamProposer(vllm_config(folders[1], tokenizer=folders[0], vocab=40,
                                     full_draft_max_batch=MAX_REQS, no_draft_min_batch=MAX_REQS + 1))
    rows = prompts(3, np.random.default_rng(21))
    rows[0][-2] = 37
    out = call(p, rows, [[r[-1]] for r in rows])
    assert [len(d) for d in out] == [GAMMA] * 3 and all(0 <= t < VOCAB for d in out for t in d), out
    probs = p.take_last_draft_probs()
    if probs is not None:  # sampled drafts: their distributions span the target's vocabulary, 0 past the draft's
        assert probs.shape[-1] == 40 and float(probs[..., VOCAB:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"vocabulary of 32 tokens but the target has 40.*draft's tokenizer is the target's"):
        SpecBeamProposer(vllm_config(folders[1], tokenizer=None, vocab=40))


# ----------------------------------------------------------------------------- misc


def test_stats_file_and_load_model(folders, tmp_path):
    path = tmp_path / "stats.json"
    p = make_proposer(folders, stats_file=str(path))
    assert p.load_model(object()) is None
    rows = prompts(2, np.random.default_rng(14))
    call(p, rows, [[r[-1]] for r in rows])
    written = json.loads(path.read_text())
    assert written["states"] == 2 and written["proposals"] == 1 and written["draft_rows"] == 2
    assert written["drafted_tokens"] == 2 * GAMMA and written["step"] == 1
    assert written["used_blocks"] + written["free_blocks"] == written["total_blocks"]
    # the proposal-time histogram counts every propose call once, in the bucket of its time
    hist = written["propose_ms_histogram"]
    assert len(hist) == len(proposer_module.PROPOSE_MS_BUCKETS) + 1 and sum(hist) == 1
    took_ms = 1000 * written["propose_seconds"]
    bucket = hist.index(1)
    bounds = (0,) + proposer_module.PROPOSE_MS_BUCKETS + (float("inf"),)
    assert bounds[bucket] <= took_ms < bounds[bucket + 1]


def test_stats_file_written_at_most_every_interval_and_when_the_last_state_goes(folders, tmp_path, monkeypatch):
    """A stats file per engine step would cost a busy server throughput: propose writes it at most
    every STATS_INTERVAL_S, and so do finished requests, except that freeing the last state writes it
    at once (final counters and blocks)."""
    monkeypatch.setattr(proposer_module, "STATS_INTERVAL_S", 60.0)  # "within the interval" on any host
    path = tmp_path / "stats.json"
    p = make_proposer(folders, stats_file=str(path))
    rows = prompts(2, np.random.default_rng(16))
    p.batch_req_ids = ["a", "b"]
    call(p, rows, [[r[-1]] for r in rows])  # first write: immediately
    assert json.loads(path.read_text())["proposals"] == 1
    rows = [r + [5] for r in rows]
    call(p, rows, [[5], [5]])  # within the interval: not written
    assert json.loads(path.read_text())["proposals"] == 1
    assert p.stats()["proposals"] == 2
    p.finish_requests({"a"})  # within the interval, states left: not written
    assert json.loads(path.read_text())["states"] == 2
    p.finish_requests({"b"})  # the last state freed: written at once
    written = json.loads(path.read_text())
    assert written["proposals"] == 2 and written["states"] == 0
    assert written["free_blocks"] == written["baseline_free_blocks"]


def test_draft_linears_run_on_vllm_cpu_gemm(folders, draft_hf):
    """On the CPU the draft's linear layers use vLLM's prepacked GEMM (option ``vllm_cpu_gemm``, on by
    default); its logits match the plain HF draft's to float rounding, and the option turns it off."""
    pytest.importorskip("vllm")
    from vllm_support import vllm_kernels_fail

    if vllm_kernels_fail():  # vLLM's GEMM is in its compiled kernels
        pytest.skip(vllm_kernels_fail())
    packed = make_proposer(folders)
    def linears(proposer):
        return [m for m in proposer.drafter.model.model.modules() if isinstance(m, torch.nn.Linear)]

    runner = packed.drafter.model
    assert len(linears(packed)) == 7 * runner.num_layers + 1 and all(
        hasattr(m, "cpu_linear") and "forward" in vars(m) for m in linears(packed))
    plain = make_proposer(folders, vllm_cpu_gemm=False)
    assert not any("forward" in vars(m) for m in linears(plain))
    tokens = prompts(1, np.random.default_rng(15), low=20, high=21)[0]
    with torch.no_grad():
        ref = draft_hf(torch.tensor([tokens])).logits[0].float()  # [20, vocab]
    for proposer in (packed, plain):  # the runner's own forward, over its paged cache
        runner = proposer.drafter.model
        cache = runner.make_cache(8, 16)
        kv = build_kv_batch(cache, [cache.new_sequence()], [len(tokens)], cache.dtype)
        got = runner.forward(torch.tensor([tokens]), kv, len(tokens))[0]  # [20, vocab]
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


# ----------------------------------------------------------------------------- cpu_fix expand kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_expand_kernel_impl(dtype):
    floating = dtype.is_floating_point
    values = [0.5, -1.0, 2.0, -1.0] if floating else [5, 0, 7, 0]
    replace_from, replace_to = (-1.0, 1.0) if floating else (0, 32)
    input_val = torch.tensor(values, dtype=dtype)
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # 2, 0, 3 and 1 tokens
    sentinel = 9 if not floating else 9.5
    output = torch.full((8,), sentinel, dtype=dtype)
    ptr = output.data_ptr()
    expand_kernel_impl(output, input_val, cu, replace_from, replace_to, MAX_NUM_TOKENS=4)
    v = values
    r = replace_to
    expected = [v[0], v[0], v[2], v[2], v[2], r, sentinel, sentinel]  # v[1] gets no token; v[3] replaced
    assert output.dtype == dtype and output.data_ptr() == ptr  # in place, own dtype
    assert output.tolist() == expected


def test_expand_kernel_impl_mixed_dtypes_and_empty():
    # float32 output fed by a float64 input (the sampler's temperature buffer) and int64 offsets
    output = torch.zeros(4, dtype=torch.float32)
    expand_kernel_impl(output, torch.tensor([0.7, -1.0], dtype=torch.float64), torch.tensor([1, 4]), -1.0, 1.0)
    assert output.tolist() == pytest.approx([0.7, 1.0, 1.0, 1.0])
    # an empty batch leaves the output alone
    output = torch.full((3,), 2.0)
    expand_kernel_impl(output, torch.zeros(0), torch.zeros(0, dtype=torch.int32), -1.0, 1.0)
    assert output.tolist() == [2.0, 2.0, 2.0]
