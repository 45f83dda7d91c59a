"""The statistics of one speculative beam search."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BeamStats:
    """Target passes against beam steps: ``steps / target_forwards`` is the speed-up in target passes."""

    steps: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    tree_nodes: int = 0
    peak_target_blocks: int = 0  # blocks in use after a pass, trees included
    peak_beam_blocks: int = 0  # distinct blocks the running beams hold between passes (shared prefixes once)
    records: list[dict] = field(default_factory=list)

    @property
    def steps_per_target_forward(self) -> float:
        return self.steps / self.target_forwards if self.target_forwards else 0.0

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "tree_nodes": self.tree_nodes,
            "steps_per_target_forward": self.steps_per_target_forward,
            "peak_target_blocks": self.peak_target_blocks,
            "peak_beam_blocks": self.peak_beam_blocks,
        }
