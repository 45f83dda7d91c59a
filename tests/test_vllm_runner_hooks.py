"""The runner hooks' sampling shortcut (``specbeam_vllm.runner_hooks``): a step whose rows carry no
drafts is sampled by vLLM's plain sampler, as on a spec-off server; a step with drafts still goes
through the rejection sampler; the option turns the shortcut off; other proposers are untouched.
Each row's sampling parameters are read from the persistent batch only when the proposer asks."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from vllm_support import require_vllm

require_vllm()

from vllm.v1.spec_decode.metadata import SpecDecodeMetadata  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

from specbeam_vllm import runner_hooks  # noqa: E402
from specbeam_vllm.options import SpecBeamVllmOptions  # noqa: E402
from specbeam_vllm.proposer import SpecBeamProposer  # noqa: E402

DRAFT = "specbeam_hf/demo_models/draft"


@pytest.fixture(scope="module", autouse=True)
def hooks():
    assert runner_hooks.install().startswith("on"), runner_hooks.install()


def fake_runner(drafter):
    """The attributes vLLM's ``_sample`` reads; records which sampler ran."""
    calls = []
    runner = types.SimpleNamespace(
        drafter=drafter, use_async_scheduling=False, _draft_token_req_ids=None,
        input_batch=types.SimpleNamespace(sampling_metadata="metadata", update_async_output_token_ids=lambda: None),
        sampler=lambda logits, sampling_metadata: calls.append("plain") or "plain output",
        rejection_sampler=lambda meta, probs, logits, sm: calls.append("rejection") or "rejection output",
        _get_spec_decode_draft_probs=lambda meta: None)
    return runner, calls


def specbeam_drafter(**options):
    drafter = object.__new__(SpecBeamProposer)  # only its options are read
    drafter.options = SpecBeamVllmOptions(draft=DRAFT, **options)
    return drafter


def metadata(drafts: list[list[int]]) -> SpecDecodeMetadata:
    return SpecDecodeMetadata.make_dummy(drafts, device=torch.device("cpu"))


def test_steps_without_drafts_use_the_plain_sampler():
    runner, calls = fake_runner(specbeam_drafter())
    logits = torch.zeros(3, 8)  # [rows, vocab]: one bonus position per row
    assert GPUModelRunner._sample(runner, logits, metadata([[], [], []])) == "plain output"
    assert GPUModelRunner._sample(runner, logits, None) == "plain output"
    assert GPUModelRunner._sample(runner, torch.zeros(5, 8), metadata([[1, 2], [], []])) == "rejection output"
    assert calls == ["plain", "plain", "rejection"]


def test_option_off_and_other_proposers_keep_the_rejection_sampler():
    for drafter in (specbeam_drafter(plain_sampler_without_drafts=False), object()):
        runner, calls = fake_runner(drafter)
        assert GPUModelRunner._sample(runner, torch.zeros(2, 8), metadata([[], []])) == "rejection output"
        assert calls == ["rejection"]


def test_batch_params_are_read_only_when_asked():
    reads = []

    class Batch:
        vocab_size = 100

        def __getattr__(self, name):  # temperature_cpu, top_p_cpu, top_k_cpu
            reads.append(name)
            return {"temperature_cpu": np.array([0.0, 0.8]), "top_p_cpu": np.array([1.0, 0.9]),
                    "top_k_cpu": np.array([0, 5])}[name]

    params = runner_hooks._BatchParams(Batch(), 2)
    assert len(params) == 2 and reads == []
    assert params[0].greedy and params[1].do_sample and params[1].top_k == 5 and params[1].top_p == 0.9
    assert len(reads) == 3
    params[1]
    assert len(reads) == 3  # read once


def test_steps_without_drafts_prepare_inputs_as_spec_off(monkeypatch):
    """``_prepare_inputs`` sees no speculative config (so builds no spec-decode metadata) exactly
    when no row has drafts this step, the model's KV cache is attention only, and the drafter is
    specbeam's with the option on; the config is back afterwards, also when vLLM's method raises."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    seen = []

    def prepare(self, scheduler_output, num_scheduled_tokens):
        seen.append(self.speculative_config)
        if scheduler_output.raise_:
            raise RuntimeError("from vLLM")
        return "prepared"

    monkeypatch.setitem(runner_hooks._originals, "_prepare_inputs", prepare)
    attention = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)

    def runner(drafter, spec=attention):
        return types.SimpleNamespace(
            drafter=drafter, speculative_config="spec config", use_async_spec_decode=False,
            kv_cache_config=types.SimpleNamespace(kv_cache_groups=[types.SimpleNamespace(kv_cache_spec=spec)]))

    def step(drafts, raise_=False):
        return types.SimpleNamespace(scheduled_spec_decode_tokens=drafts, raise_=raise_)

    specbeam = specbeam_drafter()
    cases = [(runner(specbeam), step({}), None),
             (runner(specbeam), step({"a": [], "b": []}), None),
             (runner(specbeam), step({"a": [], "b": [7]}), "spec config"),
             (runner(specbeam_drafter(plain_sampler_without_drafts=False)), step({}), "spec config"),
             (runner(object()), step({}), "spec config")]
    mamba = object.__new__(MambaSpec)  # only its type is read
    cases.append((runner(specbeam, spec=mamba), step({}), "spec config"))
    for r, s, expected in cases:
        seen.clear()
        assert GPUModelRunner._prepare_inputs(r, s, np.ones(2, dtype=np.int32)) == "prepared"
        assert seen == [expected] and r.speculative_config == "spec config"
    r = runner(specbeam)
    with pytest.raises(RuntimeError, match="from vLLM"):
        GPUModelRunner._prepare_inputs(r, step({}, raise_=True), np.ones(2, dtype=np.int32))
    assert seen[-1] is None and r.speculative_config == "spec config"
