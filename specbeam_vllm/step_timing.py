"""Diagnostics: wall time per engine step in vLLM's worker, by runner method.

Set ``SPECBEAM_STEP_TIMING=DIR`` in a vLLM server's environment (with specbeam installed, so that
its ``vllm.general_plugins`` entry point runs in every vLLM process) and each process that runs a
model writes ``DIR/timing-PID.json`` once a second: for each timed method the seconds spent in it
and the number of calls, cumulative. The worker's step is timed as a whole (``Worker.execute_model``
and ``Worker.sample_tokens``) and in parts (the target's forward, input preparation, sampling,
bookkeeping, the proposer), and ``between`` adds up the gaps of under 50 ms between two calls from
the engine core (the worker waiting for the scheduler; longer gaps are idle time). Python's garbage
collector is timed too (``gc0``, ``gc1``, ``gc2``: pauses by generation; ``gc_max``: the longest pause,
in ``seconds`` only), since a collection stops the worker wherever it happens. Spec-off servers
are timed the same way, so the two can be compared step for step:
``benchmarks/vllm_step_timing.py`` does that. Off unless the variable is set; a few
``perf_counter`` calls a step when on.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import threading
import time
from collections import defaultdict

ENV = "SPECBEAM_STEP_TIMING"
RUNNER_METHODS = ("_model_forward", "_prepare_inputs", "_sample", "_bookkeeping_sync", "propose_draft_token_ids",
                  "_update_states", "sample_tokens")
WORKER_METHODS = ("execute_model", "sample_tokens")
IDLE_GAP_S = 0.05

seconds: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)
_last_return: list[float | None] = [None]
_installed = False


def _timed(cls: type, name: str, key: str, engine_call: bool = False) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        if engine_call and _last_return[0] is not None and started - _last_return[0] < IDLE_GAP_S:
            seconds["between"] += started - _last_return[0]
            calls["between"] += 1
        try:
            return original(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            seconds[key] += ended - started
            calls[key] += 1
            if engine_call:
                _last_return[0] = ended

    setattr(cls, name, timed)


_gc_started: list[float] = [0.0]


def _gc_callback(phase: str, info: dict) -> None:
    """``gc.callbacks`` entry: the pause of each collection, by generation."""
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _gc_started[0]
    key = f"gc{info.get('generation', 0)}"
    seconds[key] += took
    calls[key] += 1
    seconds["gc_max"] = max(seconds["gc_max"], took)


def snapshot() -> dict:
    return {"seconds": dict(seconds), "calls": dict(calls)}


def _writer(path: str) -> None:
    while True:
        time.sleep(1.0)
        if not calls:
            continue
        try:
            data = snapshot()
        except RuntimeError:  # the worker added a key while we copied (a method's first call): next tick
            continue
        with open(path + ".tmp", "w") as fh:
            json.dump(data, fh)
        os.replace(path + ".tmp", path)


def install(out_dir: str) -> bool:
    """Time the worker's methods in this process (idempotent); False if vLLM's classes are missing."""
    global _installed
    if _installed:
        return True
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:  # pragma: no cover - depends on the vLLM build
        return False
    for name in RUNNER_METHODS:
        if hasattr(GPUModelRunner, name):
            _timed(GPUModelRunner, name, name)
    for name in WORKER_METHODS:
        if hasattr(Worker, name):
            _timed(Worker, name, f"Worker.{name}", engine_call=True)
    gc.callbacks.append(_gc_callback)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"timing-{os.getpid()}.json")
    threading.Thread(target=_writer, args=(path,), daemon=True, name="specbeam-step-timing").start()
    _installed = True
    return True


def install_from_env() -> bool:
    out_dir = os.environ.get(ENV)
    return install(out_dir) if out_dir else False
