"""The draft side of speculative beam search: a draft-model beam search that grows one token tree
per running target beam (:class:`BeamTreeDrafter`), and one draft forward over ragged feeds
(:func:`draft_log_probs`, also the tree drafters')."""

from __future__ import annotations

from typing import Sequence

import torch

from .kv_cache import PagedKVCache
from .model import CausalLM, build_kv_batch, left_pad
from .prefix_index import Key, PrefixIndex, blocks_needed
from .sampling import check_finite
from .tree import TokenTree


def draft_log_probs(model: CausalLM, cache: PagedKVCache, seqs: list[int], feeds: list[list[int]]) -> torch.Tensor:
    """One draft forward over ragged feeds (the pool grows if it must); log-probs after each row's
    last token ``[N, vocab]``."""
    cache.ensure_free(sum(blocks_needed(cache, len(f)) for f in feeds))
    tokens = left_pad(feeds)  # [N, T]
    kv = build_kv_batch(cache, seqs, [len(f) for f in feeds], cache.dtype)
    logits = model.forward(tokens, kv, 1)[:, 0]  # [N, vocab]
    check_finite(logits, "draft model logits")
    return torch.log_softmax(logits, dim=-1)


class BeamTreeDrafter:
    """Draft-model beam search that grows one token tree per running target beam."""

    name = "draft_beam_tree"

    def __init__(self, model: CausalLM, block_size: int = 16) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_positions = model.max_positions
        self.cache = model.make_cache(64, block_size)
        self.index = PrefixIndex(self.cache)
        self.log_probs: dict[Key, torch.Tensor] = {}  # draft log-probs after every kept state [vocab]
        self.forward_count = 0
        # the last pass's candidates: per level, per prompt, the keys of its tree nodes, best draft score first
        self.last_levels: list[dict[int, list[Key]]] = []

    def _forward(self, seqs: list[int], feeds: list[list[int]]) -> torch.Tensor:
        self.forward_count += 1
        return draft_log_probs(self.model, self.cache, seqs, feeds)

    def trees(
        self,
        roots: list[Key],
        root_scores: list[float],
        prompts: Sequence[Sequence[int]],
        *,
        depth: int,
        tree_width: int,
        num_beams: int,
        eos_token_ids: frozenset[int],
    ) -> list[TokenTree]:
        trees = [TokenTree() for _ in roots]
        new_seqs: dict[Key, tuple[int, int]] = {}
        new_log_probs: dict[Key, torch.Tensor] = {}

        # root states: reuse the draft K/V (and log-probs) of the last pass, feed the rest
        seqs, feeds = zip(*self.index.materialize_all(roots, [prompts[k[0]] for k in roots]))
        fed = [i for i, f in enumerate(feeds) if f]
        log_probs = [self.log_probs.get(k) for k in roots]
        if fed:
            out = self._forward([seqs[i] for i in fed], [feeds[i] for i in fed])  # [n, vocab]
            for j, i in enumerate(fed):
                log_probs[i] = out[j]
        for i, k in enumerate(roots):
            new_seqs[k] = (seqs[i], len(prompts[k[0]]) + len(k[1]))
            new_log_probs[k] = log_probs[i]

        # frontier entries: (root index, node index or -1, key, draft sequence, log-probs, score)
        frontier = [(i, -1, k, seqs[i], log_probs[i], root_scores[i]) for i, k in enumerate(roots)]
        self.last_levels = []
        for level in range(depth):
            chosen = []  # (frontier entry, token, node, key, score), best first per prompt
            self.last_levels.append({})
            by_prompt: dict[int, list] = {}
            for f in frontier:
                by_prompt.setdefault(f[2][0], []).append(f)
            for b, entries in by_prompt.items():
                scores = torch.stack([f[5] + f[4] for f in entries])  # [F, vocab]
                k = min(tree_width, scores.numel())
                top_scores, top_idx = torch.topk(scores.reshape(-1), k)  # [k]
                for score, flat in zip(top_scores.tolist(), top_idx.tolist()):
                    f = entries[flat // self.vocab_size]
                    token = flat % self.vocab_size
                    node = trees[f[0]].add(token, f[1])
                    chosen.append((f, token, node, (b, f[2][1] + (token,)), score))
                self.last_levels[-1][b] = [c[3] for c in chosen[len(chosen) - k :]]
            if level == depth - 1:
                break
            expand, per_prompt = [], {}
            for c in chosen:
                b = c[3][0]
                if c[1] not in eos_token_ids and per_prompt.get(b, 0) < num_beams:
                    per_prompt[b] = per_prompt.get(b, 0) + 1
                    expand.append(c)
            if not expand:
                break
            child_seqs = [self.cache.fork(c[0][3]) for c in expand]
            out = self._forward(child_seqs, [[c[1]] for c in expand])  # [n, vocab]
            frontier = []
            for j, (f, _token, node, key, score) in enumerate(expand):
                frontier.append((f[0], node, key, child_seqs[j], out[j], score))
                new_seqs[key] = (child_seqs[j], len(prompts[key[0]]) + len(key[1]))
                new_log_probs[key] = out[j]
        self.index.replace(new_seqs, {})
        self.log_probs = new_log_probs
        return trees

    def clear(self) -> None:
        self.index.clear()
        self.log_probs = {}
        self.last_levels = []
