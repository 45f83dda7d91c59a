"""Whether a draft can draft for the target, for both vLLM paths (the proposer and beam search)."""

from __future__ import annotations

MAX_PADDING = 512  # embeddings are padded to multiples of 64-256 rows; more than this is another vocabulary


def tokenizer_vocab(path: str) -> dict[str, int] | None:
    """The token -> id map of the tokenizer in ``path`` (None: none there, or it does not load)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError):
        return None


def check_draft_vocab(draft: str, draft_vocab: int, target_vocab: int, target_tokens: dict[str, int] | None) -> None:
    """Raise a ValueError naming the problem unless the draft (folder ``draft``, ``draft_vocab``
    embedding rows) can draft for a target of ``target_vocab`` rows whose tokenizer has
    ``target_tokens`` (None: unknown). The same tokenizer is required where both are known; rows may
    differ by up to :data:`MAX_PADDING` (embeddings padded to other sizes: Qwen2.5 0.5B-7B have
    151,936, 14B+ 152,064), and a draft with fewer rows than the target needs its tokenizer shown to
    be the target's (larger ones are cut to the target's ids, so they never propose a foreign one)."""
    ours = tokenizer_vocab(draft) if target_tokens is not None else None
    if ours is not None and ours != target_tokens:
        differ = len(set(ours.items()) ^ set(target_tokens.items())) // 2 or abs(len(ours) - len(target_tokens))
        raise ValueError(
            f"draft model {draft!r} has a different vocabulary from the target's tokenizer "
            f"({len(ours)} vs {len(target_tokens)} tokens; {differ} token/id pairs differ)")
    if abs(draft_vocab - target_vocab) > MAX_PADDING or (draft_vocab < target_vocab and ours is None):
        raise ValueError(
            f"draft model {draft!r} has a vocabulary of {draft_vocab} tokens but the target has {target_vocab}: "
            "specbeam needs a draft with the target's vocabulary (an embedding padded to another size is "
            "accepted when the draft's tokenizer is the target's)")
