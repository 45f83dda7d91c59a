"""Every mutant of :mod:`mutants` (a deliberately broken verifier, beam replay, or noisy logits)
must fail the suite's own checks — the same test functions the real code passes elsewhere in the
suite. Run with ``-s`` to see, per mutant and check, the failure message: the chi-square p-value or
the first differing token (docs/testing.md tabulates them).

The statistical checks have a stated false-alarm rate (each test 1e-3, Bonferroni over its
positions) and fixed seeds, so a pass or a fail here is deterministic.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from mutants import MUTANTS, Check, apply


def run_check(check: Check, request):
    func = getattr(importlib.import_module(check.module), check.function)
    kwargs = dict(check.kwargs)
    for name in inspect.signature(func).parameters:
        if name not in kwargs:
            kwargs[name] = request.getfixturevalue(name)
    func(**kwargs)


@pytest.mark.parametrize(
    "mutant, check",
    [pytest.param(m, c, id=f"{m.name}-{c}") for m in MUTANTS for c in m.checks],
)
def test_mutant_is_caught(mutant, check, request, monkeypatch):
    apply(mutant, monkeypatch)
    with pytest.raises(AssertionError) as caught:
        run_check(check, request)
    first = (str(caught.value).strip().splitlines() or [caught.exconly()])[0][:200]
    print(f"\nMUTANT {mutant.name} | {check} | {first}")
