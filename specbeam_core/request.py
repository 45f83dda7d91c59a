"""A generation request: its tokens, how it samples, and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingParams

# (tokens so far, logits [positions, vocab]) -> processed logits, for each position whose context is
# ``tokens[:len(tokens) - positions + 1 + i]``; lets a framework apply its own logits processors.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    # called with the full token list after each appended token; True ends the request there
    stop: Callable[[list[int]], bool] | None = None
    # optional, shared by requests whose stops it can judge together: called once per step with every
    # (request, tokens it is about to append), before any is appended; ``stop`` may then answer from
    # what it judged (Engine.step)
    batch_stop: Callable[[list[tuple["Request", list[int]]]], None] | None = None
    # applied to the target's (and draft's) logits before sampling/argmax, position by position
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    # optional, shared by requests whose positions it can process together: (requests, contexts,
    # logits [E, vocab]) -> [E, vocab], called instead of logits_processor (processing.py)
    batch_logits_processor: Callable[[list["Request"], list[list[int]], torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    # keep, for every emitted token, the target's raw logits and the scores it was chosen from
    # (after the logits processor, and for sampled requests after temperature/top-k/top-p): HF's
    # ``output_logits`` / ``output_scores``
    record_scores: bool = False
    raw_logits: list[torch.Tensor] = field(default_factory=list)  # per emitted token: [vocab]
    scores: list[torch.Tensor] = field(default_factory=list)  # per emitted token: [vocab]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "length" | "stop" | "abort"
    # engine bookkeeping
    target_seq: int | None = None
    target_len: int = 0  # tokens whose target K/V is cached

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.num_generated

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> bool:
        """Append one token; return True (and set ``finish_reason``) if the request is now done."""
        self.tokens.append(token)
        if token in self.eos_token_ids:
            self.finish_reason = "eos"
        elif self.stop is not None and self.stop(self.tokens):
            self.finish_reason = "stop"
        elif self.num_generated >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finished
