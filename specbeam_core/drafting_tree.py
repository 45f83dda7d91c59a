"""Drafters that propose token trees instead of chains.

:class:`DraftTreeDrafter` grows a tree per request with a draft-model beam search of width ``w``
and depth ``d``: at each level every frontier node offers its ``w`` most likely tokens, and the ``w``
offers with the highest *cumulative* draft probability (plus the draft's greedy chain) are expanded
into the next frontier. The tree is then the greedy chain plus the most probable other offers, of
any depth, until the request's node ``budget`` is spent. The nodes therefore go where the draft is
confident (several siblings under an uncertain node, one deep path under confident ones: a dynamic
tree with EAGLE-2's reranking), and a tree never accepts fewer tokens than the chain it holds; width
1 is a chain. The draft K/V of every expanded node is kept in the draft's paged pool until the next
step, so whatever the target accepts is never recomputed by the draft.

:class:`MergedTreeDrafter` runs several tree drafters (e.g. two draft models, or a draft model and
prompt lookup) and merges their trees into one, shared prefixes deduplicated (SpecInfer's merged
token trees).

Drafts are deterministic choices, so tree verification treats each child as a one-hot draft.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .beam_drafter import draft_log_probs
from .checks import check_int
from .model import CausalLM
from .prefix_index import PrefixIndex
from .request import Request
from .tree import TokenTree


class DraftTreeDrafter:
    name = "draft_tree"

    def __init__(self, model: CausalLM, *, width: int = 3, budget: int | None = None, block_size: int = 16) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_positions = model.max_positions
        self.width = check_int(width, "tree width")
        self.budget = None if budget is None else check_int(budget, "tree node budget")  # None: width × depth
        self.block_size = block_size
        self.cache = None
        self.index: PrefixIndex | None = None
        self.log_probs: dict = {}  # (request id, generated tokens) -> draft log-probs there [vocab]
        self._forwards = 0

    @property
    def forward_count(self) -> int:
        return self._forwards

    def max_tree_nodes(self, depth: int) -> int:
        """The most nodes a tree of this depth can have."""
        return self.budget or self.width * depth

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
        roots = dict(
            zip(active, self.index.materialize_all([keys[i] for i in active], [requests[i].prompt for i in active]))
        )
        fed = [i for i in active if roots[i][1]]
        root_log_probs = {i: self.log_probs.get(keys[i]) for i in active}
        if fed:
            out = self._forward([roots[i][0] for i in fed], [roots[i][1] for i in fed])  # [n, vocab]
            for j, i in enumerate(fed):
                root_log_probs[i] = out[j]
        for i in active:
            new_seqs[keys[i]] = (roots[i][0], len(requests[i].tokens))
            new_log_probs[keys[i]] = root_log_probs[i]

        # Every offered node is a candidate: (cumulative log-prob, depth, token, parent candidate or -1).
        # A level expands its `width` most probable candidates and the draft's greedy chain (one draft
        # forward for all rows). The tree is the greedy chain, then the most probable other candidates
        # of any depth until the budget is spent (EAGLE-2's reranking). Holding the chain, a tree
        # never accepts less than the chain would; a child's cumulative log-prob never exceeds its
        # parent's, so the chosen candidates always form a tree.
        cands: dict[int, list[tuple[float, int, int, int]]] = {i: [] for i in active}
        chain: dict[int, list[int]] = {i: [] for i in active}  # candidate indices of the greedy chain
        # frontier entries: (request row, candidate index or -1, key, draft sequence, log-probs, cumulative log-prob)
        frontier = [(i, -1, keys[i], roots[i][0], root_log_probs[i], 0.0) for i in active]
        for level in range(max(depths, default=0)):
            expand = []
            by_row: dict[int, list] = {}
            live = [f for f in frontier if depths[f[0]] > level]
            if not live:
                break
            top_lp, top_tok = torch.topk(torch.stack([f[4] for f in live]), self.width)  # [F, width] one topk a level
            for f, lps, toks in zip(live, top_lp.tolist(), top_tok.tolist()):
                by_row.setdefault(f[0], []).append((f, lps, toks))
            for i, entries in by_row.items():
                offered = []
                for f, lps, toks in entries:
                    for k, (lp, tok) in enumerate(zip(lps, toks)):
                        cands[i].append((f[5] + lp, level + 1, tok, f[1]))
                        offered.append((len(cands[i]) - 1, f))
                        if k == 0 and f[1] == (chain[i][-1] if chain[i] else -1):
                            chain[i].append(len(cands[i]) - 1)
                if depths[i] > level + 1:
                    offered.sort(key=lambda c: -cands[i][c[0]][0])
                    chosen = offered[: self.width]
                    if all(ci != chain[i][-1] for ci, _ in chosen):
                        chosen += [c for c in offered if c[0] == chain[i][-1]]
                    expand += [(i, ci, f) for ci, f in chosen]
            if not expand:
                break
            child_seqs = [self.cache.fork(f[3]) for _, _, f in expand]
            out = self._forward(child_seqs, [[cands[i][ci][2]] for i, ci, _ in expand])  # [n, vocab]
            frontier = []
            for j, (i, ci, f) in enumerate(expand):
                key = (f[2][0], f[2][1] + (cands[i][ci][2],))
                frontier.append((i, ci, key, child_seqs[j], out[j], cands[i][ci][0]))
                new_seqs[key] = (child_seqs[j], len(requests[i].prompt) + len(key[1]))
                new_log_probs[key] = out[j]
        for i in active:
            in_chain = set(chain[i])
            rest = sorted(
                (c for c in range(len(cands[i])) if c not in in_chain), key=lambda c: (-cands[i][c][0], cands[i][c][1])
            )
            order = (chain[i] + rest)[: budgets[i]]
            node_of: dict[int, int] = {}
            for c in sorted(order, key=lambda c: cands[i][c][1]):  # shallower first: parents before children
                _, _, tok, parent = cands[i][c]
                node_of[c] = trees[i].add(tok, -1 if parent < 0 else node_of[parent])
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
        vocab = {d.vocab_size for d in drafters if d.vocab_size is not None}  # None: any (prompt lookup)
        if len(vocab) > 1:
            raise ValueError(f"draft vocabularies differ: {sorted(vocab)}; merged drafts need one shared vocabulary")
        self.drafters = list(drafters)
        self.vocab_size = vocab.pop() if vocab else None
        limits = [d.max_positions for d in drafters if d.max_positions]
        self.max_positions = min(limits) if limits else None

    @property
    def forward_count(self) -> int:
        return sum(d.forward_count for d in self.drafters)

    def max_tree_nodes(self, depth: int) -> int:
        """The most nodes a merged tree of this depth can have (no prefix shared)."""
        return sum(d.max_tree_nodes(depth) for d in self.drafters)

    def reserve(self, num_sequences: int, tokens_per_sequence: int) -> None:
        for d in self.drafters:
            d.reserve(num_sequences, tokens_per_sequence)

    def release(self, request: Request) -> None:
        for d in self.drafters:
            d.release(request)

    def propose_trees(self, requests: list[Request], depths: list[int]) -> list[TokenTree]:
        per_drafter = [d.propose_trees(requests, depths) for d in self.drafters]
        return [merge_trees([trees[i] for trees in per_drafter]) for i in range(len(requests))]
