"""Argument checks shared by the core's constructors and entry points: one wording for each."""

from __future__ import annotations


def check_int(value, name: str, low: int = 1) -> int:
    """``value`` if it is an integer (not a bool) of at least ``low``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_same_vocab(draft_vocab: int | None, target_vocab: int, what: str = "speculative decoding") -> None:
    """Draft and target must score the same token ids (a draft of ``None`` vocabulary fits any)."""
    if draft_vocab is not None and draft_vocab != target_vocab:
        raise ValueError(
            f"draft and target vocabularies differ: draft has {draft_vocab} tokens, "
            f"target has {target_vocab}; {what} needs one shared vocabulary "
            "(a draft with the target's tokenizer and an embedding padded to another size, as Qwen2.5 0.5B-7B "
            "against 14B+: wrap the draft in specbeam_core.VocabResizedDraft(draft, target.vocab_size))"
        )
