"""Options of one evaluation run (filled by ``specbeam evaluate``'s argparse flags)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .modes import MODES

DEFAULT_OUT = Path("runs") / "eval"


@dataclass
class EvalConfig:
    target: str
    draft: str
    dtype: str = "float32"
    num_prompts: int = 8
    max_new_tokens: int = 40
    modes: tuple[str, ...] = MODES
    gamma: int = 4  # speculative chains and the tree depth of the "tree" mode
    num_beams: int = 4
    tree_width: int = 3
    tree_budget: int | None = None
    gammas: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # γ sweep (empty: no sweep)
    tree_widths: tuple[int, ...] = (2, 3)  # tree-shape sweep at depth ``gamma`` ...
    tree_budgets: tuple[int, ...] = (4, 8, 12)  # ... over width × budget (empty: no sweep)
    repeats: int = 2  # timing: best of this many passes over the prompts
    # torch threads: 1 by default. Batch-1 decoding of the demo pair gains little from a second thread, and on a
    # shared 2-core machine two threads thrash as soon as another job takes a core (measured: greedy 4.4
    # against 94 tokens/s). 0: leave torch's default.
    threads: int = 1
    out: Path = DEFAULT_OUT
    track: bool = False  # log to Weights & Biases (offline)
    quick: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick_defaults(cls, **overrides) -> "EvalConfig":
        """A CI-sized run: 2 prompts, 12 tokens, 2 beams, a 2-point γ sweep and a 2-point tree sweep."""
        values = dict(
            num_prompts=2,
            max_new_tokens=12,
            num_beams=2,
            gammas=(2, 4),
            tree_widths=(2,),
            tree_budgets=(4, 8),
            repeats=1,
            quick=True,
        )
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
        if "greedy" not in self.modes:
            raise ValueError(
                "the greedy mode is the baseline of every speed-up and exactness check; keep it in --modes"
            )
        for name in ("num_prompts", "max_new_tokens", "gamma", "num_beams", "tree_width", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_beams < 2 and any(m in self.modes for m in ("beam", "spec_beam")):
            raise ValueError("beam modes need num_beams >= 2")
        if (
            any(g < 1 for g in self.gammas)
            or any(w < 1 for w in self.tree_widths)
            or any(b < 1 for b in self.tree_budgets)
        ):
            raise ValueError("sweep values must be >= 1")

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["modes"], d["gammas"] = list(self.modes), list(self.gammas)
        d["tree_widths"], d["tree_budgets"] = list(self.tree_widths), list(self.tree_budgets)
        return d
