"""Which KV sequences of a paged pool hold which token prefixes (the beam search's and the tree
drafters' bookkeeping: a key is a prompt index and the tokens generated after it)."""

from __future__ import annotations

from typing import Sequence

from .kv_cache import PagedKVCache

Key = tuple[int, tuple[int, ...]]  # (prompt index, generated tokens)


class PrefixIndex:
    """Which KV sequences of one pool hold which token prefixes.

    ``seqs[key] = (seq_id, length)``: the sequence's first ``length`` tokens are the prompt followed by
    ``key``'s generated tokens. ``nodes[key] = slot``: the K/V of ``key``'s last token sits at this
    flat slot (a tree node written after its root's tokens); its parent is ``key`` minus that token.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.seqs: dict[Key, tuple[int, int]] = {}
        self.nodes: dict[Key, int] = {}

    def materialize_all(self, keys: Sequence[Key], prompts: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
        """:meth:`materialize` for every key, the copies (tree-node K/V, copy-on-write) of all of them run
        together. Their sources are slots of this index's sequences, held until :meth:`replace`; their
        destinations lie in the new sequences' own blocks, which nothing else holds: no copy reads
        another's destination."""
        with self.cache.batched_copies():
            return [self.materialize(k, p) for k, p in zip(keys, prompts)]

    def materialize(self, key: Key, prompt: Sequence[int]) -> tuple[int, list[int]]:
        """A new sequence holding the longest known prefix of ``key``; returns it and the tokens it still
        lacks (the tree-node K/V on its path is copied into its own blocks, never recomputed)."""
        b, gen = key
        for i in range(len(gen), -1, -1):
            prefix = (b, gen[:i])
            if prefix in self.seqs or prefix in self.nodes:
                break
        else:  # the prompt ends a block, so beams forked from it never copy its last block
            return self.cache.new_sequence(end_aligned_at=len(prompt)), list(prompt) + list(gen)
        path_slots = []
        while prefix in self.nodes:
            path_slots.append(self.nodes[prefix])
            prefix = (b, prefix[1][:-1])
        base, length = self.seqs[prefix]
        seq = self.cache.fork(base)
        self.cache.truncate(seq, length)
        if path_slots:
            self.cache.copy_slots(path_slots[::-1], self.cache.append_slots(seq, len(path_slots)))
        return seq, list(gen[i:])

    def replace(self, seqs: dict[Key, tuple[int, int]], nodes: dict[Key, int]) -> None:
        """Adopt the new pass's sequences and nodes; release every old sequence."""
        for seq, _ in self.seqs.values():
            self.cache.free(seq)
        self.seqs, self.nodes = seqs, nodes

    def clear(self) -> None:
        self.replace({}, {})


def blocks_needed(cache: PagedKVCache, tokens: int) -> int:
    return -(-tokens // cache.block_size) + 2  # + a copied-on-write block + a partly filled one
