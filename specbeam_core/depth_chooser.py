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

    ``local=True`` searches around the best depth instead of over all of them: a workload starts at
    the depth :meth:`begin_search` is given as ``hint`` (else at depth 0, the baseline: a cold start
    climbs to the depths that pay rather than paying first for the deepest, which costs most where
    speculation loses), measures depth 0 (at least twice: one slow window of the baseline
    would send the search the wrong way), then
    tries the depths next to the best one measured so far until neither neighbour is cheaper, and
    re-measures only those two neighbours and depth 0. Depth 0 stays in the set because costs can
    be flat over the deep depths (every draft token costing what it saves) while plain decoding is
    far cheaper; a walk between neighbours would stop on such a plateau. Each re-measurement that leaves the
    best depth where it was doubles the wait before the next one (up to ``16 * explore_every``); one
    that moves it brings the wait back to ``explore_every``.
    """

    def __init__(self, max_depth: int, trials: int = 2, decay: float = 0.97, explore_every: int = 16,
                 local: bool = False) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if explore_every < 1:
            raise ValueError(f"explore_every must be at least 1, got {explore_every}")
        self.depths = list(range(max_depth + 1))
        self.trials, self.decay, self.explore_every, self.local = trials, decay, explore_every, local
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

    def begin_search(self, workload: object = None, hint: int | None = None) -> None:
        """Switch to ``workload``'s measurements. ``hint`` is where a local search of it begins; it
        applies until the workload has a measurement of its own (a workload only ever visited briefly
        follows its hint as it moves, rather than a cold start)."""
        self._open = None
        self._record = self._record_for(workload)
        if hint is not None and not self.measured(workload):
            self._record.start = min(max(hint, 0), self.depths[-1])

    def measured(self, workload: object) -> bool:
        """Whether ``workload`` has a measurement of any depth."""
        record = self.workloads.get(workload)
        return record is not None and any(record.passes.values())

    def best(self, workload: object = ...) -> int:
        """The depth measured cheapest per step (of the current workload, or of ``workload``)."""
        r = self._record if workload is ... else self.workloads[workload]
        return min(self.depths, key=lambda d: r.seconds[d] / max(r.steps[d], 1e-9) if r.passes[d] else float("inf"))

    def _trials(self, depth: int) -> int:
        """Measurements of ``depth`` a search takes before it compares. A local search measures depth 0
        at least twice: it is the baseline every other depth is judged against, and one slow window of
        it would send the search into speculation that does not pay until the next re-measurement."""
        return max(self.trials, 2) if self.local and depth == 0 else self.trials

    def choose(self, now: float, steps_so_far: int, first_pass: bool) -> int:
        r = self._record
        # a window with no measured step in it (every step left out) adds nothing
        measured = self._open is not None and steps_so_far > self._open[2]
        if measured:
            d, started, before = self._open
            r.seconds[d] = r.seconds[d] * self.decay + (now - started)
            r.steps[d] = r.steps[d] * self.decay + (steps_so_far - before)
            r.passes[d] += 1
            r.last_measured[d] = r.clock
        if self.local and r.exploring is not None and measured:  # a re-measurement taken: back off while the best holds
            held = self.best() == r.exploring
            r.explore_gap = min(2 * r.explore_gap, 16 * self.explore_every) if held else self.explore_every
            r.exploring = None
        r.clock += 1
        if self.local:
            centre = self.best() if any(r.passes.values()) else (r.start or 0)
            # the centre first, then depth 0 (the baseline: a plateau of deep depths must not hide it), then
            # the centre's neighbours
            near = list(dict.fromkeys(d for d in (centre, 0, centre - 1, centre + 1) if d in r.passes))
        else:
            near = self.depths[::-1]  # deepest first
        untried = [d for d in near if r.passes[d] < self._trials(d)]
        if untried:
            depth = untried[0]
        else:
            depth = self.best()
            r.since_explore += 1
            others = [d for d in near if d != depth]
            if r.since_explore >= (r.explore_gap or self.explore_every) and others:
                r.since_explore = 0
                if self.local:
                    r.exploring, r.explore_gap = depth, r.explore_gap or self.explore_every
                depth = min(others, key=lambda d: r.last_measured[d])
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
    start: int | None = None  # where a local search begins (``begin_search``'s hint)
    explore_gap: int = 0  # a local search's passes between re-measurements (0: explore_every)
    exploring: int | None = None  # the best depth when a re-measurement was started

    def __post_init__(self) -> None:
        self.seconds = {d: 0.0 for d in self.depths}
        self.steps = {d: 0.0 for d in self.depths}
        self.passes = {d: 0 for d in self.depths}
        self.last_measured = {d: -1 for d in self.depths}
