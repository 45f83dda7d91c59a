"""specbeam's draft length on vLLM's ``/metrics``, in vLLM's naming style.

- ``vllm:specbeam_draft_length`` (gauge): the draft length of the last step that ran;
- ``vllm:specbeam_steps_total{draft_length="k"}`` (counter): engine steps that verified drafts of
  length k (0: steps with running requests and no drafts).

Both are read off the speculative-decoding stats vLLM's scheduler already sends with every step
(draft tokens over drafts is the step's length: every row of a step drafts the same number), by a
wrap of vLLM's ``PrometheusStatLogger.record`` installed in the API server of a specbeam engine only.
vLLM's own ``vllm:spec_decode_*`` counters (drafts, draft tokens, accepted tokens, per position) are
there as for any speculative method.
"""

from __future__ import annotations

import functools

_installed = False
_metrics: dict = {}


def step_draft_length(scheduler_stats) -> int | None:
    """The draft length of the step these stats describe; None for an idle step."""
    spec = getattr(scheduler_stats, "spec_decoding_stats", None)
    if spec is not None and spec.num_drafts > 0:
        return round(spec.num_draft_tokens / spec.num_drafts)
    return 0 if getattr(scheduler_stats, "num_running_reqs", 0) > 0 else None


def _families():
    if not _metrics:
        from prometheus_client import Counter, Gauge

        _metrics["gauge"] = Gauge("vllm:specbeam_draft_length", "Draft length of the last engine step (specbeam).",
                                  labelnames=["engine"], multiprocess_mode="mostrecent")
        _metrics["steps"] = Counter("vllm:specbeam_steps", "Engine steps by the draft length they verified (specbeam).",
                                    labelnames=["engine", "draft_length"])
    return _metrics


def observe(scheduler_stats, engine_idx: int = 0) -> None:
    length = step_draft_length(scheduler_stats)
    if length is None:
        return
    metrics = _families()
    metrics["gauge"].labels(engine=str(engine_idx)).set(length)
    metrics["steps"].labels(engine=str(engine_idx), draft_length=str(length)).inc()


def install() -> bool:
    """Wrap ``PrometheusStatLogger.record`` in this process (idempotent)."""
    global _installed
    if _installed:
        return True
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    original = PrometheusStatLogger.record

    @functools.wraps(original)
    def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
        original(self, scheduler_stats, iteration_stats, *args, **kwargs)
        if scheduler_stats is not None:
            observe(scheduler_stats, kwargs.get("engine_idx", args[1] if len(args) > 1 else 0))

    PrometheusStatLogger.record = record
    _installed = True
    return True
