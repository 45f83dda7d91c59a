"""Prompt-lookup drafting: drafts copied from earlier in a request's own tokens.

When the last ``n`` tokens of a request occurred before in it, the tokens that followed that
occurrence are a free guess at what follows now (HF's ``prompt_lookup_num_tokens``, vLLM's
``ngram`` method). No model runs, so a proposal costs a few tensor operations for the whole batch:
where a draft model's proposal costs more than its accepted tokens save (a large batch on a
compute-bound device), these drafts can still pay. They are deterministic, so they are verified
one-hot and verification stays exact.

Terms: the *suffix* is a row's last ``n`` tokens; a *match* is an earlier occurrence of it (the most
recent one is taken, the longest ``n`` first); the *shift* is how far back the match lies. The draft
continues the row as if it repeated with that shift: ``draft[t] = tokens[length + t - shift]``, and
where that position is past the row's end it reads the draft itself (an overlapping copy, as LZ77
does), so a match right behind the suffix still drafts the full length (a repeated line, a run of
one token).
"""

from __future__ import annotations

import torch

from .drafting import Draft
from .request import Request
from .tree import TokenTree


def lookup_drafts(tokens: torch.Tensor, lengths: torch.Tensor, num_draft: int,
                  min_ngram: int = 2, max_ngram: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-lookup drafts for a batch of rows: ``(drafts, num)``.

    ``tokens`` [rows, width] holds each row's tokens left-aligned (positions past ``lengths[r]`` are
    ignored); ``lengths`` [rows]. Returns ``drafts`` [rows, num_draft] (0 where a row has no draft)
    and ``num`` [rows], ``num_draft`` where the row's suffix of some length in
    ``[min_ngram, max_ngram]`` occurred before, else 0.
    """
    if num_draft < 0:
        raise ValueError(f"num_draft must be >= 0, got {num_draft}")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
    rows, width = tokens.shape
    lengths = lengths.to(torch.long)
    shift = torch.zeros(rows, dtype=torch.long)  # [rows] 0: no match yet
    for n in range(max_ngram, min_ngram - 1, -1):
        if width < n + 1 or num_draft == 0:
            continue
        windows = tokens[:, : width - 1].unfold(1, n, 1)  # [rows, width - n, n] window j: tokens j .. j+n-1
        at = (lengths - n).clamp(min=0)[:, None] + torch.arange(n)  # [rows, n]
        suffix = tokens.gather(1, at.clamp(max=width - 1))  # [rows, n]
        starts = torch.arange(width - n)  # [width - n]
        hit = (windows == suffix[:, None, :]).all(-1)  # [rows, width - n]
        hit &= starts[None, :] + n < lengths[:, None]  # an earlier window, wholly inside the row
        hit &= (shift == 0)[:, None]  # a longer suffix matched already
        latest = torch.where(hit, starts[None, :], -1).amax(1)  # [rows] most recent match, -1: none
        shift = torch.where(latest >= 0, lengths - n - latest, shift)
    num = torch.where(shift > 0, num_draft, 0)  # [rows]
    step = torch.arange(num_draft)[None, :] % shift.clamp(min=1)[:, None]  # [rows, num_draft] overlapping copy
    at = (lengths - shift)[:, None] + step  # [rows, num_draft]
    drafts = tokens.gather(1, at.clamp(0, width - 1))  # [rows, num_draft]
    drafts = torch.where(num[:, None] > 0, drafts, 0)
    return drafts, num


class PromptLookupDrafter:
    """A :class:`~specbeam_core.drafting.Drafter` that drafts by prompt lookup (no model, no KV cache).

    A row whose suffix never occurred before gets no draft this step (``num_draft`` 0); the engine
    then decodes it one token at a time. Its drafts are the request's own tokens, so it fits any
    target's vocabulary (``vocab_size`` None skips the engine's vocabulary check).

    It also proposes trees (each a chain, empty without a match), so that
    :class:`~specbeam_core.drafting_tree.MergedTreeDrafter` can merge a lookup branch into a draft
    model's trees: a branch that costs no draft forward, and none of the target's where it repeats
    the model's own chain (shared prefixes are stored once).
    """

    name = "prompt_lookup"
    max_positions = None
    forward_count = 0

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4, vocab_size: int | None = None) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.vocab_size = vocab_size
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        return None

    def release(self, request: Request) -> None:
        return None

    def propose(self, requests: list[Request], num_draft: list[int]) -> Draft:
        width = max(len(r.tokens) for r in requests)
        tokens = torch.zeros(len(requests), width, dtype=torch.long)  # [rows, width]
        for i, request in enumerate(requests):
            tokens[i, : len(request.tokens)] = torch.tensor(request.tokens, dtype=torch.long)
        lengths = torch.tensor([len(r.tokens) for r in requests])  # [rows]
        g = max(num_draft, default=0)
        drafts, num = lookup_drafts(tokens, lengths, g, self.min_ngram, self.max_ngram)  # [rows, g], [rows]
        counts = [min(int(n), want) for n, want in zip(num.tolist(), num_draft)]
        return Draft(tokens=drafts, num_draft=counts, probs=None)

    def max_tree_nodes(self, depth: int) -> int:
        return depth

    def propose_trees(self, requests: list[Request], depths: list[int]) -> list[TokenTree]:
        draft = self.propose(requests, depths)
        trees = []
        for r, n in enumerate(draft.num_draft):
            tree, parent = TokenTree(), -1
            for token in draft.tokens[r, :n].tolist():
                parent = tree.add(token, parent)
            trees.append(tree)
        return trees
