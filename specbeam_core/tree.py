"""Token trees: candidate continuations of one sequence, scored by one target forward.

A tree is a trie stored flat, **parents before children**. Node ``i`` holds ``tokens[i]``;
``parents[i]`` is its parent node, or ``-1`` for a child of the root. The root is the sequence's
current state (its last token), not a node. In a forward, the nodes follow the row's *unseen*
tokens (tokens of the sequence whose K/V is not cached yet, at least the last one unless the root
state's logits are already known):

- position of node ``i`` = ``cached + num_unseen - 1 + depth[i]`` (``depth`` is 1 for root children);
- node ``i`` attends to the cached sequence, every unseen token and its own ancestors
  (:meth:`row_mask`), so one forward gives the logits after every root-to-node path at once.

After verification only the accepted path's K/V is kept (moved into the sequence's own blocks by
the caller); the rest of the tree is rolled back or released with its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"a token tree needs one parent per token: {len(self.tokens)} tokens, {len(self.parents)} parents"
            )
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before their children (-1 = root)")

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int = -1) -> int:
        """Append a node under ``parent`` (-1: the root); returns its index."""
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a node of this tree ({len(self.tokens)} nodes)")
        self.tokens.append(int(token))
        self.parents.append(parent)
        return len(self.tokens) - 1

    @property
    def depths(self) -> list[int]:
        """Depth of every node (1 for children of the root)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def path_tokens(self, node: int) -> tuple[int, ...]:
        return tuple(self.tokens[i] for i in self.path(node))

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def leaves(self) -> list[int]:
        has_child = set(self.parents)
        return [i for i in range(len(self)) if i not in has_child]

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path, as node indices."""
        return [self.path(leaf) for leaf in self.leaves()]

    def depth_first(self) -> "TokenTree":
        """The same tree flattened depth-first (each subtree contiguous; siblings keep their order)."""
        order: list[int] = []
        stack = self.children(-1)[::-1]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(self.children(node)[::-1])
        new_index = {old: new for new, old in enumerate(order)}
        return TokenTree(
            tokens=[self.tokens[i] for i in order],
            parents=[-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in order],
        )

    def ancestor_mask(self) -> torch.Tensor:
        """``[n, n]`` bool: node ``i`` may attend to node ``j`` iff ``j`` is ``i`` or one of its ancestors."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)  # [n, n]
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def row_mask(self, num_unseen: int) -> torch.Tensor:
        """``[u + n, u + n]`` bool over a row that feeds ``u`` unseen tokens (a chain) then the nodes."""
        u, n = num_unseen, len(self)
        mask = torch.zeros(u + n, u + n, dtype=torch.bool)  # [u + n, u + n]
        mask[:u, :u] = torch.ones(u, u, dtype=torch.bool).tril()
        mask[u:, :u] = True
        mask[u:, u:] = self.ancestor_mask()
        return mask

    def row_depths(self, num_unseen: int) -> torch.Tensor:
        """``[u + n]`` position offsets from the row's first new token (unseen tokens, then nodes)."""
        return torch.tensor(list(range(num_unseen)) + [num_unseen - 1 + d for d in self.depths], dtype=torch.long)
