"""Length 0 inside a run of length 0 takes the runner's plain path (no vLLM server needed).

The wrapped ``_prepare_inputs`` must drop the spec-decode metadata exactly when a step verifies no
drafts and proposes none, leave every other step alone, and leave hybrid models on vLLM's path.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

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
    runner._prepare_inputs = lambda scheduler_output, num_scheduled: ("logits_indices", "metadata", 1)
    return runner


def output(drafts: dict, proposes: int):
    return SimpleNamespace(scheduled_spec_decode_tokens=drafts, num_spec_tokens_to_schedule=proposes)


def test_only_a_step_without_drafts_either_way_is_plain():
    assert plain_step(output({}, 0))
    assert not plain_step(output({"r": [5, 6]}, 0))  # verifies the last drafts: vLLM's rejection sampler
    assert not plain_step(output({}, 3))  # proposes again: vLLM's speculative path feeds the draft


def test_the_wrapped_runner_drops_the_metadata_of_plain_steps_only():
    runner = fake_runner()
    assert wrap_runner(runner)
    assert runner._prepare_inputs(output({}, 0), None) == ("logits_indices", None, 1)
    assert (runner.num_decode_draft_tokens.np == -1).all() and runner.num_decode_draft_tokens.copies == 1
    assert runner._prepare_inputs(output({"r": [1]}, 0), None) == ("logits_indices", "metadata", 1)
    assert runner._prepare_inputs(output({}, 2), None) == ("logits_indices", "metadata", 1)
    assert not wrap_runner(runner)  # once per runner


def test_hybrid_models_keep_vllms_path():
    runner = fake_runner(hybrid=True)
    assert not wrap_runner(runner)
    assert runner._prepare_inputs(output({}, 0), None) == ("logits_indices", "metadata", 1)
