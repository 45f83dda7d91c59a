"""The default draft-length policy under vLLM: draft less as the batch grows, down to nothing.

Speculation trades spare compute for fewer sequential steps. At small batches the target's forward
is bound by weight reads and verifying γ extra tokens is nearly free; as the batch grows the forward
becomes compute-bound and every rejected draft token costs real throughput. So the policy drafts
the full length up to ``full_draft_max_batch`` decoding rows, shrinks it linearly after that, and
drafts nothing from ``no_draft_min_batch`` rows on, where vLLM then runs plain decoding steps.

The proposer registers it before loading the ``specbeam`` entry-point plugins, and pluggy calls
later registrations first, so any plugin that implements the same hook decides before it; it in
turn answers before the built-in ``trylast`` default (always the configured length).
"""

from __future__ import annotations

from specbeam_core import hookimpl


def batch_draft_length(batch: int, default: int, full_max: int, none_min: int) -> int:
    """Draft length for ``batch`` decoding rows: ``default`` up to ``full_max``, 0 from ``none_min``."""
    if batch <= full_max:
        return default
    if batch >= none_min:
        return 0
    span = none_min - full_max
    return max(0, min(default, round(default * (none_min - batch) / span)))


class BatchSizePolicy:
    """A ``specbeam_draft_length`` plugin: :func:`batch_draft_length` with the proposer's options."""

    def __init__(self, full_draft_max_batch: int, no_draft_min_batch: int) -> None:
        self.full_max = full_draft_max_batch
        self.none_min = no_draft_min_batch

    def length(self, batch: int, default: int) -> int:
        return batch_draft_length(batch, default, self.full_max, self.none_min)

    @hookimpl
    def specbeam_draft_length(self, requests, default: int) -> int:
        return self.length(len(requests), default)


class LookupGate:
    """Whether prompt-lookup drafts pay, from their measured acceptance.

    A lookup draft costs nothing to make but a verified position in the target's next forward; on a
    compute-bound batch that is a real share of the step, repaid only when the token is accepted.
    The gate keeps exponentially decayed sums of drafted and accepted lookup tokens (``decay`` per
    verdict recorded) and stays open while the rate is at least ``min_acceptance`` or while fewer
    than ``min_evidence`` tokens have been judged. Closed, it opens once every ``probe_every``
    times it is asked, so a workload that turns repetitive is noticed again. The proposer keeps one
    for the whole batch and, where it knows vLLM's request ids, one per request (a request whose
    text does not repeat stops drafting by lookup without stopping the others).
    """

    def __init__(self, min_acceptance: float, decay: float = 0.9, min_evidence: float = 16.0,
                 probe_every: int = 16) -> None:
        self.min_acceptance = min_acceptance
        self.decay, self.min_evidence, self.probe_every = decay, min_evidence, probe_every
        self.drafted = 0.0
        self.accepted = 0.0
        self.steps_closed = 0

    @property
    def rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted > 0 else None

    def record(self, drafted: int, accepted: int) -> None:
        """The verdict on one step's lookup drafts: ``accepted`` of ``drafted`` tokens."""
        self.drafted = self.drafted * self.decay + drafted
        self.accepted = self.accepted * self.decay + accepted

    def open(self) -> bool:
        """Draft by lookup this step? (Call once per step that could.)"""
        if self.drafted < self.min_evidence or self.accepted >= self.min_acceptance * self.drafted:
            self.steps_closed = 0
            return True
        self.steps_closed += 1
        if self.steps_closed >= self.probe_every:
            self.steps_closed = 0
            return True
        return False
