"""``specbeam distill``: align a draft with its target, so chains accept more and beam trees hold the
target's beams.

    report = specbeam_hf.distill.distill("target/", "draft/", "corpus/", "distilled/", minutes=20)
    print(report.before, report.after)

Modules: :mod:`.data` (text, held-out split, prompts), :mod:`.rollouts` (continuations by the draft and
by the target), :mod:`.losses` (TV, argmax cross-entropy, beam ranking), :mod:`.trainer` (transformers'
``Trainer`` with those), :mod:`.evaluate` (before/after figures), :mod:`.saving`, :mod:`.checks`,
:mod:`.report` and :mod:`.run` (the whole run). Needs ``pip install "specbeam[distill]"``.
"""

from __future__ import annotations

import importlib

__all__ = ["DistillInputError", "DistillReport", "distill"]
_EXPORTS = {"distill": ".run", "DistillReport": ".report", "DistillInputError": ".errors"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
