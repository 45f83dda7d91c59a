"""specbeam's options for vLLM, read from ``--additional-config '{"specbeam": {...}}'``.

Unknown keys and bad values are refused at start-up with a message naming them: vLLM itself
rejects unknown keys in ``--speculative-config``, so our options travel in vLLM's
``additional_config`` and get the same strictness here.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SpecBeamVllmOptions(BaseModel):
    """Options of the specbeam proposer (``additional_config["specbeam"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    draft: str = Field(description="path of the draft model (a local HF folder with the target's vocabulary)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per block of the draft's paged KV cache")
    draft_kv_tokens: int | None = Field(
        None, ge=1, description="token slots in the draft KV pool (default: max_num_seqs x max_model_len)")
    sample_drafts: bool = Field(
        True, description="sample drafts of sampled requests from the draft's warped distribution and hand "
        "vLLM's rejection sampler their probabilities (needs the specbeam plugin); off: greedy drafts, one-hot")
    full_draft_max_batch: int = Field(
        4, ge=0, description="default draft-length policy: the full draft length up to this many decoding rows")
    no_draft_min_batch: int = Field(
        8, ge=1, description="default draft-length policy: no drafting from this many decoding rows on")
    lookup_draft_tokens: int = Field(
        2, ge=0, le=64, description="in steps where the draft-length policy gives the draft model nothing to draft "
        "(large batches), draft this many tokens by prompt lookup for rows whose last tokens occurred before in "
        "them (no model runs: vLLM's ngram method; verified one-hot). 0: off")
    lookup_min_acceptance: float = Field(
        0.4, ge=0.0, le=1.0, description="prompt lookup: stop drafting by lookup while the acceptance of its recent "
        "drafts, over the batch or for the request, is below this (a verified position costs target compute that only an accepted "
        "token repays); one probing step every 16 then checks whether it pays again")
    lookup_min_ngram: int = Field(2, ge=1, description="prompt lookup: shortest suffix that must match")
    lookup_max_ngram: int = Field(4, ge=1, description="prompt lookup: longest suffix tried first")
    confidence_threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="end a row's draft after a token the draft gives less probability "
        "than this (HF's assistant_confidence_threshold rule): fewer wasted draft forwards")
    max_catch_up_tokens: int | None = Field(
        None, ge=0, description="padded token slots a proposal feeds the draft at most to catch rows up on what it "
        "has not seen (a joining request's prompt; every row's recent tokens when the batch falls back under "
        "no_draft_min_batch after steps without drafting): rows past it are caught up in chunks over the next steps "
        "and draft once they are, so one step never stalls on a large catch-up. Default (null): 256 on the CPU, "
        "where a draft forward costs about in proportion to its tokens; elsewhere the scheduler's "
        "max_num_batched_tokens, the target's own per-step budget. 0: catch every row up at once")
    plain_sampler_without_drafts: bool = Field(
        True, description="in a step where no row carries drafts (large batches under the default policy), "
        "prepare inputs without spec-decode metadata and sample with vLLM's plain sampler, as a spec-off server "
        "does, instead of its rejection sampler over zero drafts (the same tokens and log-probs; needs the "
        "specbeam plugin's runner hooks; the inputs part only for attention-only KV caches)")
    seed: int | None = Field(None, description="seed of the per-request draft generators (default: vLLM's --seed)")
    stats_file: str | None = Field(
        None, description="write the proposer's live counters (draft KV blocks, states, drafts) to this JSON "
        "file; '{rank}' in the path becomes the tensor-parallel rank")
    vllm_cpu_gemm: bool = Field(
        True, description="on the CPU, run the draft's linear layers through vLLM's prepacked GEMM (oneDNN / "
        "sgl-kernel) instead of torch's: about half the draft cost once the target has evicted it from cache")
    dtype: str | None = Field(None, description="draft dtype: float32, bfloat16 or float16 (default: the "
                              "target's, as vLLM's draft_model)")

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, value: str | None) -> str | None:
        if value is not None and value not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {value!r}")
        return value

    @field_validator("draft")
    @classmethod
    def _draft_exists(cls, value: str) -> str:
        if not value:
            raise ValueError("the draft model path is empty")
        if not os.path.isdir(value):
            raise ValueError(f"draft model folder {value!r} does not exist (specbeam loads local drafts only)")
        if not os.path.isfile(os.path.join(value, "config.json")):
            raise ValueError(f"draft model folder {value!r} has no config.json")
        return value

    @field_validator("lookup_max_ngram")
    @classmethod
    def _ngram_order(cls, value: int, info) -> int:
        low = info.data.get("lookup_min_ngram")
        if low is not None and value < low:
            raise ValueError(f"lookup_max_ngram ({value}) must be at least lookup_min_ngram ({low})")
        return value

    @field_validator("no_draft_min_batch")
    @classmethod
    def _order(cls, value: int, info) -> int:
        full = info.data.get("full_draft_max_batch")
        if full is not None and value <= full:
            raise ValueError(f"no_draft_min_batch ({value}) must be greater than full_draft_max_batch ({full})")
        return value


CPU_CATCH_UP_TOKENS = 256  # about 8-10 ms of the demo draft on a CPU core: under one 16-row target step


def catch_up_budget(options: "SpecBeamVllmOptions", on_cpu: bool, scheduler_config: Any = None) -> int | None:
    """The drafter's ``max_catch_up_tokens`` for these options (None: unbounded)."""
    if options.max_catch_up_tokens is not None:
        return options.max_catch_up_tokens or None
    if on_cpu:
        return CPU_CATCH_UP_TOKENS
    return int(getattr(scheduler_config, "max_num_batched_tokens", 0) or 0) or None


def parse_options(additional_config: Any) -> SpecBeamVllmOptions:
    """Read and validate ``additional_config["specbeam"]``; a ``ValueError`` naming the problem."""
    section = (additional_config or {}).get("specbeam") if isinstance(additional_config, dict) else None
    if section is None:
        raise ValueError(
            "specbeam needs a draft model: pass --additional-config "
            "'{\"specbeam\": {\"draft\": \"/path/to/draft\"}}' (or use `specbeam serve --draft PATH`)")
    if not isinstance(section, dict):
        raise ValueError(f"additional_config['specbeam'] must be a JSON object, got {type(section).__name__}")
    try:
        return SpecBeamVllmOptions(**section)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'specbeam'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"bad specbeam option(s) in --additional-config: {problems}") from None
