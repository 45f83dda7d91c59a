"""One engine-to-worker round trip per speculative step instead of three.

Without async scheduling (vLLM keeps it off for ``custom_class`` proposers) every engine step of
speculative decoding makes three calls from the engine-core process to the workers:
``execute_model`` (the target's forward), ``sample_tokens(grammar)`` (sampling, verification, and
the proposer) and then, in ``EngineCore.post_step``, ``take_draft_token_ids``, which only fetches
the drafts the worker already has. Each call is a message-queue round trip that both processes spin
on; on a small CPU host the third one showed in profiles as 5 % of the engine core's time at 16
concurrent requests (``benchmarks/profile_vllm_worker.py --process EngineCore``), with the worker
waiting for it.

- Drafts: the worker attaches them to the ``ModelRunnerOutput`` it returns (attribute
  :data:`ATTR`, pickled with the output), and the engine core's executor answers
  ``take_draft_token_ids`` from the output of the same step. The drafts are the very object
  ``take_draft_token_ids`` would have returned, one round trip sooner.
- Sampling: ``EngineCore.step`` sends ``sample_tokens`` only when ``execute_model`` returned
  nothing, and its argument is the grammar bitmask, which is ``None`` for a batch without
  structured output. For such a batch (:func:`samples_in_execute`) the worker runs
  ``sample_tokens(None)`` itself at the end of ``execute_model`` and returns its output, as vLLM's
  runner already does for steps it can finish at once.

Anything else (an output without the attribute, a batch with structured output, pipeline
parallelism or a KV connector, another proposer) takes vLLM's own path.
"""

from __future__ import annotations

import functools
import importlib
from concurrent.futures import Future
from typing import Any

ATTR = "specbeam_draft_token_ids"
_MISSING = object()
_engine_installed = False


def attach_drafts(runner: Any, output: Any) -> None:
    """Worker side: put this step's drafts (``runner.take_draft_token_ids()``) on ``output``."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if type(output) is not ModelRunnerOutput or output is EMPTY_MODEL_RUNNER_OUTPUT:
        return  # async outputs, intermediate tensors, the shared empty output: vLLM's own path
    setattr(output, ATTR, runner.take_draft_token_ids())


def samples_in_execute(runner: Any, scheduler_output: Any) -> bool:
    """Worker side: may ``execute_model`` go on to ``sample_tokens(None)`` for this step?"""
    config = getattr(runner, "vllm_config", None)
    return (getattr(runner, "execute_model_state", None) is not None  # a forward ran and awaits sampling
            and getattr(scheduler_output, "has_structured_output_requests", True) is False  # grammar is None
            and not getattr(runner, "use_async_scheduling", True)
            and getattr(config, "max_concurrent_batches", 2) == 1  # EngineCore.step, not the batch queue
            and getattr(config, "kv_transfer_config", 1) is None
            and getattr(config, "ec_transfer_config", None) is None)


def _step_output(result: Any) -> Any:
    """The ModelRunnerOutput behind an executor call's result, or None (a future not yet done)."""
    if isinstance(result, Future):
        return result.result() if result.done() and result.exception() is None else None
    return result


def _executor_classes() -> list[type]:
    classes = []
    for module, name in (("vllm.v1.executor.multiproc_executor", "MultiprocExecutor"),
                         ("vllm.v1.executor.uniproc_executor", "UniProcExecutor")):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the vLLM build
            continue
        if all(hasattr(cls, m) for m in ("execute_model", "sample_tokens", "take_draft_token_ids")):
            classes.append(cls)
    return classes


def _one_batch(executor: Any) -> bool:
    """One batch in flight at a time (``EngineCore.step``); not the batch queue of pipeline parallelism."""
    return getattr(getattr(executor, "vllm_config", None), "max_concurrent_batches", 1) == 1


def _wrap(cls: type) -> None:
    execute_orig, sample_orig, take_orig = cls.execute_model, cls.sample_tokens, cls.take_draft_token_ids

    # the result of this step's last call (execute_model's, replaced by sample_tokens' if it is sent);
    # with a batch queue (pipeline parallelism) steps overlap and vLLM's own round trip answers
    @functools.wraps(execute_orig)
    def execute_model(self, *args, **kwargs):
        result = execute_orig(self, *args, **kwargs)
        self._specbeam_step = result if _one_batch(self) else None
        return result

    @functools.wraps(sample_orig)
    def sample_tokens(self, *args, **kwargs):
        result = sample_orig(self, *args, **kwargs)
        self._specbeam_step = result if _one_batch(self) else None
        return result

    @functools.wraps(take_orig)
    def take_draft_token_ids(self):
        output = _step_output(getattr(self, "_specbeam_step", None))
        self._specbeam_step = None  # served once
        drafts = _MISSING if output is None else getattr(output, ATTR, _MISSING)
        return take_orig(self) if drafts is _MISSING else drafts

    cls.execute_model, cls.sample_tokens, cls.take_draft_token_ids = execute_model, sample_tokens, take_draft_token_ids


def install_engine_side() -> bool:
    """Engine-core side (from the ``vllm.general_plugins`` entry point): idempotent."""
    global _engine_installed
    if _engine_installed:
        return True
    classes = _executor_classes()
    for cls in classes:
        _wrap(cls)
    _engine_installed = bool(classes)
    return _engine_installed
