"""specbeam's scheduler: vLLM's own, choosing each step's draft length from measured costs.

vLLM 0.32 can vary the draft length from step to step ("dynamic speculative decoding"): the
scheduler looks the length up by batch size in ``dynamic_sd_lookup`` (built from the static
``num_speculative_tokens_per_batch_size`` table) and hands it to the workers with the step. Here the
lookup asks specbeam's ``specbeam_draft_length`` hook instead. Plugins of the ``specbeam`` entry-point
group answer first; then, unless ``adaptive_draft_length`` is off,
:class:`specbeam_core.AdaptiveDraftLength` answers with the length, 0 .. ``num_speculative_tokens``,
that has cost the fewest seconds per emitted token at this batch size (rounded up to a power of two).
Length 0 is a step without drafts. Each length is tried, the cheapest is kept, and the one measured
longest ago is measured again now and then, so the choice follows the load.

The cost of a step is the time between two consecutive step outputs while the engine is busy (gaps
of over :data:`IDLE_GAP_S` are idle time, not measured); what it emitted is the tokens those outputs
carry. Both reach the plugins as a :class:`specbeam_core.StepRecord` through ``specbeam_on_step``.
Steps that also prefill a new request are measured like the others: requests arrive every few steps
under load, and the draft's share of a prefill (its own prefill and first drafts) is a cost of drafting.
"""

from __future__ import annotations

import logging
import time

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from specbeam_core import AdaptiveDraftLength, Request, SamplingParams, StepRecord, get_plugin_manager
from specbeam_core.engine import check_draft_length
from specbeam_core.hookspecs import PROJECT

from .options import options_of

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours

IDLE_GAP_S = 1.0  # a longer gap between two step outputs is idle time: that step is not measured


class _MeasuredLookup:
    """Stands in for vLLM's ``dynamic_sd_lookup`` list: ``lookup[batch_size]`` asks the hook."""

    def __init__(self, choose) -> None:
        self._choose = choose

    def __getitem__(self, batch_size: int) -> int:
        return self._choose(batch_size)


class DraftLengthMixin:
    """What specbeam adds to vLLM's scheduler (mixed into :class:`Scheduler` and :class:`AsyncScheduler`)."""

    def _specbeam_init(self) -> None:
        options = options_of(self.vllm_config)
        self.max_draft_length = self.num_spec_tokens
        self.pm = get_plugin_manager(load_entrypoints=False)
        self.adaptive = None
        if options is not None and options.adaptive_draft_length and self.num_spec_tokens > 0:
            self.adaptive = AdaptiveDraftLength(self.num_spec_tokens, trials=options.trials,
                                                explore_every=options.explore_every, hold_steps=options.hold_steps,
                                                settle_steps=options.settle_steps, local=options.local_search)
            self.pm.register(self.adaptive, name="specbeam-measured-draft-length")
        self.pm.load_setuptools_entrypoints(PROJECT)  # registered later, so asked before the measured policy
        deciding = [impl for impl in self.pm.hook.specbeam_draft_length.get_hookimpls() if not impl.trylast]
        if self.num_spec_tokens > 0 and deciding:  # else vLLM's fixed length (and its padded decode steps)
            self.dynamic_sd_lookup = _MeasuredLookup(self._choose_draft_length)
        self._views: dict[str, Request] = {}  # vLLM request id -> what the hooks see of it
        self._last_output: float | None = None
        self._step = 0
        self._log_interval = options.log_interval_s if options is not None else 0.0
        self._logged = time.monotonic()
        self.draft_length = self.num_spec_tokens  # the length chosen last
        self.drafts_proposed = True  # whether the step scheduled last proposes drafts (read by plain_steps)

    def schedule(self, *args, **kwargs):
        scheduler_output = super().schedule(*args, **kwargs)
        self.drafts_proposed = (scheduler_output.num_spec_tokens_to_schedule > 0
                                or not scheduler_output.num_scheduled_tokens)
        return scheduler_output

    def _view(self, req) -> Request:
        """A read-only core ``Request`` for a vLLM request (made once, kept while it runs)."""
        view = self._views.get(req.request_id)
        if view is None:
            p = req.sampling_params
            params = SamplingParams() if p is None or p.temperature < 1e-5 else SamplingParams(
                do_sample=True, temperature=p.temperature, top_k=max(p.top_k, 0), top_p=p.top_p)
            view = Request(request_id=len(self._views), prompt=req.prompt_token_ids or [], params=params,
                           max_new_tokens=p.max_tokens if p is not None and p.max_tokens else 0,
                           tokens=req.all_token_ids)
            self._views[req.request_id] = view
        view.target_len = req.num_computed_tokens
        return view

    def _choose_draft_length(self, batch_size: int) -> int:
        running = self.running
        views = [self._view(req) for req in running]
        if len(self._views) > 2 * len(running) + 64:  # forget finished requests now and then
            live = {req.request_id for req in running}
            self._views = {rid: v for rid, v in self._views.items() if rid in live}
        length = self.pm.hook.specbeam_draft_length(requests=views, default=self.num_spec_tokens)
        length = check_draft_length(length, "draft length chosen by the specbeam_draft_length hook", allow_zero=True)
        self.draft_length = min(length, self.max_draft_length)  # vLLM reserved slots for this many
        return self.draft_length

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        now = time.perf_counter()
        last, self._last_output = self._last_output, now
        if last is not None and now - last < IDLE_GAP_S and model_runner_output.req_ids:
            self._step += 1
            self.pm.hook.specbeam_on_step(record=self._record(scheduler_output, model_runner_output, now - last))
        if self._log_interval and self.adaptive is not None and time.monotonic() - self._logged > self._log_interval:
            self._logged = time.monotonic()
            logger.info("specbeam: draft length %d; ms per emitted token by (batch bucket, processors) and "
                        "length: %s", self.draft_length, self.adaptive.table())
        return outputs

    def _record(self, scheduler_output, model_runner_output, seconds: float) -> StepRecord:
        sampled = model_runner_output.sampled_token_ids  # per row: accepted drafts + recovered/bonus
        scheduled = scheduler_output.scheduled_spec_decode_tokens
        drafted = [len(scheduled.get(req_id, ())) for req_id in model_runner_output.req_ids]
        accepted = [min(max(len(tokens) - 1, 0), d) for tokens, d in zip(sampled, drafted)]
        drafted_tokens = [scheduled.get(r, ()) for r in model_runner_output.req_ids]  # vLLM's lists, read-only
        return StepRecord(source=id(self), step=self._step, request_ids=list(model_runner_output.req_ids),
                          num_drafted=drafted, num_accepted=accepted,
                          bonus=[d > 0 and a == d for d, a in zip(drafted, accepted)],
                          drafted_tokens=drafted_tokens,
                          emitted_tokens=sampled, draft_forwards=1 if any(drafted) else 0, target_forwards=1,
                          seconds=seconds)


class SpecBeamScheduler(DraftLengthMixin, Scheduler):
    """vLLM's :class:`Scheduler` with specbeam's draft length."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._specbeam_init()


class AsyncSpecBeamScheduler(DraftLengthMixin, AsyncScheduler):
    """vLLM's :class:`AsyncScheduler` (async scheduling) with specbeam's draft length."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._specbeam_init()
