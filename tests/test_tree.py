"""TokenTree on hand-built trees, and one target forward over a token tree on the paged cache.

The forward checks compare the logits at every tree node with a plain HF forward of the prompt
followed by that node's root-to-node path: exactly what speculative beam search relies on.
"""

from __future__ import annotations

import random

import pytest
import torch

import specbeam_hf
from conftest import build_model
from specbeam_core import PagedKVCache, TokenTree, build_kv_batch

#            root
#          /   |    \
#        0:10 1:11  6:16
#        /  \    \
#    2:12  3:12  4:10
#      |
#    5:15
# Same tokens on different branches (12 twice under node 0, 10 at depths 1 and 2) so that a mask or
# position mistake cannot go unnoticed; node 6 (a root child) comes after deeper nodes.
TOKENS = [10, 11, 12, 12, 10, 15, 16]
PARENTS = [-1, -1, 0, 0, 1, 2, -1]


def hand_tree() -> TokenTree:
    return TokenTree(tokens=list(TOKENS), parents=list(PARENTS))


def random_tree(n: int, seed: int) -> TokenTree:
    rng = random.Random(seed)
    tree = TokenTree()
    for i in range(n):
        tree.add(rng.randrange(3, 90), rng.randrange(-1, i) if i else -1)
    return tree


def subtree(tree: TokenTree, node: int) -> set[int]:
    out, stack = set(), [node]
    while stack:
        x = stack.pop()
        out.add(x)
        stack.extend(tree.children(x))
    return out


def token_paths(tree: TokenTree) -> list[tuple[int, ...]]:
    return sorted(tuple(tree.tokens[i] for i in p) for p in tree.paths())


# ---------------------------------------------------------------------------- structure


def test_depths_paths_and_children():
    tree = hand_tree()
    assert len(tree) == 7
    assert tree.depths == [1, 1, 2, 2, 2, 3, 1]
    assert tree.path(5) == [0, 2, 5]
    assert tree.path(4) == [1, 4]
    assert tree.path(6) == [6]
    assert tree.path(0) == [0]
    assert tree.path_tokens(5) == (10, 12, 15)
    assert tree.path_tokens(3) == (10, 12)
    assert tree.path_tokens(4) == (11, 10)
    assert tree.children(-1) == [0, 1, 6]
    assert tree.children(0) == [2, 3]
    assert tree.children(5) == []
    assert tree.leaves() == [3, 4, 5, 6]
    assert sorted(tree.paths()) == sorted([[0, 3], [1, 4], [0, 2, 5], [6]])
    # every path starts at a root child, follows parent links and ends at a leaf
    for p in tree.paths():
        assert tree.parents[p[0]] == -1
        assert all(tree.parents[b] == a for a, b in zip(p, p[1:]))
        assert tree.children(p[-1]) == []
    # every root-to-leaf path exactly once: one per leaf
    assert [p[-1] for p in tree.paths()] == tree.leaves()


def test_add_builds_the_same_tree():
    tree = TokenTree()
    for i, (t, p) in enumerate(zip(TOKENS, PARENTS)):
        assert tree.add(t, p) == i
    assert tree.tokens == TOKENS and tree.parents == PARENTS
    assert tree.depths == hand_tree().depths
    assert tree.add(7) == 7 and tree.parents[7] == -1 and tree.depths[7] == 1  # default parent: the root


def test_empty_tree():
    tree = TokenTree()
    assert len(tree) == 0 and tree.depths == [] and tree.leaves() == [] and tree.paths() == []
    assert tree.ancestor_mask().shape == (0, 0)
    assert torch.equal(tree.row_mask(3), torch.ones(3, 3, dtype=torch.bool).tril())
    assert tree.row_depths(3).tolist() == [0, 1, 2]
    assert len(tree.depth_first()) == 0


def test_ancestor_mask_exact():
    expected = torch.tensor(
        [
            # 0  1  2  3  4  5  6
            [1, 0, 0, 0, 0, 0, 0],  # 0
            [0, 1, 0, 0, 0, 0, 0],  # 1
            [1, 0, 1, 0, 0, 0, 0],  # 2: 0
            [1, 0, 0, 1, 0, 0, 0],  # 3: 0 (not its sibling 2)
            [0, 1, 0, 0, 1, 0, 0],  # 4: 1
            [1, 0, 1, 0, 0, 1, 0],  # 5: 0, 2
            [0, 0, 0, 0, 0, 0, 1],  # 6
        ],
        dtype=torch.bool,
    )
    mask = hand_tree().ancestor_mask()
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("seed", range(4))
def test_ancestor_mask_matches_paths_on_random_trees(seed):
    tree = random_tree(25, seed)
    mask = tree.ancestor_mask()
    for i in range(len(tree)):
        assert set(torch.nonzero(mask[i]).reshape(-1).tolist()) == set(tree.path(i))


@pytest.mark.parametrize("num_unseen", [0, 1, 3])
def test_row_mask(num_unseen):
    tree = hand_tree()
    u, n = num_unseen, len(tree)
    mask = tree.row_mask(u)
    assert mask.shape == (u + n, u + n) and mask.dtype == torch.bool
    for q in range(u + n):
        for k in range(u + n):
            if q < u:  # unseen tokens: a causal chain, never a tree node
                allowed = k <= q
            elif k < u:  # nodes see every unseen token
                allowed = True
            else:  # ... and among nodes only their ancestors and themselves
                allowed = (k - u) in tree.path(q - u)
            assert bool(mask[q, k]) == allowed, (q, k)
    assert torch.equal(mask[u:, u:], tree.ancestor_mask())


@pytest.mark.parametrize("num_unseen", [0, 1, 3])
def test_row_depths(num_unseen):
    tree = hand_tree()
    depths = tree.row_depths(num_unseen)
    assert depths.dtype == torch.long
    u = num_unseen
    assert depths.tolist() == list(range(u)) + [u - 1 + d for d in [1, 1, 2, 2, 2, 3, 1]]


def _check_depth_first(tree: TokenTree) -> TokenTree:
    flat = tree.depth_first()
    assert len(flat) == len(tree)
    assert sorted(flat.tokens) == sorted(tree.tokens)
    # parents before children (also validated by TokenTree itself)
    assert all(p < i for i, p in enumerate(flat.parents))
    # every subtree occupies a contiguous index range starting at its root
    for node in range(len(flat)):
        sub = subtree(flat, node)
        assert sub == set(range(node, node + len(sub))), node
    # the same root-to-leaf token paths (as a multiset) and the same depth profile
    assert token_paths(flat) == token_paths(tree)
    assert sorted(flat.depths) == sorted(tree.depths)
    return flat


def test_depth_first_hand_tree():
    flat = _check_depth_first(hand_tree())
    # order: 0, 2, 5, 3, 1, 4, 6 (siblings keep their order)
    assert flat.tokens == [10, 12, 15, 12, 11, 10, 16]
    assert flat.parents == [-1, 0, 1, 0, -1, 4, -1]
    assert flat.depths == [1, 2, 3, 2, 1, 2, 1]
    assert flat.depth_first().tokens == flat.tokens and flat.depth_first().parents == flat.parents


@pytest.mark.parametrize("seed", range(6))
def test_depth_first_random_trees(seed):
    tree = random_tree(30, seed)
    assert any(  # the random tree is not depth-first already (otherwise the test proves little)
        subtree(tree, v) != set(range(v, v + len(subtree(tree, v)))) for v in range(len(tree))
    )
    _check_depth_first(tree)


@pytest.mark.parametrize(
    "tokens, parents",
    [
        ([1, 2], [-1]),  # fewer parents than tokens
        ([1], [-1, 0]),  # more parents than tokens
        ([1, 2], [1, -1]),  # parent after its child
        ([1, 2], [-1, 1]),  # own parent
        ([1], [0]),  # own parent at index 0
        ([1, 2], [-1, -2]),  # below -1
        ([1, 2, 3], [-1, 0, 5]),  # not a node
    ],
)
def test_invalid_trees(tokens, parents):
    with pytest.raises(ValueError):
        TokenTree(tokens=tokens, parents=parents)


@pytest.mark.parametrize("parent", [-2, 7, 8, 100])
def test_add_with_bad_parent(parent):
    tree = hand_tree()
    with pytest.raises(ValueError, match="parent"):
        tree.add(5, parent)
    assert tree.tokens == TOKENS and tree.parents == PARENTS  # nothing appended


# ---------------------------------------------------------------------------- target forward over a tree


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


PROMPT = [5, 17, 33, 8, 61, 22, 40]  # crosses a block boundary with block_size 4
OTHER_PROMPT = [9, 70, 14, 3, 55]


def plain_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()  # [vocab]


def feed_chain(lm, cache, seq, tokens: list[int]) -> torch.Tensor:
    kv = build_kv_batch(cache, [seq], [len(tokens)], cache.dtype)
    return lm.forward(torch.tensor([tokens]), kv, len(tokens))[0]  # [T, vocab]


def tree_row(tree: TokenTree, unseen: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    u = len(unseen)
    return unseen + tree.tokens, tree.row_mask(u), tree.row_depths(u)


@pytest.mark.parametrize("num_unseen", [0, 1, 3])
@pytest.mark.parametrize("depth_first", [False, True])
def test_tree_forward_logits_match_plain_forward(llama, num_unseen, depth_first):
    """Logits at every node = plain HF forward of prompt + the node's root-to-node path."""
    lm = specbeam_hf.HFCausalLM(llama)
    cache = lm.make_cache(16, 4)
    seq = cache.new_sequence()
    cached = PROMPT[: len(PROMPT) - num_unseen]
    unseen = PROMPT[len(PROMPT) - num_unseen :]
    feed_chain(lm, cache, seq, cached)
    tree = hand_tree().depth_first() if depth_first else hand_tree()
    feed, mask, depths = tree_row(tree, unseen)
    kv = build_kv_batch(cache, [seq], [len(feed)], cache.dtype, new_token_mask=mask[None], new_token_depths=depths[None])
    assert kv.positions[0].tolist() == [len(cached) + d for d in depths.tolist()]
    logits = lm.forward(torch.tensor([feed]), kv, len(feed))[0]  # [u + n, vocab]
    assert cache.length(seq) == len(cached) + len(feed)
    for j in range(num_unseen):
        torch.testing.assert_close(logits[j], plain_logits(llama, PROMPT[: len(cached) + j + 1]), atol=1e-5, rtol=0)
    for node in range(len(tree)):
        expected = plain_logits(llama, PROMPT + list(tree.path_tokens(node)))
        torch.testing.assert_close(logits[num_unseen + node], expected, atol=1e-5, rtol=0, msg=f"node {node}")
    # the check has teeth: a node's logits differ from those of the same tokens fed as a chain
    chain = PROMPT + tree.tokens[: 4]
    assert not torch.allclose(logits[num_unseen + 3], plain_logits(llama, chain), atol=1e-3)


def test_ragged_batch_tree_row_and_chain_row(llama):
    """One forward over two sequences: a tree after one unseen token, and a plain 3-token chain."""
    lm = specbeam_hf.HFCausalLM(llama)
    cache = lm.make_cache(16, 4)
    a, b = cache.new_sequence(), cache.new_sequence()
    feed_chain(lm, cache, a, PROMPT[:-1])
    feed_chain(lm, cache, b, OTHER_PROMPT)
    chain = [44, 12, 80]
    tree = hand_tree()
    feed_a, mask_a, depths_a = tree_row(tree, PROMPT[-1:])
    t = max(len(feed_a), len(chain))
    masks = torch.zeros(2, t, t, dtype=torch.bool)  # [N, T, T] each row's own order
    depths = torch.zeros(2, t, dtype=torch.long)  # [N, T]
    masks[0, : len(feed_a), : len(feed_a)] = mask_a
    depths[0, : len(feed_a)] = depths_a
    masks[1, : len(chain), : len(chain)] = torch.ones(len(chain), len(chain), dtype=torch.bool).tril()
    depths[1, : len(chain)] = torch.arange(len(chain))
    tokens = torch.zeros(2, t, dtype=torch.long)  # left-padded
    tokens[0, t - len(feed_a) :] = torch.tensor(feed_a)
    tokens[1, t - len(chain) :] = torch.tensor(chain)
    kv = build_kv_batch(cache, [a, b], [len(feed_a), len(chain)], cache.dtype, new_token_mask=masks, new_token_depths=depths)
    logits = lm.forward(tokens, kv, t)  # [2, T, vocab]
    torch.testing.assert_close(logits[0, t - len(feed_a)], plain_logits(llama, PROMPT), atol=1e-5, rtol=0)
    for node in range(len(tree)):
        expected = plain_logits(llama, PROMPT + list(tree.path_tokens(node)))
        torch.testing.assert_close(logits[0, t - len(tree) + node], expected, atol=1e-5, rtol=0, msg=f"node {node}")
    for j in range(len(chain)):
        expected = plain_logits(llama, OTHER_PROMPT + chain[: j + 1])
        torch.testing.assert_close(logits[1, t - len(chain) + j], expected, atol=1e-5, rtol=0, msg=f"chain {j}")
    assert cache.length(a) == len(PROMPT) - 1 + len(feed_a) and cache.length(b) == len(OTHER_PROMPT) + len(chain)


def test_accepted_path_moved_by_copy_slots_then_grow(llama):
    """Keep one root-to-node path of a scored tree (its K/V moved with copy_slots, as the beam search
    does), grow the pool, and continue: the next logits are those of prompt + path + token."""
    lm = specbeam_hf.HFCausalLM(llama)
    cache = lm.make_cache(12, 4)
    seq = cache.new_sequence()
    feed_chain(lm, cache, seq, PROMPT[:-1])
    tree = hand_tree()
    feed, mask, depths = tree_row(tree, PROMPT[-1:])
    kv = build_kv_batch(cache, [seq], [len(feed)], cache.dtype, new_token_mask=mask[None], new_token_depths=depths[None])
    lm.forward(torch.tensor([feed]), kv, 1)
    node_slots = kv.write_slots.tolist()[-len(tree) :]
    path = tree.path(5)  # nodes 0, 2, 5: not contiguous in the tree's order
    holder = cache.fork(seq)  # keeps the tree's blocks alive while the path is moved
    cache.truncate(seq, len(PROMPT))
    dst = cache.append_slots(seq, len(path))
    cache.copy_slots([node_slots[i] for i in path], dst)
    cache.free(holder)
    table, length = cache.block_table(seq), cache.length(seq)
    keys = [k[:, cache.read_slots(seq)].clone() for k in cache.keys]
    cache.grow(cache.num_blocks + 5)
    assert cache.block_table(seq) == table and cache.length(seq) == length
    assert all(torch.equal(k[:, cache.read_slots(seq)], old) for k, old in zip(cache.keys, keys))
    nxt = [27, 3]
    logits = feed_chain(lm, cache, seq, nxt)
    history = PROMPT + list(tree.path_tokens(5))
    for j in range(len(nxt)):
        torch.testing.assert_close(logits[j], plain_logits(llama, history + nxt[: j + 1]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- copy_slots / grow

LAYERS, HEADS, DIM, BS = 2, 2, 3, 4


def small_cache(num_blocks: int = 6) -> PagedKVCache:
    return PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_blocks=num_blocks, block_size=BS)


def fill_random(cache: PagedKVCache, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for tensors in (cache.keys, cache.values):
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=gen))


def test_copy_slots_moves_keys_and_values_in_every_layer():
    cache = small_cache()
    fill_random(cache)
    keys = [k.clone() for k in cache.keys]
    values = [v.clone() for v in cache.values]
    src, dst = [5, 9, 6, 17], [12, 13, 22, 4]  # out of order, across blocks, one dst below its src
    cache.copy_slots(src, dst)
    others = [s for s in range(cache.num_blocks * BS) if s not in dst]
    for layer in range(LAYERS):
        for s, d in zip(src, dst):
            assert torch.equal(cache.keys[layer][:, d], keys[layer][:, s])
            assert torch.equal(cache.values[layer][:, d], values[layer][:, s])
        assert torch.equal(cache.keys[layer][:, others], keys[layer][:, others])  # sources and the rest untouched
        assert torch.equal(cache.values[layer][:, others], values[layer][:, others])
        assert not torch.equal(cache.keys[layer], keys[layer])
    snapshot = [k.clone() for k in cache.keys]
    cache.copy_slots([], [])
    assert all(torch.equal(a, b) for a, b in zip(cache.keys, snapshot))


def test_grow_keeps_contents_and_block_ids():
    cache = small_cache(num_blocks=6)
    fill_random(cache, seed=1)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append_slots(a, 6)
    cache.append_slots(b, 3)
    c = cache.fork(a)
    cache.append_slots(c, 1)  # copy-on-write of a's partial block
    live = {s: (cache.block_table(s), cache.length(s)) for s in (a, b, c)}
    data = {s: ([k[:, cache.read_slots(s)].clone() for k in cache.keys], [v[:, cache.read_slots(s)].clone() for v in cache.values]) for s in live}
    refs = [cache.ref_count(i) for i in range(cache.num_blocks)]
    free_before = cache.num_free_blocks
    cache.grow(10)
    assert cache.num_blocks == 10 and cache.num_usable_blocks == 9
    assert cache.num_free_blocks == free_before + 4
    assert cache.keys[0].shape == (HEADS, 10 * BS, DIM) and cache.values[1].shape == (HEADS, 10 * BS, DIM)
    assert [cache.ref_count(i) for i in range(6)] == refs and all(cache.ref_count(i) == 0 for i in range(6, 10))
    for s, (table, length) in live.items():
        assert cache.block_table(s) == table and cache.length(s) == length
        ks, vs = data[s]
        slots = cache.read_slots(s)
        assert all(torch.equal(k[:, slots], old) for k, old in zip(cache.keys, ks))
        assert all(torch.equal(v[:, slots], old) for v, old in zip(cache.values, vs))
    cache.grow(7)  # smaller: nothing changes
    assert cache.num_blocks == 10
    # the one old free block (5) is handed out before the new (highest) ids
    d = cache.new_sequence()
    cache.append_slots(d, 2 * BS)
    assert cache.block_table(d) == [5, 6]
    cache.free_all()
    assert cache.num_free_blocks == cache.num_usable_blocks


def test_ensure_free_grows_just_enough():
    cache = small_cache(num_blocks=4)
    s = cache.new_sequence()
    cache.append_slots(s, 2 * BS)  # 2 of 3 usable blocks
    assert cache.num_free_blocks == 1
    cache.ensure_free(1)
    assert cache.num_blocks == 4
    cache.ensure_free(5)
    assert cache.num_free_blocks == 5 and cache.num_blocks == 8
    assert cache.block_table(s) == [1, 2]
