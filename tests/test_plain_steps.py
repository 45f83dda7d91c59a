"""Length 0 inside a run of length 0 takes the runner's plain path (no vLLM server needed).

The wrapped ``_prepare_inputs`` must drop the spec-decode metadata exactly when a step verifies no
drafts and proposes none, and the wrapped draft step must then hand to the proposer's ``skip_step``
instead of vLLM's draft path; every other step is left alone, and hybrid models stay on vLLM's path.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from specbeam_vllm.plain_steps import plain_step, wrap_runner


class FakeBuffer:
    def __init__(self, n: int) -> None:
        self.np = np.zeros(n, dtype=np.int32)
        self.copies = 0

    def copy_to_gpu(self) -> None:
        self.copies += 1


def fake_runner(hybrid: bool = False):
    runner = SimpleNamespace(
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(is_hybrid=hybrid, is_attention_free=False)),
        num_decode_draft_tokens=FakeBuffer(4))
    runner.query_start_loc = SimpleNamespace(gpu=torch.tensor([0, 3, 4, 9]))  # three requests' query offsets
    runner._calc_spec_decode_metadata = lambda num_drafts, cu_num_tokens: SimpleNamespace(logits_indices="spec")

    def _prepare_inputs(scheduler_output, num_scheduled):  # as vLLM's: logits indices from the spec metadata
        metadata = runner._calc_spec_decode_metadata(np.zeros(3, np.int32), np.array([3, 4, 9]))
        return metadata.logits_indices, "metadata", 1

    runner._prepare_inputs = _prepare_inputs
    runner.propose_draft_token_ids = lambda *args: "vllm's draft path"
    return runner


class FakeProposer:
    def __init__(self) -> None:
        self.skipped = []

    def skip_step(self, common_attn_metadata):
        self.skipped.append(common_attn_metadata)
        return "no drafts"


def propose(runner, scheduler_output, spec_decode_metadata):
    return runner.propose_draft_token_ids(scheduler_output, "sampled", "sampling", "hidden", "sample hidden", None,
                                          spec_decode_metadata, "attention metadata", None)


def output(drafts: dict, proposes: int):
    return SimpleNamespace(scheduled_spec_decode_tokens=drafts, num_spec_tokens_to_schedule=proposes)


def test_only_a_step_without_drafts_either_way_is_plain():
    assert plain_step(output({}, 0))
    assert not plain_step(output({"r": [5, 6]}, 0))  # verifies the last drafts: vLLM's rejection sampler
    assert not plain_step(output({}, 3))  # proposes again: vLLM's speculative path feeds the draft


def test_the_wrapped_runner_drops_the_metadata_of_plain_steps_only():
    runner = fake_runner()
    assert wrap_runner(runner, FakeProposer())
    logits_indices, metadata, sampled = runner._prepare_inputs(output({}, 0), None)
    assert logits_indices.tolist() == [2, 3, 8] and metadata is None and sampled == 1  # each request's last token
    assert (runner.num_decode_draft_tokens.np == -1).all() and runner.num_decode_draft_tokens.copies == 1
    assert runner._prepare_inputs(output({"r": [1]}, 0), None) == ("spec", "metadata", 1)
    assert runner._prepare_inputs(output({}, 2), None) == ("spec", "metadata", 1)
    assert not wrap_runner(runner, FakeProposer())  # once per runner


def test_the_draft_step_of_a_plain_step_skips_vllms_draft_path():
    runner, proposer = fake_runner(), FakeProposer()
    assert wrap_runner(runner, proposer)
    assert propose(runner, output({}, 0), None) == "no drafts"
    assert proposer.skipped == ["attention metadata"]
    assert propose(runner, output({"r": [1]}, 0), "metadata") == "vllm's draft path"  # verified drafts
    assert propose(runner, output({}, 2), None) == "vllm's draft path"  # proposes again
    assert len(proposer.skipped) == 1


def test_hybrid_models_keep_vllms_path():
    runner = fake_runner(hybrid=True)
    assert not wrap_runner(runner, FakeProposer())
    assert runner._prepare_inputs(output({}, 0), None) == ("spec", "metadata", 1)
    assert propose(runner, output({}, 0), None) == "vllm's draft path"
