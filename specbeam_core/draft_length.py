"""A draft-length policy that measures: each step drafts the length, 0 .. ``max_length``, that has
cost the fewest seconds per emitted token so far. Length 0 is plain decoding, so speculation turns
itself off where it loses: a draft that agrees too rarely (logits processors such as a repetition
penalty make the draft pick among second choices), or a batch large enough that the target's
forward grows with every drafted token.

It is a plugin of the two hooks that carry what it needs: ``specbeam_draft_length`` asks for the
length, ``specbeam_on_step`` reports what the step cost and emitted. The choosing is the beam
search's :class:`~specbeam_core.beam_search.DepthChooser`, on a clock of summed step seconds (so time
spent outside the engine, between calls, is never counted), with measurements kept per workload:
the batch size rounded up to a power of two, and whether a logits processor runs.

A serving engine that pipelines its steps sees a choice take effect a step or two late: the drafts
proposed at one step are verified at the next. There a choice is held for ``hold_steps`` steps, and
the first ``settle_steps`` of them, still paying for the previous length, are not measured. Nor is
the first choice at a batch size never seen before: a server gets there as a wave of requests
arrives, and their prefills would be charged to whichever length ran then.

With ``local=True`` each workload searches around one length instead of trying them all (see
:class:`~specbeam_core.depth_chooser.DepthChooser`): a batch-size bucket with no measurement of its
own starts at the best length of the nearest bucket measured so far, and only the lengths next to the
best are re-measured. A bucket a server only passes through (the batch growing as a wave arrives,
shrinking as it drains) may never hold a choice long enough to be measured; it keeps following its
nearest measured bucket.
A server whose batch size keeps moving then pays for few steps at lengths far from the best.
"""

from __future__ import annotations

from .checks import check_int
from .depth_chooser import DepthChooser
from .hookspecs import hookimpl


class AdaptiveDraftLength:
    """Register on an engine's plugin manager: ``pm.register(AdaptiveDraftLength(4))``."""

    def __init__(self, max_length: int, trials: int = 2, explore_every: int = 16, hold_steps: int = 1,
                 settle_steps: int = 0, local: bool = False) -> None:
        check_int(max_length, "max_length")
        if not 0 <= settle_steps < hold_steps:
            raise ValueError(f"need 0 <= settle_steps < hold_steps, got settle_steps={settle_steps}, "
                             f"hold_steps={hold_steps}")
        self.chooser = DepthChooser(max_length, trials=trials, explore_every=explore_every, local=local)
        self.hold_steps, self.settle_steps = hold_steps, settle_steps
        self.clock = 0.0  # summed seconds of the measured steps
        self.emitted = 0  # tokens emitted by the measured steps
        self.length = max_length  # the length chosen last
        self._workload: object = None
        self._held = 0  # steps the current choice has been handed out
        self._settling = 0  # steps still to leave unmeasured

    @staticmethod
    def workload(requests) -> tuple[int, bool]:
        """The key measurements are kept under: (batch size rounded up to a power of two, any processor)."""
        return (1 << max(len(requests) - 1, 0).bit_length(), any(r.logits_processor is not None for r in requests))

    @hookimpl
    def specbeam_draft_length(self, requests, default: int) -> int:
        workload = self.workload(requests)
        if workload != self._workload:
            if self.hold_steps > 1 and workload not in self.chooser.workloads:
                # a server reaches a new batch size as requests arrive: the first choice's steps hold their
                # prefills, a burst that would be charged to whichever length happened to run then
                self._settling = max(self._settling, self.hold_steps)
            self.chooser.begin_search(workload, hint=self._nearest_best(workload))
            self._workload = workload
            self._held = 0
        if 0 < self._held < self.hold_steps:
            self._held += 1
            return self.length
        # one step per choice (an engine that prefills once per call): the prefill step is not measured.
        # Held choices (a server, where requests arrive every few steps) measure every step: a prompt costs
        # the same per emitted token at every length, while the draft's share of it (its own prefill, its
        # first drafts) is a real cost of drafting
        prefill = self.hold_steps == 1 and any(r.target_len == 0 for r in requests)
        length = self.chooser.choose(self.clock, self.emitted, first_pass=prefill)
        if length != self.length:
            self._settling = max(self._settling, self.settle_steps)
        self.length, self._held = length, 1
        return length

    def _nearest_best(self, workload: tuple[int, bool]) -> int | None:
        """The best length of the measured workload nearest to ``workload`` (same processor flag), if any."""
        size, processors = workload
        measured = [w for w in self.chooser.workloads if w[1] == processors and self.chooser.measured(w)]
        if not measured:
            return None
        nearest = min(measured, key=lambda w: (abs(w[0].bit_length() - size.bit_length()), -w[0]))
        return self.chooser.best(nearest)

    @hookimpl
    def specbeam_on_step(self, record) -> None:
        if self._settling > 0:
            self._settling -= 1
            return
        self.clock += record.seconds
        self.emitted += sum(len(tokens) for tokens in record.emitted_tokens)

    def table(self) -> dict[object, dict[int, float]]:
        """Measured milliseconds per emitted token, by workload and length (lengths not measured left out)."""
        out = {}
        for workload, record in self.chooser.workloads.items():
            out[workload] = {d: 1000.0 * record.seconds[d] / record.steps[d]
                             for d in record.seconds if record.passes[d] and record.steps[d] > 0}
        return out
