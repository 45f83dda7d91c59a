"""The step-timing diagnostic (``specbeam_vllm.step_timing``): timed methods add their wall time
and calls; the gaps between two engine calls count as the worker's wait, idle gaps do not."""

from __future__ import annotations

import time
from collections import defaultdict

from specbeam_vllm import step_timing


class Runner:
    def forward(self, x):
        time.sleep(0.01)
        return x + 1


class Worker:
    def execute_model(self, runner, x):
        return runner.forward(x)


def test_timed_methods_and_gaps(monkeypatch):
    monkeypatch.setattr(step_timing, "seconds", defaultdict(float))
    monkeypatch.setattr(step_timing, "calls", defaultdict(int))
    monkeypatch.setattr(step_timing, "_last_return", [None])
    monkeypatch.setattr(step_timing, "IDLE_GAP_S", 0.3)  # wide margins: a busy host oversleeps
    monkeypatch.setattr(Runner, "forward", Runner.forward)  # restored after the test
    monkeypatch.setattr(Worker, "execute_model", Worker.execute_model)
    step_timing._timed(Runner, "forward", "_model_forward")
    step_timing._timed(Worker, "execute_model", "Worker.execute_model", engine_call=True)
    runner, worker = Runner(), Worker()
    assert worker.execute_model(runner, 1) == 2  # the wrapped methods still return their results
    time.sleep(0.02)  # the worker waits for the engine core: counted
    worker.execute_model(runner, 2)
    time.sleep(0.6)  # idle: not counted
    worker.execute_model(runner, 3)
    snap = step_timing.snapshot()
    assert snap["calls"] == {"_model_forward": 3, "Worker.execute_model": 3, "between": 1}
    assert 0.03 <= snap["seconds"]["_model_forward"] <= snap["seconds"]["Worker.execute_model"]
    assert 0.02 <= snap["seconds"]["between"] < step_timing.IDLE_GAP_S


def test_off_without_the_variable(monkeypatch):
    monkeypatch.delenv(step_timing.ENV, raising=False)
    assert step_timing.install_from_env() is False


def test_garbage_collections_timed_by_generation(monkeypatch):
    import gc

    monkeypatch.setattr(step_timing, "seconds", defaultdict(float))
    monkeypatch.setattr(step_timing, "calls", defaultdict(int))
    gc.callbacks.append(step_timing._gc_callback)
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        gc.callbacks.remove(step_timing._gc_callback)
    snap = step_timing.snapshot()
    assert snap["calls"]["gc2"] >= 1 and snap["calls"]["gc0"] >= 1
    assert 0.0 < snap["seconds"]["gc_max"] <= snap["seconds"]["gc2"] + snap["seconds"]["gc0"] + snap["seconds"].get("gc1", 0.0)
