"""Draft length 0 as a spec-off step.

A vLLM engine with a speculative config runs every step through its speculative path, drafts or
not: the runner builds spec-decode metadata and samples with the rejection sampler over zero
drafts, and (without async scheduling) the engine core fetches the step's draft tokens from the
workers in an extra round trip. When specbeam's scheduler chooses length 0, none of that has work to
do. Here, in specbeam engines only:

- :func:`wrap_runner`: a step that verifies no drafts and proposes none takes the runner's plain
  path (no spec-decode metadata, vLLM's own sampler), and the runner's draft step hands straight to
  the proposer's ``skip_step`` (which notes what the draft missed) without preparing draft inputs.
  The step after a change of length keeps vLLM's speculative path, so only steps inside a run of
  length 0 change.
- :func:`install_engine_core`: after a step that proposed no drafts, the engine core skips the
  draft-token round trip (there is nothing to fetch; vLLM's scheduler has already cleared the
  requests' drafts when it scheduled them).

Models whose state is not plain attention KV (hybrid, attention-free) keep vLLM's path: their
backends read a zero-draft step differently from a plain one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class PlainLogits:
    """What a plain step's ``_prepare_inputs`` reads of the spec-decode metadata it then drops."""

    logits_indices: torch.Tensor  # [num_reqs] each request's last scheduled token


def plain_step(scheduler_output) -> bool:
    """True when a step verifies no drafts and proposes none (length 0 inside a run of length 0)."""
    return (not scheduler_output.scheduled_spec_decode_tokens
            and scheduler_output.num_spec_tokens_to_schedule == 0)


def wrap_runner(runner, proposer) -> bool:
    """Make ``runner``'s length-0 steps plain steps (this runner instance only); False where it keeps vLLM's path.

    ``proposer`` is the runner's drafter; its ``skip_step(common_attn_metadata)`` stands in for the
    draft step of a plain step and returns the (empty) draft token ids, one host list per request."""
    model_config = runner.vllm_config.model_config
    if model_config.is_hybrid or model_config.is_attention_free or getattr(runner, "_specbeam_plain_steps", False):
        return False
    prepare_inputs = runner._prepare_inputs
    calc_spec_decode_metadata = runner._calc_spec_decode_metadata
    plain_now = [False]  # whether the step being prepared is a plain step

    @functools.wraps(calc_spec_decode_metadata)
    def _calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens):
        if plain_now[0]:  # only the logits indices are read, and a plain step's are each request's last token
            num_reqs = len(cu_num_scheduled_tokens)
            return PlainLogits(runner.query_start_loc.gpu[1 : num_reqs + 1] - 1)  # [num_reqs]
        return calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(scheduler_output, num_scheduled_tokens):
        plain = plain_now[0] = plain_step(scheduler_output)
        try:
            logits_indices, spec_decode_metadata, max_num_sampled_tokens = prepare_inputs(
                scheduler_output, num_scheduled_tokens)
        finally:
            plain_now[0] = False
        if spec_decode_metadata is not None and plain:
            # zero drafts: the metadata's logits indices are each request's last token, as a plain step's
            runner.num_decode_draft_tokens.np.fill(-1)  # plain decode rows, as without a speculative config
            runner.num_decode_draft_tokens.copy_to_gpu()
            return logits_indices, None, max_num_sampled_tokens
        return logits_indices, spec_decode_metadata, max_num_sampled_tokens

    propose = runner.propose_draft_token_ids

    @functools.wraps(propose)
    def propose_draft_token_ids(scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                                slot_mappings):
        if spec_decode_metadata is None and plain_step(scheduler_output):
            return proposer.skip_step(common_attn_metadata)  # batch empty lists
        return propose(scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
                       aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings)

    runner._calc_spec_decode_metadata = _calc_spec_decode_metadata
    runner._prepare_inputs = _prepare_inputs
    runner.propose_draft_token_ids = propose_draft_token_ids
    runner._specbeam_plain_steps = True
    return True


_installed = False


def install_engine_core() -> None:
    """Skip the engine core's draft-token round trip after a step that proposed none (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.engine.core import EngineCore

    post_step = EngineCore.post_step

    @functools.wraps(post_step)
    def _post_step(self, model_executed: bool) -> None:
        if self.batch_queue is None and getattr(self.scheduler, "drafts_proposed", True) is False:
            return  # the step just run proposed no drafts: the workers have none to hand over
        post_step(self, model_executed)

    EngineCore.post_step = _post_step
    _installed = True
