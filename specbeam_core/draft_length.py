"""A draft-length policy that measures: each step drafts the length, 0 .. ``max_length``, that has
cost the fewest seconds per emitted token so far. Length 0 is plain decoding on the paged cache, so
speculation turns itself off where it loses: a draft that agrees too rarely (logits processors such
as a repetition penalty make the draft pick among second choices), or a batch large enough that the
target's forward grows with every drafted token.

It is a plugin of the two hooks that carry what it needs: ``specbeam_draft_length`` asks for the
length, ``specbeam_on_step`` reports what the step cost and emitted. The choosing is the beam
search's :class:`~specbeam_core.beam_search.DepthChooser`, on a clock of summed step seconds (so time
spent outside the engine, between calls, is never counted), with measurements kept per workload:
the batch size rounded up to a power of two, and whether a logits processor runs.
"""

from __future__ import annotations

from .beam_search import DepthChooser
from .hookspecs import hookimpl


class AdaptiveDraftLength:
    """Register on an engine's plugin manager: ``pm.register(AdaptiveDraftLength(4))``."""

    def __init__(self, max_length: int, trials: int = 2, explore_every: int = 16) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        self.chooser = DepthChooser(max_length, trials=trials, explore_every=explore_every)
        self.clock = 0.0  # summed seconds of the steps seen
        self.emitted = 0  # tokens emitted by the steps seen
        self._workload: object = None

    @hookimpl
    def specbeam_draft_length(self, requests, default: int) -> int:
        workload = (1 << max(len(requests) - 1, 0).bit_length(), any(r.logits_processor is not None for r in requests))
        if workload != self._workload:
            self.chooser.begin_search(workload)
            self._workload = workload
        # a step that prefills a new request costs what no draft length decides: not measured
        prefill = any(r.target_len == 0 for r in requests)
        return self.chooser.choose(self.clock, self.emitted, first_pass=prefill)

    @hookimpl
    def specbeam_on_step(self, record) -> None:
        self.clock += record.seconds
        self.emitted += sum(len(tokens) for tokens in record.emitted_tokens)
