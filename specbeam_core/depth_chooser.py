"""How deep speculative beam search drafts in each pass: the depth measured cheapest per beam step."""

from __future__ import annotations

from dataclasses import dataclass, field


class DepthChooser:
    """How many levels to draft ahead in each pass: the depth with the fewest measured seconds per
    beam step. Depth 0 is plain beam search on the paged cache (one step per pass), so speculation
    never stays on where it costs more than it saves: how far the draft's trees reach and what a tree
    token costs on this hardware decide.

    A measurement runs from one pass to the next (the pass and the steps it covered); the first pass
    of a search (the prompt's prefill) is not measured. Measurements are kept per *workload* (the
    key :meth:`begin_search` is given: prompts x beams and whether a logits processor runs), since
    what pays at one prompt and four beams does not at sixteen rows; within a workload each depth is
    tried ``trials`` times, deepest first, then the cheapest is kept. Older measurements of a depth
    weigh ``decay`` times less with each new one, and every ``explore_every`` passes the depth
    measured longest ago is tried once more: a choice made on a cold start, or under a load that has
    since changed, is revisited rather than kept for good.
    """

    def __init__(self, max_depth: int, trials: int = 2, decay: float = 0.97, explore_every: int = 16) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if explore_every < 1:
            raise ValueError(f"explore_every must be at least 1, got {explore_every}")
        self.depths = list(range(max_depth + 1))
        self.trials, self.decay, self.explore_every = trials, decay, explore_every
        self.workloads: dict[object, _DepthRecord] = {}
        self._record = _DepthRecord(self.depths)  # until the first begin_search names a workload
        self._open: tuple[int, float, int] | None = None  # (depth, started, steps before)

    def _record_for(self, workload: object) -> "_DepthRecord":
        if workload not in self.workloads:
            self.workloads[workload] = _DepthRecord(self.depths)
        return self.workloads[workload]

    # the current workload's measurements (decayed seconds and steps, raw pass counts)
    @property
    def seconds(self) -> dict[int, float]:
        return self._record.seconds

    @property
    def steps(self) -> dict[int, float]:
        return self._record.steps

    @property
    def passes(self) -> dict[int, int]:
        return self._record.passes

    def begin_search(self, workload: object = None) -> None:
        self._open = None
        self._record = self._record_for(workload)

    def best(self) -> int:
        r = self._record
        return min(self.depths, key=lambda d: r.seconds[d] / max(r.steps[d], 1e-9) if r.passes[d] else float("inf"))

    def choose(self, now: float, steps_so_far: int, first_pass: bool) -> int:
        r = self._record
        if self._open is not None:
            d, started, before = self._open
            r.seconds[d] = r.seconds[d] * self.decay + (now - started)
            r.steps[d] = r.steps[d] * self.decay + (steps_so_far - before)
            r.passes[d] += 1
            r.last_measured[d] = r.clock
        r.clock += 1
        untried = [d for d in self.depths if r.passes[d] < self.trials]
        if untried:
            depth = untried[-1]
        else:
            depth = self.best()
            r.since_explore += 1
            if r.since_explore >= self.explore_every and len(self.depths) > 1:
                r.since_explore = 0
                depth = min((d for d in self.depths if d != depth), key=lambda d: r.last_measured[d])
        self._open = None if first_pass else (depth, now, steps_so_far)
        return depth


@dataclass
class _DepthRecord:
    """One workload's measurements for :class:`DepthChooser`."""

    depths: list[int]
    seconds: dict[int, float] = field(init=False)  # decayed sum of measured seconds
    steps: dict[int, float] = field(init=False)  # decayed sum of beam steps covered in them
    passes: dict[int, int] = field(init=False)  # measurements taken
    last_measured: dict[int, int] = field(init=False)  # the pass count when each depth was last measured
    clock: int = 0
    since_explore: int = 0

    def __post_init__(self) -> None:
        self.seconds = {d: 0.0 for d in self.depths}
        self.steps = {d: 0.0 for d in self.depths}
        self.passes = {d: 0 for d in self.depths}
        self.last_measured = {d: -1 for d in self.depths}
