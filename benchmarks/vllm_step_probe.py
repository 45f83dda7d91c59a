"""Timers inside a vLLM server's processes, for ``vllm_step_costs.py`` (not imported by specbeam).

``vllm_step_costs.py`` copies this file as ``sitecustomize.py`` into a folder on the server's
``PYTHONPATH``, so every process of that server runs it at start-up. It wraps a few methods of vLLM's
engine core, scheduler and model runner (and specbeam's, where they are loaded) with wall-clock
timers as their modules are imported, times Python's garbage collections, clears the totals on
``SIGUSR2`` and writes them to ``STEP_PROBE_DIR/probe-PID.json`` on ``SIGUSR1`` and at exit. Nothing
else changes.
"""

import atexit
import functools
import gc
import importlib.util
import json
import os
import signal
import sys
import time

TOTALS: dict[str, list[float]] = {}  # timer -> [calls, seconds]


def reset(*_) -> None:
    """Start counting afresh (the script sends ``SIGUSR2`` once start-up and warm-up are over)."""
    TOTALS.clear()


def dump(*_) -> None:
    if TOTALS:
        path = os.path.join(os.environ.get("STEP_PROBE_DIR", "."), f"probe-{os.getpid()}.json")
        with open(path, "w") as fh:
            json.dump(TOTALS, fh)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total = TOTALS.setdefault(name, [0, 0.0])
            total[0] += 1
            total[1] += time.perf_counter() - started
    return wrapper


def wrap(cls, prefix, names):
    for name in names:
        if name in vars(cls):
            setattr(cls, name, timed(f"{prefix}.{name}", vars(cls)[name]))


def engine_core(module):
    wrap(module.EngineCore, "engine_core", ["step"])


def scheduler(module):
    wrap(module.Scheduler, "scheduler", ["schedule", "update_from_output"])


def runner(module):
    wrap(module.GPUModelRunner, "runner", ["execute_model", "sample_tokens", "_prepare_inputs", "_model_forward",
                                           "_sample", "_bookkeeping_sync"])
    from vllm.model_executor.layers import logits_processor

    wrap(logits_processor.LogitsProcessor, "lm_head", ["forward"])


def specbeam_scheduler(module):
    wrap(module.DraftLengthMixin, "specbeam", ["_choose_draft_length", "_record"])


def specbeam_draft_lag(module):
    wrap(module.DraftLag, "specbeam_lag", ["record"])


PATCHES = {"vllm.v1.engine.core": engine_core, "vllm.v1.core.sched.scheduler": scheduler,
           "vllm.v1.worker.gpu_model_runner": runner, "specbeam_vllm.scheduler": specbeam_scheduler,
           "specbeam_vllm.draft_lag": specbeam_draft_lag}


class _PatchOnImport:
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


_gc_started = [0.0]


def _gc_timer(phase, info) -> None:
    """Python's garbage collections, timed like the methods above (``gc.generation2``: full ones)."""
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    for name in ("gc", f"gc.generation{info['generation']}"):
        total = TOTALS.setdefault(name, [0, 0.0])
        total[0] += 1
        total[1] += time.perf_counter() - _gc_started[0]


sys.meta_path.insert(0, _PatchOnImport())
gc.callbacks.append(_gc_timer)
atexit.register(dump)
signal.signal(signal.SIGUSR1, dump)
signal.signal(signal.SIGUSR2, reset)
