"""What a distillation run returns and writes: the settings, the training it did, and the draft's
figures on held-out text before and after."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_FILE = "distill_report.json"
ROWS = (  # (key, label, format)
    ("greedy_agreement", "greedy agreement", "{:.1%}"),
    ("mean_accepted_length", "mean accepted length, greedy chains γ = {gamma}", "{:.2f}"),
    ("beam_steps_per_pass", "beam steps per target pass, B = {eval_beams}, depth {beam_depth}", "{:.2f}"),
)


@dataclass
class DistillReport:
    out: str
    steps: int
    train_seconds: float
    before: dict
    after: dict
    settings: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str, str]]:
        """``(figure, before, after)`` rows of the before/after table, formatted."""
        out = []
        for key, label, fmt in ROWS:
            out.append((label.format(**self.settings), fmt.format(self.before[key]), fmt.format(self.after[key])))
        return out

    def improved(self) -> bool | None:
        """True when every figure rose, False when none did, None when they moved apart."""
        rose = [self.after[key] > self.before[key] for key, _, _ in ROWS]
        return True if all(rose) else False if not any(rose) else None

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path
