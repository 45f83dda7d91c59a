"""Two small wraps of vLLM's model runner that let the specbeam proposer do more than the bare
``custom_class`` interface allows. Without them the proposer still works (greedy drafts, verified
as one-hot; idle states freed a couple of steps later).

- ``propose_draft_token_ids``: before the proposer runs, it is told the batch's request ids and
  each row's temperature / top-k / top-p (read from the runner's persistent batch), so that it can
  *sample* drafts for sampled requests; afterwards the probabilities those drafts were sampled from
  go where vLLM's rejection sampler reads draft probabilities (``_draft_probs``, the same slot
  vLLM's own draft-model proposer fills through ``take_last_draft_probs``). Exactness holds for any
  draft distribution as long as the sampler is given the one the drafts came from; acceptance rises
  because q is close to p rather than one-hot.
- ``_prepare_inputs`` and ``_sample``: a step in which no row carries drafts (every step past
  ``no_draft_min_batch`` rows under the default policy) runs as a spec-off step: its inputs are
  prepared without spec-decode metadata (vLLM 0.32 builds it whenever a speculative config exists,
  about 0.1 ms a step on the CPU at 16 rows, ``benchmarks/vllm_step_timing.py``) and it samples
  with vLLM's plain sampler instead of its rejection sampler over zero drafts: the same tokens and
  log-probs (the rejection sampler samples each row's bonus token with that same sampler), and the
  proposer still runs after it. Only for
  models whose KV cache is attention alone: vLLM's recurrent (Mamba-style) backends read the
  speculative path's zero-draft rows. Option ``plain_sampler_without_drafts``.
- ``_update_states``: requests the scheduler reports finished or aborted free their draft state at
  once, so draft KV blocks return to baseline when the server goes idle.
- ``execute_model`` / ``sample_tokens``: one round trip per engine step instead of three
  (:mod:`specbeam_vllm.draft_handoff`): the step's drafts travel back with its output, and where
  the engine core would send ``sample_tokens(None)`` right after ``execute_model`` anyway (no
  structured output in the batch, one batch in flight, no KV transfer), the worker samples,
  verifies and drafts at the end of ``execute_model`` and returns the output from there.

The wraps are installed once per process, only if the runner has the attributes they rely on
(checked on vLLM 0.32); otherwise :func:`install` says what is missing and leaves vLLM untouched.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from specbeam_core import SamplingParams

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours

_NEEDED = ("propose_draft_token_ids", "_update_states", "_get_spec_decode_draft_probs", "sample_tokens",
           "take_draft_token_ids", "execute_model", "_sample", "_prepare_inputs")
_installed: str | None = None
_originals: dict = {}  # vLLM's own methods behind the wraps that call them by name (tests swap them)


class _BatchParams(Sequence):
    """Each row's sampling parameters, read from the runner's persistent batch only if the proposer
    asks (a step that drafts nothing never does)."""

    def __init__(self, input_batch, num_rows: int) -> None:
        self._input_batch, self._num_rows, self._params = input_batch, num_rows, None

    def __len__(self) -> int:
        return self._num_rows

    def __getitem__(self, row):
        if self._params is None:
            self._params = _batch_params(self._input_batch, self._num_rows)
        return self._params[row]


def _no_drafts(spec_decode_metadata) -> bool:
    """True for a step's spec-decode metadata in which no row carries a draft token."""
    return spec_decode_metadata is not None and int(spec_decode_metadata.max_spec_len) == 0


def _no_scheduled_drafts(scheduler_output) -> bool:
    """True for a step whose scheduler output gives no row a draft token."""
    drafts = getattr(scheduler_output, "scheduled_spec_decode_tokens", None)
    return drafts is not None and not any(drafts.values())


def _attention_only(runner) -> bool:
    """True if every KV cache group of the runner is attention (no Mamba-style state), cached."""
    known = getattr(runner, "_specbeam_attention_only", None)
    if known is None:
        try:
            from vllm.v1.kv_cache_interface import AttentionSpec, UniformTypeKVCacheSpecs

            specs = []
            for group in runner.kv_cache_config.kv_cache_groups:
                spec = group.kv_cache_spec
                specs.extend(spec.kv_cache_specs.values() if isinstance(spec, UniformTypeKVCacheSpecs) else [spec])
            known = bool(specs) and all(isinstance(spec, AttentionSpec) for spec in specs)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the vLLM build
            known = False
        runner._specbeam_attention_only = known
    return known


def _batch_params(input_batch, num_rows: int) -> list[SamplingParams]:
    """Each row's sampling parameters, from the runner's persistent batch arrays."""
    temperature = input_batch.temperature_cpu[:num_rows]
    top_p = input_batch.top_p_cpu[:num_rows]
    top_k = input_batch.top_k_cpu[:num_rows]
    vocab = input_batch.vocab_size
    params = []
    for t, p, k in zip(temperature.tolist(), top_p.tolist(), top_k.tolist()):
        if t <= 0.0:
            params.append(SamplingParams())
        else:
            params.append(SamplingParams(do_sample=True, temperature=float(t),
                                         top_k=int(k) if 0 < k < vocab else 0, top_p=min(1.0, float(p)) or 1.0))
    return params


def install() -> str:
    """Wrap the runner methods (idempotent); return a short description of what is active."""
    global _installed
    if _installed is not None:
        return _installed
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as err:  # pragma: no cover - depends on the vLLM build
        _installed = f"off (cannot import vLLM's model runner: {err})"
        return _installed
    missing = [name for name in _NEEDED if not hasattr(GPUModelRunner, name)]
    if missing:
        _installed = (f"off (this vLLM's model runner lacks {', '.join(missing)}: drafts are greedy and "
                      "verified as one-hot, states are freed when no row claims them)")
        logger.warning("specbeam: runner hooks %s", _installed)
        return _installed

    from .draft_handoff import attach_drafts, samples_in_execute
    from .proposer import SpecBeamProposer

    propose_orig = GPUModelRunner.propose_draft_token_ids
    update_orig = GPUModelRunner._update_states
    sample_orig = GPUModelRunner.sample_tokens
    execute_orig = GPUModelRunner.execute_model
    sample_fn_orig = GPUModelRunner._sample
    _originals["_prepare_inputs"] = GPUModelRunner._prepare_inputs

    @functools.wraps(propose_orig)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, SpecBeamProposer):
            return propose_orig(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        req_ids = list(self.input_batch.req_ids)
        drafter.batch_req_ids = req_ids
        drafter.batch_params = _BatchParams(self.input_batch, len(req_ids))
        try:
            out = propose_orig(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        finally:
            drafter.batch_req_ids = drafter.batch_params = None
        probs = drafter.take_last_draft_probs()
        if probs is not None:
            self._draft_probs = probs  # [batch_rows, γ, vocab], read by _get_spec_decode_draft_probs
            self._draft_prob_req_ids = req_ids
        return out

    @functools.wraps(update_orig)
    def _update_states(self, scheduler_output):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, SpecBeamProposer):
            drafter.finish_requests(scheduler_output.finished_req_ids)
        return update_orig(self, scheduler_output)

    @functools.wraps(sample_orig)
    def sample_tokens(self, *args, **kwargs):
        stepped = getattr(self, "execute_model_state", None) is not None  # else no forward, no drafts
        output = sample_orig(self, *args, **kwargs)
        if stepped and isinstance(getattr(self, "drafter", None), SpecBeamProposer) \
                and not getattr(self, "use_async_scheduling", False):
            attach_drafts(self, output)
        return output

    @functools.wraps(execute_orig)
    def execute_model(self, scheduler_output, *args, **kwargs):
        output = execute_orig(self, scheduler_output, *args, **kwargs)
        if output is None and isinstance(getattr(self, "drafter", None), SpecBeamProposer) \
                and samples_in_execute(self, scheduler_output):
            return self.sample_tokens(None)  # what the engine core would ask for next, without the round trip
        return output

    @functools.wraps(sample_fn_orig)
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if _no_drafts(spec_decode_metadata) and isinstance(drafter, SpecBeamProposer) \
                and drafter.options.plain_sampler_without_drafts:
            spec_decode_metadata = None  # vLLM's spec-off sampling: what a rejection over zero drafts returns
        return sample_fn_orig(self, logits, spec_decode_metadata, *args, **kwargs)

    @functools.wraps(_originals["_prepare_inputs"])
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        prepare_orig = _originals["_prepare_inputs"]
        drafter = getattr(self, "drafter", None)
        if not (isinstance(drafter, SpecBeamProposer) and drafter.options.plain_sampler_without_drafts
                and self.speculative_config is not None and not getattr(self, "use_async_spec_decode", False)
                and _no_scheduled_drafts(scheduler_output) and _attention_only(self)):
            return prepare_orig(self, scheduler_output, *args, **kwargs)
        spec_config = self.speculative_config
        self.speculative_config = None  # read once in there: "no speculative config" -> no spec-decode metadata
        try:
            return prepare_orig(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec_config

    GPUModelRunner.execute_model = execute_model
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._sample = _sample
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
    GPUModelRunner._update_states = _update_states
    GPUModelRunner.sample_tokens = sample_tokens
    _installed = ("on (sampled drafts with probabilities; states freed at finish; one round trip per step; "
                  "spec-off inputs and sampling in steps without drafts)")
    return _installed
