"""``AdaptiveDraftLength`` (``SpecBeam(..., adaptive_draft=True)``): the draft length, 0 .. max,
measured cheapest per emitted token. The choosing is checked on made-up step costs (no timing in
tests); through HF ``generate`` the outputs stay the target's while lengths 0 and up are used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import specbeam_hf
from conftest import assert_pools_free, build_model, make_pair, ragged_batch
from specbeam_core import AdaptiveDraftLength


def run_policy(policy, cost, emitted, steps, batch=1, prefill_first=True):
    """Drive the policy's two hooks with ``cost[g]`` seconds and ``emitted[g]`` tokens per row for a
    step of draft length g; returns the lengths chosen."""
    chosen = []
    for step in range(steps):
        rows = [SimpleNamespace(target_len=0 if (prefill_first and step == 0) else 5, logits_processor=None)] * batch
        g = policy.specbeam_draft_length(requests=rows, default=3)
        chosen.append(g)
        policy.specbeam_on_step(record=SimpleNamespace(seconds=cost[g], emitted_tokens=[[0] * emitted[g]] * batch))
    return chosen


def test_speculation_that_pays_keeps_the_longest_draft():
    policy = AdaptiveDraftLength(3, explore_every=1000)
    chosen = run_policy(policy, cost={0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3}, emitted={0: 1, 1: 1, 2: 2, 3: 3}, steps=20)
    assert chosen[-5:] == [3] * 5
    assert set(chosen[1:9]) == {0, 1, 2, 3}  # each length tried (twice) after the unmeasured prefill


def test_speculation_that_loses_turns_itself_off():
    policy = AdaptiveDraftLength(3, explore_every=1000)
    chosen = run_policy(policy, cost={0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6}, emitted={0: 1, 1: 1, 2: 1, 3: 1}, steps=20)
    assert chosen[-5:] == [0] * 5


def test_workloads_are_measured_apart():
    """What a batch of 8 measured does not decide for batch 1."""
    policy = AdaptiveDraftLength(2, explore_every=1000)
    run_policy(policy, cost={0: 1.0, 1: 1.5, 2: 2.0}, emitted={0: 1, 1: 1, 2: 1}, steps=12, batch=8)
    chosen = run_policy(policy, cost={0: 1.0, 1: 1.05, 2: 1.1}, emitted={0: 1, 1: 2, 2: 3}, steps=12, batch=1)
    assert chosen[-3:] == [2] * 3


def test_a_held_choice_is_measured_after_it_settles():
    """In a serving engine a length takes effect a step late: each choice is held ``hold_steps``
    steps and the first ``settle_steps`` after a change, which still pay for the old length, are
    not measured. Here a step costs what the length chosen the step before decides; a policy that
    measured the settling step would blame each length for its predecessor's cost."""
    policy = AdaptiveDraftLength(2, trials=1, explore_every=1000, hold_steps=4, settle_steps=1)
    cost, emitted = {0: 1.0, 1: 1.0, 2: 1.0}, {0: 1, 1: 1, 2: 3}  # length 2 pays threefold
    rows = [SimpleNamespace(target_len=5, logits_processor=None)]
    chosen, previous = [], 2  # the engine starts at the longest length
    for _ in range(40):
        g = policy.specbeam_draft_length(requests=rows, default=2)
        chosen.append(g)
        policy.specbeam_on_step(record=SimpleNamespace(seconds=cost[previous], emitted_tokens=[[0] * emitted[previous]]))
        previous = g
    # each length held 4 steps, deepest first; the first choice at a new batch size is not measured, so 2 twice
    assert chosen[:16] == [2] * 8 + [1] * 4 + [0] * 4
    assert chosen[-8:] == [2] * 8
    assert policy.table()[(1, False)][2] == pytest.approx(1000 / 3)  # ms per token of length 2, unpolluted


def test_a_busy_server_measures_through_its_prefills():
    """Under load a new request arrives every few steps, so nearly every held choice holds a step
    that also prefills a prompt. Those steps are measured like the others (a prompt costs the same at
    every length). A policy that left out every window holding a prefill would never measure here and
    would keep its first length for good."""
    policy = AdaptiveDraftLength(4, trials=1, explore_every=1000, hold_steps=4, settle_steps=0, local=True)
    emitted = {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}  # the draft never agrees: every length emits one token a row
    cost = {g: 1.0 + 0.2 * g for g in emitted}  # ... and each drafted token costs
    chosen = []
    for step in range(200):
        arriving = step % 4 == 0  # a request joins at the step each choice is made
        rows = [SimpleNamespace(target_len=0 if arriving else 5, logits_processor=None)] + [
            SimpleNamespace(target_len=5, logits_processor=None)] * 7
        g = policy.specbeam_draft_length(requests=rows, default=4)
        chosen.append(g)
        seconds = cost[g] + (5.0 if arriving else 0.0)  # a prefill step costs what its prompt does
        policy.specbeam_on_step(record=SimpleNamespace(seconds=seconds, emitted_tokens=[[0] * emitted[g]] * 8))
    assert chosen[-40:] == [0] * 40
    assert {0, 1} <= set(policy.table()[(8, False)])


def test_a_wave_of_arrivals_is_not_charged_to_a_new_buckets_first_length():
    """A server reaches a new batch size as a wave of requests arrives: the first steps there hold
    their prefills. Charged to the length that ran then (the nearest bucket's best, plain decoding),
    that burst makes the best length look like the worst for a long while; the first choice at a batch
    size never seen before is left unmeasured."""
    policy = AdaptiveDraftLength(4, trials=1, explore_every=1000, hold_steps=4, settle_steps=1, local=True)
    cost = {g: 1.0 + 0.2 * g for g in range(5)}  # the draft never agrees: plain decoding is cheapest

    def step(batch, burst=0.0):
        rows = [SimpleNamespace(target_len=5, logits_processor=None)] * batch
        g = policy.specbeam_draft_length(requests=rows, default=4)
        policy.specbeam_on_step(record=SimpleNamespace(seconds=cost[g] + burst, emitted_tokens=[[0]] * batch))
        return g

    for _ in range(100):
        step(1)
    assert policy.chooser.best((1, False)) == 0
    chosen = [step(8, burst=40.0 if i < 4 else 0.0) for i in range(120)]  # eight prompts prefill at first
    assert chosen[:4] == [0] * 4  # the nearest bucket's best
    assert chosen[-60:] == [0] * 60
    assert policy.table()[(8, False)][0] == pytest.approx(1000.0 / 8)  # ms per token: no burst in it


def test_local_search_finds_the_best_length_without_trying_far_ones():
    """Costs per token fall to length 2 and rise after it: a local search that starts at 2's neighbour
    (another bucket's best) measures 0 and the lengths beside the best, never the far lengths 5..8;
    the exhaustive search measures every length."""
    cost = {g: 1.0 + 0.25 * g for g in range(9)}
    emitted = {g: int(10 * e) for g, e in enumerate([1, 1.8, 2.5, 2.8, 3.0, 3.1, 3.2, 3.2, 3.2])}  # 2 is best
    local = AdaptiveDraftLength(8, explore_every=4, local=True)
    local.chooser.begin_search((1, False), hint=3)  # as if a neighbouring bucket had found 3
    local._workload = (1, False)
    local_chosen = run_policy(local, cost, emitted, steps=80)
    every = run_policy(AdaptiveDraftLength(8, explore_every=4), cost, emitted, steps=80)
    assert local_chosen[-1] == every[-1] == 2
    assert set(local_chosen) == {0, 1, 2, 3} and set(every) == set(range(9))
    assert sorted(set(local_chosen[20:])) == [0, 1, 2, 3]  # re-measured: 0 and the best's two neighbours


def test_local_search_does_not_stop_on_a_plateau_of_deep_lengths():
    """Lengths 2..4 cost the same per token and length 0 half as much: walking between neighbours from 4
    (another bucket's best) would stop on the plateau; measuring 0 finds plain decoding."""
    cost = {0: 1.0, 1: 1.6, 2: 2.0, 3: 2.0, 4: 2.0}
    emitted = {0: 10, 1: 10, 2: 10, 3: 10, 4: 10}
    policy = AdaptiveDraftLength(4, trials=1, explore_every=1000, local=True)
    policy.chooser.begin_search((1, False), hint=4)
    policy._workload = (1, False)
    chosen = run_policy(policy, cost, emitted, steps=30)
    assert chosen[:3] == [4, 4, 0]  # unmeasured prefill, the hint, then 0
    assert chosen[-10:] == [0] * 10 and 2 not in chosen and 3 not in chosen


def test_local_search_re_measures_less_often_while_the_best_holds():
    cost = {g: 1.0 + 0.25 * g for g in range(5)}
    emitted = {0: 10, 1: 18, 2: 25, 3: 28, 4: 30}  # length 2 is best
    chosen = run_policy(AdaptiveDraftLength(4, trials=1, explore_every=2, local=True), cost, emitted, steps=400)
    assert chosen[:7] == [0, 0, 0, 1, 2, 3, 2]  # unmeasured prefill, 0 twice, then up to 2 and past it to 3
    away = [i for i, g in enumerate(chosen) if i > 6 and g != 2]
    gaps = [b - a for a, b in zip(away, away[1:])]
    assert gaps[:4] == [4, 8, 16, 32] and set(gaps[4:]) == {32}  # doubling up to 16 * explore_every
    assert {chosen[i] for i in away} == {0, 1, 3}  # 0 and the best's neighbours, in turn
    assert chosen[-1] == 2


def test_one_slow_window_of_plain_decoding_does_not_send_the_search_into_speculation():
    """On a noisy host one window can take twice its usual time. Were it the only measurement of
    length 0, every draft length that costs less than that outlier (but more than plain decoding really
    does) would look better, and the search would walk onto them until length 0 came up for
    re-measurement. Length 0 is measured twice before the search leaves it."""
    policy = AdaptiveDraftLength(4, trials=1, explore_every=1000, hold_steps=4, settle_steps=0, local=True)
    plain_steps = [0]

    def step():
        rows = [SimpleNamespace(target_len=5, logits_processor=None)] * 8
        g = policy.specbeam_draft_length(requests=rows, default=4)
        if g == 0:
            plain_steps[0] += 1
        slow = g == 0 and 4 < plain_steps[0] <= 8  # the first measured window of length 0 (after the unmeasured first)
        seconds = (2.0 if slow else 1.0) if g == 0 else 1.7 * (g + 1)  # per step; a length g step emits g + 1
        policy.specbeam_on_step(record=SimpleNamespace(seconds=seconds, emitted_tokens=[[0] * (g + 1)] * 8))
        return g

    chosen = [step() for _ in range(400)]
    assert chosen[-100:] == [0] * 100
    assert set(chosen) <= {0, 1} and chosen.count(1) <= 4  # length 1 measured once, nothing deeper
    assert policy.chooser.passes[0] >= 2


def test_a_new_batch_bucket_starts_at_the_nearest_buckets_best():
    policy = AdaptiveDraftLength(4, explore_every=1000, local=True)
    lose = {g: 1.0 + 0.5 * g for g in range(5)}
    run_policy(policy, lose, {g: 1 for g in range(5)}, steps=40, batch=16)  # speculation loses at 16 rows
    assert policy.chooser.best((16, False)) == 0
    chosen = run_policy(policy, lose, {g: 1 for g in range(5)}, steps=10, batch=8, prefill_first=False)
    assert chosen[0] == 0 and max(chosen) == 1  # batch 8 starts at batch 16's length 0 and tries only 1 beside it


def test_a_bucket_only_passed_through_follows_the_nearest_measured_best():
    """A server's batch grows through buckets 1, 2 and 4 as a wave arrives and shrinks through them as
    it drains, a few steps each: too few to hold a measured choice. Met before any bucket was measured,
    such a bucket would keep its cold start on every later pass, never measured.
    It follows the nearest measured bucket instead."""
    policy = AdaptiveDraftLength(4, trials=1, explore_every=1000, hold_steps=8, settle_steps=2, local=True)
    cost = {g: 1.0 + 0.5 * g for g in range(5)}
    emitted = {0: 10, 1: 18, 2: 25, 3: 26, 4: 27}  # length 2 is cheapest per token

    def step(batch):
        rows = [SimpleNamespace(target_len=5, logits_processor=None)] * batch
        g = policy.specbeam_draft_length(requests=rows, default=4)
        policy.specbeam_on_step(record=SimpleNamespace(seconds=cost[g], emitted_tokens=[[0] * emitted[g]] * batch))
        return g

    def wave(steps_at_full):
        ramp = [step(b) for b in (1, 2, 3, 4, 5)]  # arriving: two steps or fewer a bucket
        full = [step(8) for _ in range(steps_at_full)]
        drain = [step(b) for b in (5, 4, 3, 2, 1)]
        return ramp, full, drain

    first_ramp, _, _ = wave(200)
    assert first_ramp == [0] * 5  # nothing measured yet: a cold start at plain decoding
    assert policy.chooser.best((8, False)) == 2
    for _ in range(3):
        ramp, full, drain = wave(200)
        assert ramp == drain == [2] * 5  # bucket 8's best, not the cold start
        assert full[-50:] == [2] * 50
    assert not policy.chooser.measured((4, False))


def test_bad_hold():
    with pytest.raises(ValueError, match="settle_steps"):
        AdaptiveDraftLength(2, hold_steps=2, settle_steps=2)


def test_bad_max_length():
    with pytest.raises(ValueError, match="max_length"):
        AdaptiveDraftLength(0)


def test_through_hf_generate_outputs_stay_the_targets():
    target, _ = make_pair("llama")
    unrelated = build_model("llama", seed=7)  # a draft that agrees by chance only
    ids, mask = ragged_batch([5, 9])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assistant = specbeam_hf.SpecBeam(unrelated, num_draft_tokens=3, adaptive_draft=True)
    out = target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
    assert torch.equal(out, target.generate(**kwargs))
    drafted = [max(r.num_drafted) for r in assistant.last_stats.records]
    assert 0 in drafted and 3 in drafted  # plain decoding and the longest draft were both run
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)
