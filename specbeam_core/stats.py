"""Per-step records and the statistics observer (a plugin on ``specbeam_on_step``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .hookspecs import hookimpl


@dataclass
class StepRecord:
    """One draft → verify → commit step over the batch."""

    source: int  # id of the engine that ran the step
    step: int
    request_ids: list[int]
    num_drafted: list[int]  # per row
    num_accepted: list[int]  # per row
    bonus: list[bool]  # per row: whole draft accepted, the last token is a bonus token
    drafted_tokens: list[list[int]]  # per row
    emitted_tokens: list[list[int]]  # per row: accepted drafts + recovered/bonus, after stop truncation
    draft_forwards: int
    target_forwards: int
    seconds: float

    @property
    def num_recovered(self) -> int:
        """Rows whose draft was rejected somewhere (their last token is a recovered token)."""
        return sum(1 for d, b in zip(self.num_drafted, self.bonus) if d > 0 and not b)


@dataclass(eq=False)  # a plugin: compared and hashed by identity, as pluggy needs
class SpecStats:
    """Running totals; ``acceptance_rate`` = accepted / drafted, ``mean_accepted_length`` = tokens per row-step."""

    steps: int = 0
    row_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    recovered: int = 0
    bonus: int = 0
    emitted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    seconds: float = 0.0
    records: list[StepRecord] = field(default_factory=list)
    keep_records: bool = True
    source: int | None = None  # count only this engine's steps (None: every step)

    @hookimpl
    def specbeam_on_step(self, record: StepRecord) -> None:
        if self.source is not None and record.source != self.source:
            return
        self.steps += 1
        self.row_steps += len(record.request_ids)
        self.drafted += sum(record.num_drafted)
        self.accepted += sum(record.num_accepted)
        self.bonus += sum(record.bonus)
        self.recovered += record.num_recovered
        self.emitted += sum(len(t) for t in record.emitted_tokens)
        self.target_forwards += record.target_forwards
        self.draft_forwards += record.draft_forwards
        self.seconds += record.seconds
        if self.keep_records:
            self.records.append(record)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """α of the analytic model: accepted / (accepted + rejected) over the draft positions the
        target actually judged (positions after the first rejection are never judged)."""
        judged = self.accepted + self.recovered
        return self.accepted / judged if judged else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens a row gains per target pass (accepted drafts + the recovered/bonus token)."""
        return (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "recovered": self.recovered,
            "bonus": self.bonus,
            "emitted": self.emitted,
            "acceptance_rate": self.acceptance_rate,
            "per_token_acceptance": self.per_token_acceptance,
            "mean_accepted_length": self.mean_accepted_length,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps(
            {"summary": self.summary(), "steps": [asdict(r) for r in self.records]},
            indent=None,
        )

    def reset(self) -> None:
        self.__init__(keep_records=self.keep_records, source=self.source)
