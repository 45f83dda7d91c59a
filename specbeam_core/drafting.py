"""Drafters: what proposes tokens for the target to verify.

A drafter proposes up to ``num_draft[r]`` tokens after each request's current tokens. When it
samples, it returns the exact probabilities it sampled from (``Draft.probs``), which exact
rejection sampling needs; deterministic drafters return ``probs=None`` and their drafts are
verified as one-hot. A :class:`TreeDrafter` proposes token trees instead
(``propose_trees(requests, depths) -> list[TokenTree]``, :mod:`specbeam_core.drafting_tree`), and
the engine verifies trees for it.

:class:`DraftModelDrafter` runs a small causal LM on its own paged KV cache. It remembers which
tokens each request's draft cache holds and, before drafting, keeps the longest prefix that still
agrees with the request (rejected drafts are rolled back, accepted ones are never recomputed), then
feeds only the tokens it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .kv_cache import PagedKVCache
from .model import CausalLM, build_kv_batch, left_pad
from .processing import apply_logits_processors
from .request import Request
from .sampling import check_finite, probabilities, probabilities_per_row, sample
from .tree import TokenTree


def _separate_catch_up(feeds: dict[int, list[int]], short: int = 8) -> dict[int, list[int]]:
    """The catch-ups to feed in a forward of their own before drafting: all but the last token of
    every row with more than ``short`` unseen tokens, when that at least halves the padded token
    slots (one joining request's long prompt would otherwise pad every row's drafting forward to
    its length; when all rows catch up alike, one forward is cheaper)."""
    long = [r for r in feeds if len(feeds[r]) > short]
    if not long or len(long) == len(feeds):
        return {}
    whole = len(feeds) * max(len(f) for f in feeds.values())
    split = len(long) * (max(len(feeds[r]) for r in long) - 1) + \
        len(feeds) * max(len(f) for r, f in feeds.items() if r not in long)
    return {r: feeds[r][:-1] for r in long} if 2 * split <= whole else {}


def _bounded_catch_up(
    feeds: dict[int, list[int]], budget: int, short: int = 8
) -> tuple[dict[int, list[int]], set[int]]:
    """Long catch-ups within ``budget`` padded token slots: ``(catch_up, waiting)``.

    Rows with more than ``short`` unseen tokens (the long ones of :func:`_separate_catch_up`) are
    taken shortest first (the most rows drafting soonest, similar lengths padded together) while the catch-up
    forward's padded slots (rows x longest catch-up) stay within the budget: such a row is caught
    up and drafts this call. The first row that does not fit is fed a chunk as long as the budget
    allows next to them, and it and every longer row draft nothing this call (``waiting``); they
    are caught up over the next calls, a backlog shrinking by about the budget a call. When nothing
    has to wait the choice is :func:`_separate_catch_up`'s, as without a budget, unless feeding every
    row in one drafting forward would pad it past the budget."""
    long = sorted((r for r in feeds if len(feeds[r]) > short), key=lambda r: len(feeds[r]))  # stable
    catch_up: dict[int, list[int]] = {}
    waiting: set[int] = set()
    widest = 0  # longest catch-up taken so far
    for k, r in enumerate(long):
        need = len(feeds[r]) - 1  # its catch-up: all but the last unseen token; >= widest (shortest first)
        if not waiting and (k + 1) * need <= budget:
            catch_up[r], widest = feeds[r][:-1], need
            continue
        if not waiting:
            chunk = budget // (k + 1)  # k + 1 rows padded to the chunk fill the budget
            if chunk >= max(widest, 1):
                catch_up[r] = feeds[r][:chunk]  # the rest comes in the next calls
        waiting.add(r)
    if not waiting:
        separate = _separate_catch_up(feeds, short)
        if separate or len(feeds) * max(len(f) for f in feeds.values()) <= budget:
            return separate, waiting
    return catch_up, waiting


@dataclass
class Draft:
    tokens: torch.Tensor  # [N, G] draft tokens, padded with 0 past num_draft[r]
    num_draft: list[int]
    probs: torch.Tensor | None  # [N, G, vocab] distribution each draft token was sampled from, or None


@runtime_checkable
class Drafter(Protocol):
    vocab_size: int
    max_positions: int | None
    forward_count: int

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        """Make room for this many requests of at most this many tokens each (between requests)."""

    def propose(self, requests: list[Request], num_draft: list[int]) -> Draft:
        """Propose ``num_draft[r]`` tokens after ``requests[r].tokens``."""

    def release(self, request: Request) -> None:
        """Forget everything kept for ``request`` (finished or aborted)."""


@runtime_checkable
class TreeDrafter(Protocol):
    """A drafter of token trees: the engine verifies a tree per request for it (any drafter that has
    these members is one; a drafter may also have :class:`Drafter`'s ``propose``)."""

    vocab_size: int | None
    max_positions: int | None
    forward_count: int

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        """Make room for this many requests of at most this many tokens each (between requests)."""

    def max_tree_nodes(self, depth: int) -> int:
        """The most nodes a tree of this depth can have (the KV room a step needs)."""

    def propose_trees(self, requests: list[Request], depths: list[int]) -> list[TokenTree]:
        """A tree of depth at most ``depths[r]`` after ``requests[r].tokens`` (empty: no draft)."""

    def release(self, request: Request) -> None:
        """Forget everything kept for ``request`` (finished or aborted)."""


_TREE_DRAFTER_TYPES: dict[type, bool] = {}


def is_tree_drafter(drafter) -> bool:
    """``isinstance(drafter, TreeDrafter)``, decided once per drafter class (the engine asks every step,
    and a structural ``isinstance`` costs tens of microseconds)."""
    kind = type(drafter)
    known = _TREE_DRAFTER_TYPES.get(kind)
    if known is None:
        known = _TREE_DRAFTER_TYPES[kind] = isinstance(drafter, TreeDrafter)
    return known


def _lcp(a: list[int], b: list[int]) -> int:
    """Length of the common prefix. Usually all but the last few tokens agree (rejected drafts), so
    whole-prefix slice comparisons (C speed) find a long agreeing start before the Python loop."""
    n = min(len(a), len(b))
    i = 0
    for tail in (0, 8, 64):
        if n - tail > 0 and a[: n - tail] == b[: n - tail]:
            i = n - tail
            break
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModelDrafter:
    """Chain drafting with a small draft model on its own paged KV cache.

    ``confidence_threshold`` > 0 ends a row's draft early after a token whose draft probability is
    below it (the rule of HF's ``assistant_confidence_threshold``): fewer wasted drafts where the
    draft is unsure, the full draft length where it is confident.

    ``max_catch_up_tokens`` bounds the tokens one ``propose`` feeds the draft to catch rows up on
    what it has not seen (a joining request's prompt, or rows a server skipped while its batch was
    large): past it, rows are caught up in chunks over the next calls and draft nothing until they
    are (their ``num_draft`` comes back 0). A call with one drafting row catches it up at once:
    there is no other row to stall, and waiting would only delay its drafts for the same work (a
    request's prompt at concurrency 1). None: every row is caught up at once.
    """

    name = "draft_model"

    def __init__(
        self,
        model: CausalLM,
        block_size: int = 16,
        confidence_threshold: float = 0.0,
        max_catch_up_tokens: int | None = None,
    ) -> None:
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold!r}")
        if max_catch_up_tokens is not None and (
            isinstance(max_catch_up_tokens, bool) or not isinstance(max_catch_up_tokens, int) or max_catch_up_tokens < 1
        ):
            raise ValueError(f"max_catch_up_tokens must be a positive int or None, got {max_catch_up_tokens!r}")
        self.model = model
        self.confidence_threshold = confidence_threshold
        self.max_catch_up_tokens = max_catch_up_tokens
        self.vocab_size = model.vocab_size
        self.max_positions = model.max_positions
        self.block_size = block_size
        self.cache: PagedKVCache | None = None
        self._seq: dict[int, int] = {}  # request id -> draft KV sequence
        self._seen: dict[int, list[int]] = {}  # request id -> tokens whose draft K/V is cached

    @property
    def forward_count(self) -> int:
        return getattr(self.model, "forward_count", 0)

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        needed = num_sequences * (-(-tokens_per_sequence // self.block_size)) + 2
        if self.cache is None:
            self.cache = self.model.make_cache(needed, self.block_size)
        else:
            self.cache.grow(needed)  # in place: sequences of running requests keep their blocks

    def release(self, request: Request) -> None:
        seq = self._seq.pop(request.request_id, None)
        self._seen.pop(request.request_id, None)
        if seq is not None and self.cache is not None:
            self.cache.free(seq)

    def blocks_short(self, request: Request, num_tokens: int) -> int:
        """Blocks the draft cache must still allocate to hold ``num_tokens`` tokens of ``request``."""
        seq = self._seq.get(request.request_id)
        have = len(self.cache.block_table(seq)) if seq is not None else 0
        return max(0, self.cache.blocks_needed(num_tokens) - have)

    def _sync(self, request: Request) -> list[int]:
        """Roll the draft cache back to what still agrees with the request; return the unseen tokens."""
        rid = request.request_id
        if rid not in self._seq:
            self._seq[rid] = self.cache.new_sequence()
            self._seen[rid] = []
        seen = self._seen[rid]
        keep = _lcp(seen, request.tokens)
        keep = min(keep, len(request.tokens) - 1)  # always feed at least the last token
        if keep < len(seen):
            self.cache.truncate(self._seq[rid], keep)
            del seen[keep:]
        return request.tokens[keep:]

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_draft: list[int]) -> Draft:
        assert self.cache is not None, "reserve() must be called before propose()"
        n_rows, g_max = len(requests), max(num_draft, default=0)
        draft_tokens = torch.zeros(n_rows, g_max, dtype=torch.long)  # [N, G]
        sampled = any(not r.params.greedy for r, g in zip(requests, num_draft) if g > 0)
        draft_probs = torch.zeros(n_rows, g_max, self.vocab_size) if sampled else None  # [N, G, vocab]
        num_draft = list(num_draft)  # shortened for rows whose draft loses confidence
        feeds = {r: self._sync(requests[r]) for r in range(n_rows) if num_draft[r] > 0}
        if self.max_catch_up_tokens is None or len(feeds) == 1:  # one row: no other row to stall, and it
            catch_up, waiting = _separate_catch_up(feeds), set()  # would only draft later for the same work
        else:
            catch_up, waiting = _bounded_catch_up(feeds, self.max_catch_up_tokens)
        if catch_up:  # long catch-ups first, in a forward of their own: the drafting forward pads short
            self._forward(requests, catch_up)
            for r in catch_up:
                feeds[r] = feeds[r][-1:]
        for r in waiting:  # not caught up within the budget: no drafts this call
            num_draft[r] = 0
            del feeds[r]
        drafted: dict[int, list[int]] = {r: [] for r in feeds}
        for i in range(g_max):
            rows = [r for r in feeds if num_draft[r] > i]
            if not rows:
                break
            logits = self._forward(requests, {r: feeds[r] for r in rows})  # [n, vocab]
            processed_rows = [j for j, r in enumerate(rows) if requests[r].logits_processor is not None]
            if processed_rows:  # every row's processor at this draft position, in one call where they share one
                idx = torch.tensor(processed_rows)
                processed = apply_logits_processors(
                    [requests[rows[j]] for j in processed_rows],
                    [requests[rows[j]].tokens + drafted[rows[j]] for j in processed_rows],
                    logits[idx],
                )  # [p, vocab]
                if len(processed_rows) == len(rows):  # every row: no copy of the rest to keep
                    logits = processed
                else:
                    logits = logits.clone()
                    logits[idx] = processed
            sampled_rows = [
                j for j, r in enumerate(rows) if not requests[r].params.greedy and requests[r].logits_processor is None
            ]
            q_rows = {}
            if sampled_rows:  # rows that warp alike in one call
                q_all = probabilities_per_row(
                    logits[sampled_rows], [requests[rows[j]].params for j in sampled_rows]
                )  # [s, vocab]
                q_rows = {j: q_all[k] for k, j in enumerate(sampled_rows)}
            top = logits.argmax(dim=-1)  # [n] every row's greedy token, one op for the batch
            top_list = top.tolist()
            top_conf = None  # [n] the draft's probability of each row's greedy token, when a threshold needs it
            if self.confidence_threshold > 0.0:
                top_conf = torch.softmax(logits.float(), dim=-1).gather(1, top[:, None])[:, 0].tolist()
            for j, r in enumerate(rows):
                req = requests[r]
                row_logits = logits[j]  # [vocab], processed above where the request has a processor
                if req.params.greedy and req.logits_processor is None:
                    token = top_list[j]
                    confident = top_conf is None or top_conf[j] >= self.confidence_threshold
                elif req.params.greedy:
                    token = int(row_logits.argmax())
                    confident = (
                        self.confidence_threshold == 0.0
                        or float(torch.softmax(row_logits.float(), dim=-1)[token]) >= self.confidence_threshold
                    )
                else:
                    q = q_rows[j] if j in q_rows else probabilities(row_logits, req.params)  # [vocab]
                    token = int(sample(q[None], req.generator))
                    draft_probs[r, i] = q
                    confident = float(q[token]) >= self.confidence_threshold
                if not confident:  # keep this token, draft no further (HF's assistant_confidence_threshold rule)
                    num_draft[r] = i + 1
                draft_tokens[r, i] = token
                drafted[r].append(token)
                feeds[r] = [token]
        return Draft(tokens=draft_tokens, num_draft=num_draft, probs=draft_probs)

    def _forward(self, requests: list[Request], feeds: dict[int, list[int]]) -> torch.Tensor:
        """Feed ``feeds[r]`` after what row ``r``'s draft cache holds, all rows in one left-padded
        forward; return each row's logits at its last fed token ``[n, vocab]``."""
        rows = list(feeds)
        tokens = left_pad([feeds[r] for r in rows])  # [n, T]
        seqs = [self._seq[requests[r].request_id] for r in rows]
        kv = build_kv_batch(self.cache, seqs, [len(feeds[r]) for r in rows], self.model_dtype)
        logits = self.model.forward(tokens, kv, 1)[:, 0]  # [n, vocab]
        check_finite(logits, "draft model logits")
        for r in rows:
            self._seen[requests[r].request_id].extend(feeds[r])
        return logits

    @property
    def model_dtype(self) -> torch.dtype:
        return self.cache.dtype
