"""PagedKVCache over plain tensors, the ragged KVBatch built on it, and pool hygiene of the engine."""

from __future__ import annotations

import contextlib

import pytest
import torch

import specbeam_core
import specbeam_hf
from conftest import assert_pools_free, ragged_batch
from specbeam_core import KVCacheExhausted, PagedKVCache, build_kv_batch
from specbeam_core.kv_cache import NULL_BLOCK, NULL_SLOT

LAYERS, HEADS, DIM, BS = 2, 2, 4, 4


def make_cache(num_blocks: int = 8, block_size: int = BS) -> PagedKVCache:
    return PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_blocks=num_blocks, block_size=block_size)


def token_kv(seq_tag: int, index: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recognisable K/V for token ``index`` of a sequence tagged ``seq_tag``: [heads, dim] each."""
    base = 1000 * seq_tag + 100 * layer + index + 1
    k = torch.full((HEADS, DIM), float(base)) + torch.arange(HEADS)[:, None] * 0.25
    return k, -k


def write(cache: PagedKVCache, slots: list[int], seq_tag: int, first_index: int) -> None:
    """Write the recognisable K/V of tokens first_index.. into these flat slots, every layer."""
    for layer in range(cache.num_layers):
        for j, s in enumerate(slots):
            k, v = token_kv(seq_tag, first_index + j, layer)
            cache.keys[layer][:, s] = k
            cache.values[layer][:, s] = v


def read(cache: PagedKVCache, seq_id: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    slots = cache.read_slots(seq_id)
    return cache.keys[layer][:, slots], cache.values[layer][:, slots]  # [heads, L, dim]


def expected(seq_tags: list[int], layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked K/V for tokens whose tag is seq_tags[i] at index i: [heads, L, dim]."""
    ks, vs = zip(*(token_kv(tag, i, layer) for i, tag in enumerate(seq_tags)))
    return torch.stack(ks, dim=1), torch.stack(vs, dim=1)


def assert_holds(cache, seq_id, seq_tags):
    for layer in range(cache.num_layers):
        k, v = read(cache, seq_id, layer)
        ek, ev = expected(seq_tags, layer)
        assert torch.equal(k, ek), f"layer {layer} keys"
        assert torch.equal(v, ev), f"layer {layer} values"


# ---------------------------------------------------------------------------- PagedKVCache


def test_pool_layout_and_construction_checks():
    cache = make_cache(num_blocks=6)
    assert cache.num_usable_blocks == 5 and cache.num_free_blocks == 5
    assert cache.keys[0].shape == (HEADS, 6 * BS, DIM) and len(cache.values) == LAYERS
    with pytest.raises(ValueError, match="num_blocks"):
        make_cache(num_blocks=1)
    with pytest.raises(ValueError, match="block_size"):
        make_cache(block_size=0)


def test_layers_of_different_shapes_share_slots_copy_on_write_and_grow():
    """``layer_shapes``: each layer's pool has its own KV heads and key / value sizes (none for a layer
    that reads another's K/V); slots, copy-on-write and growth are the same in every layer."""
    shapes = [(2, 4, 4), (1, 8, 6), (0, 4, 4)]  # (kv_heads, key size, value size) per layer
    cache = PagedKVCache(num_layers=3, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=BS, layer_shapes=shapes)
    assert [(k.shape, v.shape) for k, v in zip(cache.keys, cache.values)] == [
        ((h, 4 * BS, kd), (h, 4 * BS, vd)) for h, kd, vd in shapes
    ]
    p = cache.new_sequence()
    slots = torch.tensor(cache.append_slots(p, 6))  # blocks [1, 2], block 2 holds 2 tokens
    cache.keys[1][:, slots] = torch.arange(6.0)[None, :, None].expand(1, 6, 8)
    c = cache.fork(p)
    child_slot = cache.append_slots(c, 1)[0]  # into the shared partial block: copied first, in every layer
    copied_block = cache.block_table(c)[1]
    assert child_slot == copied_block * BS + 2
    assert torch.equal(cache.keys[1][0, copied_block * BS : copied_block * BS + 2, 0], torch.tensor([4.0, 5.0]))
    cache.grow(6)
    assert [k.shape[1] for k in cache.keys] == [6 * BS] * 3 and cache.values[1].shape == (1, 6 * BS, 6)
    assert torch.equal(cache.keys[1][0, cache.read_slots(p), 0], torch.arange(6.0))
    with pytest.raises(ValueError, match="layer_shapes has 2 entries for 3 layers"):
        PagedKVCache(num_layers=3, num_kv_heads=2, head_dim=4, num_blocks=4, layer_shapes=shapes[:2])


def test_append_slots_flat_indices_and_lazy_allocation():
    cache = make_cache()
    s = cache.new_sequence()
    assert cache.block_table(s) == [] and cache.num_free_blocks == 7  # nothing allocated yet
    assert cache.append_slots(s, 3) == [4, 5, 6]  # block 1 (block 0 is the null block)
    assert cache.block_table(s) == [1] and cache.num_free_blocks == 6
    assert cache.append_slots(s, 1) == [7]  # fills block 1, no new block
    assert cache.block_table(s) == [1] and cache.num_free_blocks == 6
    assert cache.append_slots(s, 2) == [8, 9]  # next block only when needed
    assert cache.block_table(s) == [1, 2] and cache.num_free_blocks == 5
    assert cache.append_slots(s, 0) == [] and cache.num_free_blocks == 5
    assert cache.length(s) == 6
    # a second sequence gets the next free blocks; the null block is never handed out
    t = cache.new_sequence()
    assert cache.append_slots(t, 5) == [12, 13, 14, 15, 16]
    assert cache.block_table(t) == [3, 4]
    assert NULL_BLOCK not in cache.block_table(s) + cache.block_table(t)
    assert cache.ref_count(NULL_BLOCK) == 0
    assert all(cache.ref_count(b) == 1 for b in (1, 2, 3, 4))


def test_read_slots_and_contiguous_start():
    cache = make_cache()
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append_slots(a, 4)  # block 1
    cache.append_slots(b, 4)  # block 2
    cache.append_slots(a, 3)  # block 3: a = [1, 3], not contiguous
    assert cache.read_slots(a).tolist() == [4, 5, 6, 7, 12, 13, 14]
    assert cache.read_slots(a, 5).tolist() == [4, 5, 6, 7, 12]
    assert cache.read_slots(a, 0).tolist() == []
    assert cache.contiguous_start(a, 4) == 4  # first block alone is contiguous
    assert cache.contiguous_start(a, 5) is None
    assert cache.contiguous_start(a, 0) is None
    assert cache.contiguous_start(b, 4) == 8
    c = cache.new_sequence()
    cache.append_slots(c, 6)  # blocks 4, 5
    assert cache.block_table(c) == [4, 5]
    assert cache.contiguous_start(c, 6) == 16
    assert cache.read_slots(c).tolist() == list(range(16, 22))
    with pytest.raises(KeyError, match="unknown KV sequence"):
        cache.read_slots(99)


def test_fork_shares_every_block_without_copying():
    cache = make_cache()
    p = cache.new_sequence()
    write(cache, cache.append_slots(p, 6), seq_tag=1, first_index=0)
    keys_before = [k.clone() for k in cache.keys]
    free_before = cache.num_free_blocks
    c = cache.fork(p)
    assert c != p
    assert cache.block_table(c) == cache.block_table(p) == [1, 2]
    assert cache.length(c) == 6
    assert [cache.ref_count(b) for b in (1, 2)] == [2, 2]
    assert cache.num_free_blocks == free_before  # no block taken, nothing copied
    assert all(torch.equal(a, b) for a, b in zip(keys_before, cache.keys))
    assert_holds(cache, c, [1] * 6)


def test_copy_on_write_into_shared_partial_block():
    cache = make_cache()
    p = cache.new_sequence()
    write(cache, cache.append_slots(p, 6), seq_tag=1, first_index=0)  # blocks [1, 2], block 2 holds 2 tokens
    c = cache.fork(p)
    free_before = cache.num_free_blocks
    slots = cache.append_slots(c, 1)  # token 6 of the child goes into shared block 2 -> copy first
    table = cache.block_table(c)
    assert table[0] == 1 and table[1] not in (1, 2, NULL_BLOCK)
    new_block = table[1]
    assert slots == [new_block * BS + 2]
    assert cache.block_table(p) == [1, 2]
    assert cache.ref_count(1) == 2 and cache.ref_count(2) == 1 and cache.ref_count(new_block) == 1
    assert cache.num_free_blocks == free_before - 1
    write(cache, slots, seq_tag=2, first_index=6)
    # the child's copy holds the parent's first two tokens of that block, then its own token
    assert_holds(cache, c, [1] * 6 + [2])
    # the parent's data is untouched, including the slot the child would have written without CoW
    assert_holds(cache, p, [1] * 6)
    assert torch.equal(cache.keys[0][:, 2 * BS + 2], torch.zeros(HEADS, DIM))
    # the parent now owns block 2 alone: its next write goes there without a copy
    p_slots = cache.append_slots(p, 1)
    assert p_slots == [2 * BS + 2] and cache.block_table(p) == [1, 2]
    write(cache, p_slots, seq_tag=3, first_index=6)
    assert_holds(cache, p, [1] * 6 + [3])
    assert_holds(cache, c, [1] * 6 + [2])


@pytest.mark.parametrize("raises", [False, True], ids=["exits", "raises"])
def test_batched_copies_run_together_on_exit(raises, monkeypatch):
    """Copy-on-write copies of three forks (and a queued copy_slots) made inside batched_copies wait
    for the block's end and then run as one gather/scatter: every fork holds what an unbatched copy
    gives it, also when the block raises."""
    cache = make_cache(num_blocks=12)
    p = cache.new_sequence()
    write(cache, cache.append_slots(p, 6), seq_tag=1, first_index=0)  # blocks [1, 2], block 2 holds 2 tokens
    forks = [cache.fork(p) for _ in range(3)]
    calls = []
    copy_slots = cache.copy_slots
    monkeypatch.setattr(cache, "copy_slots", lambda src, dst: (calls.append(len(src)), copy_slots(src, dst)))
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with cache.batched_copies():
            slots = [cache.append_slots(c, 1) for c in forks]  # each copies block 2's two tokens first
            cache.copy_slots([2 * BS], [slots[2][0]])  # queued behind them: fork 2's token 6 := token 4
            for c in forks:  # nothing has run yet: the new blocks are still empty
                assert not cache.keys[0][:, cache.block_table(c)[1] * BS].any()
            if raises:
                raise RuntimeError("mid-batch")
    assert calls[-1] == 3 * 2 + 1  # one copy of every queued slot
    for tag, (c, s) in enumerate(zip(forks[:2], slots), start=2):
        write(cache, s, seq_tag=tag, first_index=6)
        assert_holds(cache, c, [1] * 6 + [tag])
    keys, _ = read(cache, forks[2])  # [heads, 7, dim]
    assert torch.equal(keys[:, :6], expected([1] * 6)[0]) and torch.equal(keys[:, 6], keys[:, 4])
    assert_holds(cache, p, [1] * 6)


def test_parent_write_after_fork_copies_too():
    """Whichever side writes first into the shared block gets the copy; the other keeps the original."""
    cache = make_cache()
    p = cache.new_sequence()
    write(cache, cache.append_slots(p, 3), seq_tag=1, first_index=0)
    c = cache.fork(p)
    slots = cache.append_slots(p, 2)
    assert cache.block_table(p) != [1] and cache.block_table(c) == [1]
    write(cache, slots, seq_tag=4, first_index=3)
    assert_holds(cache, p, [1, 1, 1, 4, 4])
    assert_holds(cache, c, [1, 1, 1])


def test_write_after_fork_at_block_boundary_needs_no_copy():
    cache = make_cache()
    p = cache.new_sequence()
    write(cache, cache.append_slots(p, 8), seq_tag=1, first_index=0)  # two full blocks [1, 2]
    c = cache.fork(p)
    free_before = cache.num_free_blocks
    slots = cache.append_slots(c, 3)
    assert cache.block_table(c) == [1, 2, 3]
    assert slots == [12, 13, 14]
    assert cache.num_free_blocks == free_before - 1  # just the new block, no copy
    assert [cache.ref_count(b) for b in (1, 2, 3)] == [2, 2, 1]
    write(cache, slots, seq_tag=2, first_index=8)
    assert_holds(cache, c, [1] * 8 + [2] * 3)
    assert_holds(cache, p, [1] * 8)


def test_rollback_releases_whole_blocks_and_keeps_data():
    cache = make_cache()
    s = cache.new_sequence()
    write(cache, cache.append_slots(s, 10), seq_tag=1, first_index=0)  # blocks [1, 2, 3]
    free_before = cache.num_free_blocks
    cache.rollback(s, 1)  # 9 tokens: still three blocks
    assert cache.block_table(s) == [1, 2, 3] and cache.num_free_blocks == free_before
    cache.rollback(s, 1)  # 8 tokens: block 3 falls out of use
    assert cache.block_table(s) == [1, 2] and cache.num_free_blocks == free_before + 1
    assert cache.ref_count(3) == 0
    cache.rollback(s, 5)  # 3 tokens
    assert cache.block_table(s) == [1] and cache.length(s) == 3
    assert cache.num_free_blocks == free_before + 2
    assert_holds(cache, s, [1, 1, 1])
    # new tokens continue right after the kept ones
    assert cache.append_slots(s, 2) == [7, 8]
    cache.truncate(s, 0)
    assert cache.block_table(s) == [] and cache.length(s) == 0
    assert cache.num_free_blocks == cache.num_usable_blocks


def test_rollback_of_shared_block_keeps_sibling():
    cache = make_cache()
    p = cache.new_sequence()
    write(cache, cache.append_slots(p, 7), seq_tag=1, first_index=0)
    c = cache.fork(p)
    cache.rollback(c, 4)  # child keeps 3 tokens in shared block 1, drops its hold of block 2
    assert cache.block_table(c) == [1] and cache.ref_count(1) == 2 and cache.ref_count(2) == 1
    slots = cache.append_slots(c, 2)  # into shared block 1 at offset 3 -> copy-on-write
    assert cache.block_table(c)[0] != 1
    write(cache, slots, seq_tag=2, first_index=3)
    assert_holds(cache, c, [1, 1, 1, 2, 2])
    assert_holds(cache, p, [1] * 7)


@pytest.mark.parametrize("aligned", [False, True])
def test_distinct_slot_table_lists_shared_slots_once(aligned):
    """Forks share blocks: the distinct table holds every (position, slot) pair once, and what each
    sequence holds of it is exactly its own slots at its own positions (a sibling rolled back inside
    a shared block holds only its first tokens of it)."""
    cache = make_cache(num_blocks=16)
    root = cache.new_sequence(end_aligned_at=6 if aligned else None)
    cache.append_slots(root, 6)
    forks = [cache.fork(root) for _ in range(3)]
    cache.append_slots(forks[0], 5)  # grows past the shared blocks
    cache.rollback(forks[1], 1)  # stays inside the shared block, holding one token less of it
    seqs = [root] + forks
    lengths = [cache.length(s) for s in seqs]
    slots, positions, holds = cache.distinct_slot_table(seqs, lengths)  # [U], [U], [N, U]
    assert holds.shape == (len(seqs), slots.numel())
    pairs = list(zip(slots.tolist(), positions.tolist()))
    assert len(set(pairs)) == len(pairs)  # each pair once
    for r, s in enumerate(seqs):
        own = sorted(zip(cache.read_slots(s).tolist(), range(lengths[r])))
        assert sorted(p for p, held in zip(pairs, holds[r].tolist()) if held) == own
    # the root's six and fork 0's own five, and unaligned, fork 0's copy of the two in the block it wrote into
    assert slots.numel() == cache.num_distinct_slots(seqs, lengths) == (6 + 5 if aligned else 6 + 2 + 5)
    # nothing shared: each sequence's own slots, one after another
    other = cache.new_sequence()
    cache.append_slots(other, 3)
    slots, positions, holds = cache.distinct_slot_table([forks[0], other], [11, 3])
    assert slots.tolist() == cache.read_slots(forks[0]).tolist() + cache.read_slots(other).tolist()
    assert positions.tolist() == list(range(11)) + list(range(3))
    assert holds.sum(1).tolist() == [11, 3] and cache.num_distinct_slots([forks[0], other], [11, 3]) == 14


@pytest.mark.parametrize("n", [-1, 6])
def test_rollback_out_of_range(n):
    cache = make_cache()
    s = cache.new_sequence()
    cache.append_slots(s, 5)
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(s, n)
    assert cache.length(s) == 5 and cache.block_table(s) == [1, 2]


def test_exhaustion_changes_nothing():
    cache = make_cache(num_blocks=4)  # 3 usable blocks
    s = cache.new_sequence()
    cache.append_slots(s, 6)  # 2 blocks
    free = cache.num_free_blocks
    with pytest.raises(KVCacheExhausted, match="exhausted"):
        cache.append_slots(s, 7)  # needs 2 more
    assert cache.num_free_blocks == free == 1
    assert cache.length(s) == 6 and cache.block_table(s) == [1, 2]
    # copy-on-write counts too: a fork writing into the shared partial block needs a copy + a new block
    c = cache.fork(s)
    with pytest.raises(KVCacheExhausted):
        cache.append_slots(c, 3)  # CoW copy of block 2 + one new block = 2 > 1 free
    assert cache.num_free_blocks == 1 and cache.block_table(c) == [1, 2] and cache.length(c) == 6
    assert cache.ref_count(2) == 2
    assert cache.append_slots(c, 2) != []  # CoW alone fits
    assert cache.num_free_blocks == 0


def test_free_of_forked_sequences_restores_pool():
    cache = make_cache(num_blocks=10)
    start = cache.num_free_blocks
    p = cache.new_sequence()
    cache.append_slots(p, 6)
    c1 = cache.fork(p)
    c2 = cache.fork(c1)
    cache.append_slots(c1, 5)  # CoW + new block
    cache.append_slots(c2, 1)  # CoW
    assert cache.ref_count(1) == 3
    cache.free(p)
    assert cache.ref_count(1) == 2 and cache.num_sequences == 2
    cache.free(c1)
    cache.free(c2)
    cache.free(c2)  # freeing twice is harmless
    assert_pools_free(cache)
    assert cache.num_free_blocks == start
    # the pool is reusable from the lowest block id again
    s = cache.new_sequence()
    assert cache.append_slots(s, 1) == [BS]


def test_free_all():
    cache = make_cache()
    for n in (3, 5, 8):
        cache.append_slots(cache.new_sequence(), n)
    cache.fork(0)
    cache.free_all()
    assert_pools_free(cache)


# ---------------------------------------------------------------------------- KVBatch


def test_build_kv_batch_ragged_two_rows():
    cache = make_cache(num_blocks=8)
    a, b = cache.new_sequence(), cache.new_sequence()
    write(cache, cache.append_slots(a, 3), seq_tag=1, first_index=0)  # a: 3 cached tokens, block [1]
    write(cache, cache.append_slots(b, 6), seq_tag=2, first_index=0)  # b: 6 cached tokens, blocks [2, 3]
    kv = build_kv_batch(cache, [a, b], [2, 1], torch.float32)
    assert kv.num_cached == [3, 6] and kv.num_new == [2, 1] and kv.kv_length == 7
    # row a's two tokens, then row b left-padded: its one token sits in the last column
    assert kv.write_slots.tolist() == [1 * BS + 3, 4 * BS + 0, NULL_SLOT, 3 * BS + 2]
    assert cache.length(a) == 5 and cache.length(b) == 7
    assert kv.read_start is None and kv.read_slots.shape == (2, 7)
    assert kv.positions.tolist() == [[3, 4], [0, 6]]  # cached_len + i (padding: 0)

    for layer in range(LAYERS):
        new_k = torch.zeros(2, HEADS, 2, DIM)  # [N, heads, T, dim]
        new_v = torch.zeros(2, HEADS, 2, DIM)
        for r, (tag, first, cols) in enumerate([(1, 3, [0, 1]), (2, 6, [1])]):
            for j, col in enumerate(cols):
                k, v = token_kv(tag, first + j, layer)
                new_k[r, :, col], new_v[r, :, col] = k, v
        new_k[1, :, 0] = 777.0  # padding column: must land in the null slot only
        keys, values = kv.update(layer, new_k, new_v)
        assert keys.shape == (2, HEADS, 7, DIM) and values.shape == (2, HEADS, 7, DIM)
        ek, ev = expected([1] * 5, layer)
        assert torch.equal(keys[0, :, :5], ek) and torch.equal(values[0, :, :5], ev)
        ek, ev = expected([2] * 7, layer)
        assert torch.equal(keys[1], ek) and torch.equal(values[1], ev)
    # written K/V landed in the sequences' own slots
    assert_holds(cache, a, [1] * 5)
    assert_holds(cache, b, [2] * 7)
    assert torch.equal(cache.keys[0][:, NULL_SLOT], torch.full((HEADS, DIM), 777.0))

    mask = kv.attention_mask
    low = torch.finfo(torch.float32).min
    assert mask.shape == (2, 1, 2, 7) and mask.dtype == torch.float32
    allowed = torch.tensor(
        [
            [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]],  # a: pos 3 sees 0..3; pos 4 sees 0..4; keys 5, 6 padding
            [[1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],  # b: padding query sees key 0 only; pos 6 sees 0..6
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[:, 0] == 0, allowed)
    assert torch.all(mask[:, 0][~allowed] == low)


def test_build_kv_batch_token_tree_mask_and_depths():
    """A token tree (root + two siblings) next to a one-token row: ancestor mask, depth positions, and
    keys past a row's own length hidden even where the tree mask would allow that column."""
    cache = make_cache(num_blocks=8)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append_slots(a, 3)
    cache.append_slots(b, 6)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # t0 root; t1, t2 its children
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0] = tree
    mask[1, 0, 0] = True
    depths = torch.tensor([[0, 1, 1], [0, 0, 0]])
    kv = build_kv_batch(cache, [a, b], [3, 1], torch.float32, new_token_mask=mask, new_token_depths=depths)
    assert kv.kv_length == 7
    assert kv.positions.tolist() == [[3, 4, 4], [0, 0, 6]]
    allowed = torch.tensor(
        [
            [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 0]],  # key 6: past row a's 6 tokens
            [[1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(kv.attention_mask[:, 0] == 0, allowed)
    assert torch.all(kv.attention_mask[:, 0][~allowed] == torch.finfo(torch.float32).min)


def test_build_kv_batch_single_row_contiguous_and_not():
    cache = make_cache(num_blocks=8)
    s = cache.new_sequence()
    write(cache, cache.append_slots(s, 5), seq_tag=1, first_index=0)  # blocks [1, 2]
    kv = build_kv_batch(cache, [s], [2], torch.float32)
    assert kv.read_start == BS and kv.read_slots is None
    assert kv.positions.tolist() == [[5, 6]]
    new = torch.stack(expected([1] * 7)[0][:, 5:].unbind(1), dim=1)[None]  # [1, heads, 2, dim]
    keys, _ = kv.update(0, new, -new)
    assert torch.equal(keys[0], expected([1] * 7)[0])
    # one token, one row: nothing to hide
    kv1 = build_kv_batch(cache, [s], [1], torch.float32)
    assert kv1.attention_mask is None and kv1.positions.tolist() == [[7]]
    # a forked child that copied its partial block is no longer contiguous: gathered read
    c = cache.fork(s)
    cache.rollback(c, 3)  # 5 tokens
    other = cache.new_sequence()
    cache.append_slots(other, 1)  # occupy block 3 so the CoW copy lands further away
    kv2 = build_kv_batch(cache, [c], [1], torch.float32)
    assert kv2.read_start is None
    assert kv2.read_slots[0].tolist() == cache.read_slots(c).tolist()
    k = expected([9], 0)[0][:, 0][None, :, None]  # [1, heads, 1, dim]
    keys, _ = kv2.update(0, k, -k)
    assert torch.equal(keys[0, :, :5], expected([1] * 5)[0])
    assert torch.equal(keys[0, :, 5], expected([9], 0)[0][:, 0])
    # the parent's tokens are untouched by the child's copy-on-write write
    parent_slots = cache.read_slots(s, 7)
    assert torch.equal(cache.keys[0][:, parent_slots], expected([1] * 7)[0])


def test_build_kv_batch_rolls_back_on_exhaustion():
    cache = make_cache(num_blocks=4)  # 3 usable
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append_slots(a, 3)
    cache.append_slots(b, 4)
    free = cache.num_free_blocks
    with pytest.raises(KVCacheExhausted):
        build_kv_batch(cache, [a, b], [1, 9], torch.float32)  # a fits, b needs 3 blocks
    assert cache.length(a) == 3 and cache.length(b) == 4 and cache.num_free_blocks == free
    with pytest.raises(ValueError, match="at least one token"):
        build_kv_batch(cache, [a], [0], torch.float32)


# ---------------------------------------------------------------------------- engine pools


def make_engine(pair, gamma=3):
    target, draft = pair
    drafter = specbeam_core.DraftModelDrafter(specbeam_hf.HFCausalLM(draft))
    engine = specbeam_core.SpecEngine(specbeam_hf.HFCausalLM(target), drafter, gamma)
    return engine, drafter


def prompts_of(lengths, seed):
    ids, mask = ragged_batch(lengths, seed=seed)
    return [ids[r][mask[r].bool()].tolist() for r in range(len(lengths))], ids, mask


def test_engine_generate_frees_pools_and_is_exact(llama_pair):
    engine, drafter = make_engine(llama_pair)
    prompts, ids, mask = prompts_of([5, 8], seed=31)
    out = engine.generate(prompts, max_new_tokens=12)
    ref = llama_pair[0].generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for r, req in enumerate(out):
        assert req.finish_reason == "length"
        assert req.output == ref[r, ids.shape[1] :].tolist()
    assert engine.stats.drafted > 0
    assert not engine.has_unfinished
    assert_pools_free(engine.target_cache, drafter.cache)


def test_engine_abort_mid_run_frees_pools(llama_pair):
    engine, drafter = make_engine(llama_pair)
    prompts, ids, mask = prompts_of([6, 4], seed=32)
    r1, r2 = (engine.make_request(p, max_new_tokens=15) for p in prompts)
    engine.reserve([r1, r2])
    engine.add(r1)
    engine.add(r2)
    engine.step()
    engine.step()
    assert engine.target_cache.num_sequences == 2 and drafter.cache.num_sequences == 2
    assert engine.target_cache.num_free_blocks < engine.target_cache.num_usable_blocks
    engine.abort(r1)
    assert r1.finish_reason == "abort"
    assert engine.target_cache.num_sequences == 1 and drafter.cache.num_sequences == 1
    while engine.has_unfinished:
        engine.step()
    assert r2.finish_reason == "length" and r2.num_generated == 15
    ref = llama_pair[0].generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=15, do_sample=False)
    assert r2.output == ref[0, len(prompts[1]) :].tolist()
    assert_pools_free(engine.target_cache, drafter.cache)


def test_engine_exception_mid_generate_frees_pools(llama_pair):
    engine, drafter = make_engine(llama_pair)
    prompts, _, _ = prompts_of([5, 7], seed=33)
    calls = []

    def on_tokens(request, tokens):
        calls.append(tokens)
        if len(calls) > 1:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        engine.generate(prompts, max_new_tokens=20, on_tokens=on_tokens)
    assert len(calls) == 2
    assert engine.target_cache.num_sequences == 0  # the failing run left nothing behind
    assert_pools_free(engine.target_cache, drafter.cache)
    assert not engine.has_unfinished
    # and the engine still works afterwards
    out = engine.generate(prompts, max_new_tokens=4)
    assert all(r.num_generated == 4 for r in out)
    assert_pools_free(engine.target_cache, drafter.cache)


def test_engine_add_without_reserve_sizes_pool_for_all_requests(llama_pair):
    """Requests added one by one with ``engine.add`` (no explicit ``reserve``) must fit the pools.

    Regression (was a library bug): ``SpecEngine.add`` (specbeam_core/engine.py, ``add``)
    calls ``self.reserve([request])`` for the first request only, sizing the target pool (and the
    drafter's) for ONE request; a second added request then runs the pool dry mid-run and ``step``
    raises ``KVCacheExhausted`` (here: 3 usable blocks of 16 for two 6 + 20 token requests).
    """
    engine, drafter = make_engine(llama_pair, gamma=4)
    prompt = [5, 6, 7, 8, 9, 10]
    requests = [engine.make_request(prompt, max_new_tokens=20) for _ in range(2)]
    for r in requests:
        engine.add(r)
    try:
        while engine.has_unfinished:
            engine.step()
    finally:
        for r in requests:
            engine.abort(r)
    ref = llama_pair[0].generate(input_ids=torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert all(r.output == ref[0, len(prompt) :].tolist() for r in requests)
    assert_pools_free(engine.target_cache, drafter.cache)
