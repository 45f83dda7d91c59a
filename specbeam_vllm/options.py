"""specbeam's options for vLLM.

They travel in the speculative config itself (keys vLLM does not know, taken out before vLLM sees
it) or in ``--additional-config '{"specbeam": {...}}'``; the first wins where both name a key.
Unknown keys and bad values are refused at start-up with one line naming them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SpecBeamVllmOptions(BaseModel):
    """Options of specbeam inside vLLM (``additional_config["specbeam"]`` once resolved)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_drafts: bool = Field(
        True, description="sample the drafts of sampled requests at the request's own temperature, top-k and "
        "top-p and hand vLLM's rejection sampler their probabilities (off: greedy drafts, verified as one-hot)")
    adaptive_draft_length: bool = Field(
        True, description="choose each step's draft length, 0 .. num_speculative_tokens, from measured seconds "
        "per emitted token by batch size (off: always num_speculative_tokens)")
    skip_draft_at_zero: bool = Field(
        True, description="at draft length 0, skip the draft's forward (vLLM runs it to keep the draft's KV cache "
        "complete) and catch the draft up when drafting resumes: length 0 then costs a spec-off step")
    hold_steps: int = Field(8, ge=2, le=1024, description="engine steps a chosen draft length is kept and measured")
    settle_steps: int = Field(2, ge=0, le=64, description="steps after a change of length left unmeasured "
                              "(they still verify drafts proposed at the previous length)")
    trials: int = Field(1, ge=1, le=16, description="measurements of each length per batch-size bucket before "
                        "the cheapest is kept (with local_search, length 0 at least twice)")
    local_search: bool = Field(
        True, description="search the draft length around the best one measured (an unmeasured batch-size "
        "bucket starts at the nearest measured bucket's best, the first one at length 0; only the neighbouring "
        "lengths are re-measured) instead of trying every length")
    explore_every: int = Field(16, ge=1, description="after this many choices, the length measured longest ago "
                               "is measured again (the cost model stays current)")
    log_interval_s: float = Field(60.0, ge=0.0, description="seconds between log lines with the measured cost "
                                  "table (0: never)")


SECTION = "specbeam"


def option_names() -> set[str]:
    return set(SpecBeamVllmOptions.model_fields)


def parse_options(section: Any) -> SpecBeamVllmOptions:
    """Validate a dict of options; a ``ValueError`` naming every problem."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"specbeam's options must be a JSON object, got {type(section).__name__}")
    try:
        return SpecBeamVllmOptions(**section)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or SECTION}: {e['msg']}" for e in err.errors())
        raise ValueError(f"bad specbeam option(s): {problems}") from None


def options_of(vllm_config: Any) -> SpecBeamVllmOptions | None:
    """The resolved options of a specbeam engine's ``VllmConfig``; None for any other engine."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict) or SECTION not in extra:
        return None
    return parse_options(extra[SECTION])
