"""Drafters that propose token trees instead of chains.

:class:`DraftTreeDrafter` grows a tree per request with a draft-model beam search of width ``w``
and depth ``d``: at each level every frontier node offers its ``w`` most likely tokens, the ``w``
candidates with the highest *cumulative* draft probability become nodes and the next frontier, and
growth stops when the request's node ``budget`` is spent. The nodes of a level therefore go where
the draft is confident (several siblings under an uncertain node, one deep path under confident
ones: a dynamic tree, as in EAGLE-2); width 1 is a chain. The draft K/V of every expanded node is kept in the draft's paged pool until the next
step, so whatever the target accepts is never recomputed by the draft.

:class:`MergedTreeDrafter` runs several tree drafters (e.g. two draft models) and merges their trees
into one, shared prefixes deduplicated (SpecInfer's merged token trees).

Drafts are deterministic choices, so tree verification treats each child as a one-hot draft.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .beam_search import PrefixIndex, draft_log_probs
from .model import CausalLM
from .request import Request
from .tree import TokenTree


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class DraftTreeDrafter:
    name = "draft_tree"

    def __init__(self, model: CausalLM, *, width: int = 3, budget: int | None = None, block_size: int = 16) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_positions = model.max_positions
        self.width = _check_positive("tree width", width)
        self.budget = None if budget is None else _check_positive("tree node budget", budget)  # None: width × depth
        self.block_size = block_size
        self.cache = None
        self.index: PrefixIndex | None = None
        self.log_probs: dict = {}  # (request id, generated tokens) -> draft log-probs there [vocab]
        self._forwards = 0

    @property
    def forward_count(self) -> int:
        return self._forwards

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        needed = num_sequences * (-(-tokens_per_sequence // self.block_size) + (self.budget or 16) + 2)
        if self.cache is None:
            self.cache = self.model.make_cache(needed, self.block_size)
            self.index = PrefixIndex(self.cache)
        else:
            self.cache.grow(needed)

    def release(self, request: Request) -> None:
        if self.index is None:
            return
        rid = request.request_id
        for key in [k for k in self.index.seqs if k[0] == rid]:
            self.cache.free(self.index.seqs.pop(key)[0])
        for key in [k for k in self.log_probs if k[0] == rid]:
            del self.log_probs[key]

    def _forward(self, seqs: list[int], feeds: list[list[int]]) -> torch.Tensor:
        self._forwards += 1
        return draft_log_probs(self.model, self.cache, seqs, feeds)

    @torch.inference_mode()
    def propose_trees(self, requests: list[Request], depths: list[int]) -> list[TokenTree]:
        """One tree per request, at most ``depths[r]`` deep and ``budget`` (default width × depth) nodes."""
        assert self.index is not None, "reserve() must be called before propose_trees()"
        keys = [(r.request_id, tuple(r.output)) for r in requests]
        budgets = [self.budget or self.width * d for d in depths]
        trees = [TokenTree() for _ in requests]
        active = [i for i, d in enumerate(depths) if d > 0]
        new_seqs, new_log_probs = {}, {}
        # draft K/V of the last step's expanded nodes is reused; other requests keep theirs as they are
        active_ids = {requests[i].request_id for i in active}
        kept = {k: v for k, v in self.index.seqs.items() if k[0] not in active_ids}
        roots = {i: self.index.materialize(keys[i], requests[i].prompt) for i in active}
        fed = [i for i in active if roots[i][1]]
        root_log_probs = {i: self.log_probs.get(keys[i]) for i in active}
        if fed:
            out = self._forward([roots[i][0] for i in fed], [roots[i][1] for i in fed])  # [n, vocab]
            for j, i in enumerate(fed):
                root_log_probs[i] = out[j]
        for i in active:
            new_seqs[keys[i]] = (roots[i][0], len(requests[i].tokens))
            new_log_probs[keys[i]] = root_log_probs[i]

        # frontier entries: (request row, node or -1, key, draft sequence, log-probs, cumulative log-prob)
        frontier = [(i, -1, keys[i], roots[i][0], root_log_probs[i], 0.0) for i in active]
        for level in range(max(depths, default=0)):
            added: dict[int, list] = {}
            by_row: dict[int, list] = {}
            for f in frontier:
                if depths[f[0]] > level and len(trees[f[0]]) < budgets[f[0]]:
                    by_row.setdefault(f[0], []).append(f)
            for i, entries in by_row.items():
                cands = []
                for f in entries:
                    top_lp, top_tok = torch.topk(f[4], self.width)  # [width]
                    cands += [(f[5] + lp, tok, f) for lp, tok in zip(top_lp.tolist(), top_tok.tolist())]
                cands.sort(key=lambda c: -c[0])
                for cum, tok, f in cands[: min(self.width, budgets[i] - len(trees[i]))]:
                    node = trees[i].add(tok, f[1])
                    added.setdefault(i, []).append((f, tok, node, (f[2][0], f[2][1] + (tok,)), cum))
            expand = [c for i, cs in added.items() for c in cs if depths[i] > level + 1]
            if not expand:
                break
            child_seqs = [self.cache.fork(c[0][3]) for c in expand]
            out = self._forward(child_seqs, [[c[1]] for c in expand])  # [n, vocab]
            frontier = []
            for j, (f, tok, node, key, cum) in enumerate(expand):
                frontier.append((f[0], node, key, child_seqs[j], out[j], cum))
                new_seqs[key] = (child_seqs[j], len(requests[f[0]].prompt) + len(key[1]))
                new_log_probs[key] = out[j]
        for key, value in kept.items():
            new_seqs[key] = value
        stale = [k for k in self.index.seqs if k not in kept]
        for key in stale:
            self.cache.free(self.index.seqs.pop(key)[0])
        self.index.seqs = new_seqs
        self.log_probs = {**{k: v for k, v in self.log_probs.items() if k in kept}, **new_log_probs}
        return trees


def merge_trees(trees: Sequence[TokenTree]) -> TokenTree:
    """One tree holding every root-to-node path of ``trees``, shared prefixes stored once."""
    merged = TokenTree()
    index: dict[tuple[int, int], int] = {}  # (parent in merged, token) -> node in merged
    for tree in trees:
        mapped: list[int] = []
        for token, parent in zip(tree.tokens, tree.parents):
            mparent = -1 if parent < 0 else mapped[parent]
            node = index.get((mparent, token))
            if node is None:
                node = merged.add(token, mparent)
                index[(mparent, token)] = node
            mapped.append(node)
    return merged


class MergedTreeDrafter:
    """Several tree drafters proposing together; their trees merged per request."""

    name = "multi_draft"

    def __init__(self, drafters: Sequence[DraftTreeDrafter]) -> None:
        if not drafters:
            raise ValueError("MergedTreeDrafter needs at least one drafter")
        vocab = {d.vocab_size for d in drafters}
        if len(vocab) != 1:
            raise ValueError(f"draft vocabularies differ: {sorted(vocab)}; merged drafts need one shared vocabulary")
        self.drafters = list(drafters)
        self.vocab_size = vocab.pop()
        limits = [d.max_positions for d in drafters if d.max_positions]
        self.max_positions = min(limits) if limits else None

    @property
    def forward_count(self) -> int:
        return sum(d.forward_count for d in self.drafters)

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        for d in self.drafters:
            d.reserve(num_sequences, tokens_per_sequence)

    def release(self, request: Request) -> None:
        for d in self.drafters:
            d.release(request)

    def propose_trees(self, requests: list[Request], depths: list[int]) -> list[TokenTree]:
        per_drafter = [d.propose_trees(requests, depths) for d in self.drafters]
        return [merge_trees([trees[i] for trees in per_drafter]) for i in range(len(requests))]
