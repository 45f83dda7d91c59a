"""Verification of token trees against one target forward.

Terminology as in :mod:`specbeam_core.verification`; for trees:

- the **root** is the request's current state; ``p[0]`` is the target distribution there and
  ``p[1 + i]`` the one after node ``i``'s root-to-node path (``[n + 1, vocab]`` in all);
- **accepted** nodes form one root-to-node path; the **recovered** token replaces the first
  rejected level, the **bonus** token follows a path that ends at a leaf.

Greedy: walk from the root along the target's argmax while a child holds it.

Sampling (multi-candidate speculative sampling, SpecInfer's multi-step speculative sampling; the
*beam-corrected fallback*): at a node, its children are tried in turn, each against the **updated
residual**: a child ``x`` is accepted with probability ``min(1, p(x) / q(x))``; on rejection
``p ← normalise(max(0, p − q))`` and the next sibling is tried. When every child is rejected the
recovered token is drawn from the final residual. Children here are the draft's deterministic
choices (top-w expansions), so ``q`` is one-hot on the child: acceptance is ``p(x)`` and the
residual is ``p`` with ``x`` removed, renormalised. The output follows ``p`` exactly whatever the
tree is (the statistical tests show it, and show that skipping the residual update breaks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample
from .tree import TokenTree


@dataclass
class TreeVerifyResult:
    accepted_nodes: list[int]  # node indices of the accepted root-to-node path
    output_tokens: list[int]  # accepted tokens, then the recovered or bonus token
    bonus: bool  # the path reached a leaf: the last token is a bonus token


def _children(tree: TokenTree) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(i)
    return children


def verify_tree_greedy(tree: TokenTree, target_logits: torch.Tensor) -> TreeVerifyResult:
    """``target_logits`` ``[n + 1, vocab]``: the longest path along the target's argmax, then its next token."""
    argmax = target_logits.argmax(dim=-1).tolist()  # [n + 1]
    children = _children(tree)
    node, path = -1, []
    while True:
        want = argmax[node + 1]
        nxt = next((c for c in children.get(node, []) if tree.tokens[c] == want), None)
        if nxt is None:
            return TreeVerifyResult(path, [tree.tokens[i] for i in path] + [want], node not in children)
        path.append(nxt)
        node = nxt


def verify_tree_rejection_sampling(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [n + 1, vocab]
    generator: torch.Generator | None,
    *,
    update_residual: bool = True,
) -> TreeVerifyResult:
    """Exact: the emitted tokens follow the target distribution. ``update_residual=False`` is the
    classic mistake (siblings tried against the unchanged ``p``); it exists so tests can show that
    the statistical test catches it."""
    children = _children(tree)
    node, path = -1, []
    while True:
        p = target_probs[node + 1].clone()  # [vocab]
        kids = children.get(node, [])
        accepted = None
        for child in kids:
            token = tree.tokens[child]
            if float(torch.rand((), generator=generator)) < float(p[token]):
                accepted = child
                break
            if update_residual:
                p[token] = 0.0
                total = p.sum()
                if not total > 0:  # p was one-hot on a rejected child: only rounding can get here
                    p = target_probs[node + 1].clone()
                    break
                p /= total
        if accepted is None:
            last = int(sample(p[None], generator))
            return TreeVerifyResult(path, [tree.tokens[i] for i in path] + [last], not kids)
        path.append(accepted)
        node = accepted
