"""pluggy hooks: the built-in plugin, draft-length policies, observers, drafter plugins, stats JSON."""

from __future__ import annotations

import json

import pytest
import torch

import specbeam_core
import specbeam_hf
from conftest import assert_pools_free, ragged_batch
from specbeam_core import Draft, DraftModelDrafter, SpecEngine, hookimpl
from specbeam_hf import HFCausalLM


def spec(target, assistant, **kwargs):
    return target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)


def pools(assistant, target):
    return assistant.engine_for(target).target_cache, assistant.drafter.cache


class DraftLength:
    def __init__(self, value):
        self.value = value
        self.calls = 0

    @hookimpl
    def specbeam_draft_length(self, requests, default):
        self.calls += 1
        assert default == 4 and requests and all(not r.finished for r in requests)
        return self.value


class Recorder:
    def __init__(self):
        self.records = []
        self.finished = []

    @hookimpl
    def specbeam_on_step(self, record):
        self.records.append(record)

    @hookimpl
    def specbeam_on_request_finished(self, request):
        self.finished.append((request.request_id, request.finish_reason))


# ---------------------------------------------------------------------------- plugin manager


def test_builtin_plugin_registered_once():
    for load in (True, False):
        pm = specbeam_core.get_plugin_manager(load_entrypoints=load)
        assert pm.get_plugin("builtin") is specbeam_core.builtin
        names = pm.hook.specbeam_drafter_names()
        assert [n for group in names for n in group].count("draft_model") == 1, names
        assert len(pm.get_plugins()) == 1  # the entry point names the same module: not registered twice


def test_builtin_makes_draft_model_drafter(llama_pair):
    pm = specbeam_core.get_plugin_manager()
    model = HFCausalLM(llama_pair[1])
    drafter = specbeam_core.make_drafter(pm, "draft_model", model=model, block_size=8)
    assert isinstance(drafter, DraftModelDrafter) and isinstance(drafter, specbeam_core.Drafter)
    assert drafter.model is model and drafter.block_size == 8 and drafter.vocab_size == 96
    assert pm.hook.specbeam_make_drafter(name="other", options={"model": model}) is None
    assert pm.hook.specbeam_draft_length(requests=[], default=7) == 7


def test_plugin_manager_still_lists_plugins_after_an_engine_registers_stats(llama_pair):
    """``pm.get_plugins()`` (a standard pluggy call) must keep working once an engine is made.

    Regression (was a library bug): ``SpecEngine.__init__`` registers its ``SpecStats`` as a
    plugin, and ``SpecStats`` is a plain ``@dataclass`` (specbeam_core/stats.py), so ``eq=True``
    sets ``__hash__ = None``; pluggy's ``get_plugins`` builds a set of plugins and raises
    ``TypeError: unhashable type: 'SpecStats'``.
    """
    pm = specbeam_core.get_plugin_manager()
    engine = SpecEngine(HFCausalLM(llama_pair[0]), None, 2, plugin_manager=pm)
    plugins = pm.get_plugins()
    assert specbeam_core.builtin in plugins
    assert any(p is engine.stats for p in plugins)


def test_engines_made_and_dropped_with_a_shared_plugin_manager(llama_pair):
    """Making engines one after another on one plugin manager must not fail.

    Regression (was a library bug): each ``SpecEngine`` registers ``SpecStats(source=id(self))``
    on the plugin manager and never unregisters it. ``SpecStats`` compares by value (dataclass
    ``eq``), and pluggy's ``register`` refuses a plugin equal to one already registered
    ("Plugin already registered under a different name"). Once an engine that ran no step is
    garbage-collected, CPython reuses its address for the next engine, whose fresh stats then
    equal the stale ones: ``SpecEngine(...)`` raises ValueError (after ~4 iterations here). The
    stale stats also stay registered forever (a leak, and they count the new engine's steps).
    """
    import gc

    from specbeam_core import SpecStats

    pm = specbeam_core.get_plugin_manager()
    target = HFCausalLM(llama_pair[0])

    def stats_registered() -> list:
        return [p for p in pm.get_plugins() if isinstance(p, SpecStats)]

    assert stats_registered() == []
    for _ in range(50):
        engine = SpecEngine(target, None, 2, plugin_manager=pm)
        assert [id(p) for p in stats_registered()] == [id(engine.stats)]  # its own, and no stale one
        del engine
        gc.collect()
        assert stats_registered() == []  # the dropped engine's stats left with it: no leak
    # a live engine counts only its own steps, not those of the 50 made before it on this manager
    engine = SpecEngine(target, None, 2, plugin_manager=pm)
    engine.generate([[5, 6, 7]], max_new_tokens=4)
    assert engine.stats.steps == 4 and [id(p) for p in stats_registered()] == [id(engine.stats)]


# ---------------------------------------------------------------------------- draft length


def test_draft_length_plugin_changes_gamma_and_stays_exact(llama_pair):
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    policy = DraftLength(2)
    pm.register(policy)
    ids, mask = ragged_batch([6, 9], seed=50)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4, plugin_manager=pm)
    out = spec(target, assistant, **kwargs)
    assert torch.equal(out, target.generate(**kwargs))
    stats = assistant.last_stats
    assert policy.calls == stats.steps > 0
    drafted = [d for rec in stats.records for d in rec.num_drafted]
    assert max(drafted) == 2 and all(d <= 2 for d in drafted)
    assert stats.drafted == sum(drafted) and stats.drafted > 0
    # without the plugin the same assistant configuration drafts 4
    plain = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    spec(target, plain, **kwargs)
    assert max(d for rec in plain.last_stats.records for d in rec.num_drafted) == 4
    assert_pools_free(*pools(assistant, target))


def test_draft_length_zero_is_plain_decoding(llama_pair):
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    pm.register(DraftLength(0))
    ids, mask = ragged_batch([5, 8], seed=51)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4, plugin_manager=pm)
    forwards_before = assistant.draft.forward_count
    out = spec(target, assistant, **kwargs)
    assert torch.equal(out, target.generate(**kwargs))
    stats = assistant.last_stats
    assert assistant.draft.forward_count == forwards_before  # the draft model never ran
    assert stats.draft_forwards == 0 and stats.drafted == 0 and stats.accepted == 0
    assert stats.target_forwards == stats.steps == 10  # one token per target pass
    assert all(rec.num_drafted == [0, 0] and not any(rec.bonus) for rec in stats.records)
    assert_pools_free(*pools(assistant, target))


# ---------------------------------------------------------------------------- observers


def test_on_step_receives_records_matching_stats(llama_pair):
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    rec = Recorder()
    pm.register(rec)
    engine = SpecEngine(HFCausalLM(target), DraftModelDrafter(HFCausalLM(draft)), 4, plugin_manager=pm)
    ids, mask = ragged_batch([4, 7, 5], seed=52)
    prompts = [ids[r][mask[r].bool()].tolist() for r in range(3)]
    out = engine.generate(prompts, max_new_tokens=14)
    assert rec.records and all(isinstance(r, specbeam_core.StepRecord) for r in rec.records)
    assert [r.step for r in rec.records] == list(range(1, len(rec.records) + 1))
    assert all(r.source == id(engine) for r in rec.records)
    assert sum(sum(r.num_accepted) for r in rec.records) == engine.stats.accepted
    assert sum(sum(r.num_drafted) for r in rec.records) == engine.stats.drafted
    assert len(rec.records) == engine.stats.steps
    assert 0 < engine.stats.accepted < engine.stats.drafted  # both accept and reject paths ran
    # every emitted token is in the records, in order, per request
    for req in out:
        emitted = [
            t for r in rec.records for rid, toks in zip(r.request_ids, r.emitted_tokens) if rid == req.request_id for t in toks
        ]
        assert emitted == req.output
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    assert [r.output for r in out] == ref[:, ids.shape[1] :].tolist()


def test_on_request_finished_once_per_request(llama_pair):
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    rec = Recorder()
    pm.register(rec)
    drafter = DraftModelDrafter(HFCausalLM(draft))
    engine = SpecEngine(HFCausalLM(target), drafter, 3, plugin_manager=pm)
    # a run to completion: once per request, reason "length" (generate's own cleanup does not re-report)
    out = engine.generate([[5, 6, 7], [9, 10, 11, 12]], max_new_tokens=6)
    assert sorted(rec.finished) == sorted((r.request_id, "length") for r in out)
    # an aborted request is reported as such, once, at the abort
    rec.finished.clear()
    r1, r2 = engine.make_request([5, 6, 7], max_new_tokens=12), engine.make_request([8, 9], max_new_tokens=5)
    engine.reserve([r1, r2])
    engine.add(r1)
    engine.add(r2)
    engine.step()
    assert rec.finished == []
    engine.abort(r1)
    assert rec.finished == [(r1.request_id, "abort")]
    while engine.has_unfinished:
        engine.step()
    engine.abort(r1)
    engine.abort(r2)  # already finished and released: no second report, reason kept
    assert rec.finished == [(r1.request_id, "abort"), (r2.request_id, "length")]
    assert r2.finish_reason == "length"
    assert_pools_free(engine.target_cache, drafter.cache)


def test_on_request_finished_with_eos_through_hf(llama_pair):
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    rec = Recorder()
    pm.register(rec)
    ids, mask = ragged_batch([5, 8], seed=53)
    free_run = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    row0 = free_run[0, ids.shape[1] :].tolist()
    eos = next((t for i, t in enumerate(row0) if i >= 2 and t not in row0[:i] and t not in free_run[1, ids.shape[1] :].tolist()), None)
    if eos is None:
        pytest.skip("no EOS candidate unique to row 0")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, plugin_manager=pm)
    assert torch.equal(spec(target, assistant, **kwargs), target.generate(**kwargs))
    assert sorted(reason for _, reason in rec.finished) == ["eos", "length"]
    assert len({rid for rid, _ in rec.finished}) == 2


def test_stats_count_only_their_own_engine(llama_pair):
    """Engines sharing a plugin manager each register a stats observer; each counts its own steps."""
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    drafter = DraftModelDrafter(HFCausalLM(draft))
    a = SpecEngine(HFCausalLM(target), drafter, 3, plugin_manager=pm)
    b = SpecEngine(HFCausalLM(target), drafter, 2, plugin_manager=pm)
    a.generate([[5, 6, 7]], max_new_tokens=8)
    steps_a = a.stats.steps
    assert steps_a > 0 and b.stats.steps == 0
    b.generate([[5, 6, 7]], max_new_tokens=8)
    assert a.stats.steps == steps_a and b.stats.steps > 0
    assert max(d for r in b.stats.records for d in r.num_drafted) == 2


# ---------------------------------------------------------------------------- drafter plugins


class OracleDrafter:
    """Proposes the target's own greedy continuation with the last draft token of each step corrupted,
    so every step accepts ``g - 1`` drafts and rejects one. Deterministic: ``probs=None``."""

    max_positions = None

    def __init__(self, vocab_size: int, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.vocab_size = vocab_size
        self.continuations = continuations
        self.forward_count = 0
        self.reserved = []
        self.released = []
        self.proposed = 0

    def reserve(self, num_sequences, tokens_per_sequence):
        self.reserved.append((num_sequences, tokens_per_sequence))

    def propose(self, requests, num_draft):
        g_max = max(num_draft)
        tokens = torch.zeros(len(requests), g_max, dtype=torch.long)
        for r, (req, g) in enumerate(zip(requests, num_draft)):
            cont = self.continuations[tuple(req.prompt)]
            done = req.num_generated
            row = cont[done : done + g]
            row += [3] * (g - len(row))
            if g > 0:
                row[-1] = (row[-1] + 1) % self.vocab_size
            tokens[r, :g] = torch.tensor(row, dtype=torch.long)
        self.proposed += 1
        return Draft(tokens=tokens, num_draft=list(num_draft), probs=None)

    def release(self, request):
        self.released.append(request.request_id)


class OraclePlugin:
    def __init__(self, drafter):
        self.drafter = drafter
        self.options = None

    @hookimpl
    def specbeam_drafter_names(self):
        return ["oracle"]

    @hookimpl
    def specbeam_make_drafter(self, name, options):
        if name != "oracle":
            return None
        self.options = options
        return self.drafter


def test_custom_drafter_plugin_is_used_and_exact(llama_pair):
    target, _ = llama_pair
    ids, mask = ragged_batch([6, 3, 9], seed=54)
    width = ids.shape[1]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    ref = target.generate(**kwargs)
    conts = {tuple(ids[r][mask[r].bool()].tolist()): ref[r, width:].tolist() for r in range(3)}
    drafter = OracleDrafter(96, conts)
    assert isinstance(drafter, specbeam_core.Drafter)
    pm = specbeam_core.get_plugin_manager()
    plugin = OraclePlugin(drafter)
    pm.register(plugin)
    names = {n for group in pm.hook.specbeam_drafter_names() for n in group}
    assert names == {"draft_model", "draft_tree", "multi_draft", "prompt_lookup", "oracle"}
    assistant = specbeam_hf.SpecBeam(None, num_draft_tokens=4, drafter="oracle", plugin_manager=pm)
    assert assistant.drafter is drafter and plugin.options == {"model": None, "block_size": 16}
    out = spec(target, assistant, **kwargs)
    assert torch.equal(out, ref)
    stats = assistant.last_stats
    # propose runs on every step that drafts anything (the last step, one token left, drafts nothing)
    assert drafter.proposed == sum(1 for rec in stats.records if max(rec.num_drafted) > 0) > 0
    assert drafter.reserved
    assert sorted(drafter.released) == sorted(r for rec in stats.records[:1] for r in rec.request_ids)
    # each row-step: g drafted, g - 1 accepted (the corrupted last draft is rejected and recovered)
    for rec in stats.records:
        for d, a, b in zip(rec.num_drafted, rec.num_accepted, rec.bonus):
            assert a == max(d - 1, 0) and not (b and d > 0)
    assert stats.accepted == stats.drafted - stats.row_steps + sum(
        1 for rec in stats.records for d in rec.num_drafted if d == 0
    )
    assert stats.accepted > 0 and stats.draft_forwards == 0
    assert_pools_free(assistant.engine_for(target).target_cache)


def test_unknown_drafter_lists_plugin_names(llama_pair):
    pm = specbeam_core.get_plugin_manager()
    pm.register(OraclePlugin(OracleDrafter(96, {})))
    with pytest.raises(ValueError, match="unknown drafter 'nope'; available: draft_model, draft_tree, multi_draft, oracle"):
        specbeam_hf.SpecBeam(llama_pair[1], drafter="nope", plugin_manager=pm)


# ---------------------------------------------------------------------------- stats serialisation


def test_stats_json_round_trip(llama_pair):
    target, draft = llama_pair
    ids, mask = ragged_batch([5, 7], seed=55)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3)
    spec(target, assistant, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    stats = assistant.last_stats
    data = json.loads(stats.to_json())
    summary = data["summary"]
    assert summary["acceptance_rate"] == pytest.approx(stats.acceptance_rate)
    assert 0 < summary["acceptance_rate"] <= 1
    assert summary["acceptance_rate"] == pytest.approx(summary["accepted"] / summary["drafted"])
    assert summary["mean_accepted_length"] == pytest.approx(stats.mean_accepted_length)
    assert summary["emitted"] == 24 and summary["steps"] == stats.steps == len(data["steps"])
    assert summary == json.loads(json.dumps(stats.summary()))
    first = data["steps"][0]
    assert first["num_drafted"] == stats.records[0].num_drafted
    assert first["emitted_tokens"] == stats.records[0].emitted_tokens
    assert sum(sum(s["num_accepted"]) for s in data["steps"]) == summary["accepted"]
    # reset clears the totals and the records
    stats.reset()
    assert json.loads(stats.to_json()) == {"summary": {**summary, **{k: 0 for k in summary}}, "steps": []}


def test_core_imports_neither_transformers_nor_vllm():
    import subprocess
    import sys

    code = "import sys, specbeam_core; bad = [m for m in ('transformers', 'vllm') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
