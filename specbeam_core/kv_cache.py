"""Paged KV cache over plain tensors.

Terminology (as in vLLM's paged attention):

- **block**: ``block_size`` consecutive token slots, for every layer at once.
- **slot**: one token's K/V in one block; flat slot index = ``block * block_size + offset``.
- **block table**: a sequence's ordered list of block ids; token ``t`` of the sequence lives in
  block ``table[t // block_size]`` at offset ``t % block_size``.
- **reference count**: how many sequences' tables hold a block. ``fork`` shares every block of the
  parent (prefix sharing, beams); a write into a shared, partly filled block first copies it
  (copy-on-write), so siblings never see each other's tokens.
- **rollback**: forgetting the last ``n`` tokens of a sequence (rejected draft tokens); whole blocks
  that fall out of use go back to the pool. Accepted tokens are never recomputed.
- **distinct slots**: what forked sequences hold together, each (position, slot) pair once
  (``distinct_slot_table``), so one forward over several beams reads their shared prefix once.

Block 0 is the *null block*: never handed out, it absorbs the writes of padding tokens in ragged
batches, so padding needs no special case in the model code.

The pool is one tensor pair per layer, laid out ``[kv_heads, num_slots, head_dim]`` so that a
sequence whose blocks are consecutive is a plain slice (no gather) of the pool. Layers may differ in
their KV heads and head sizes (``layer_shapes``: Gemma 4's global layers, MiMo-V2's); the slots are
the same in every layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

NULL_BLOCK = 0
NULL_SLOT = 0


class KVCacheExhausted(RuntimeError):
    """The pool has no free block left for a write."""


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    offset: int = 0  # token t lives at position t + offset of the block table (leading slots unused)

    def used(self, tokens: int) -> int:
        """Positions of the block table that ``tokens`` tokens reach (0 for none)."""
        return tokens + self.offset if tokens > 0 else 0


class PagedKVCache:
    """A preallocated pool of fixed-size KV blocks for one model, and the sequences living in it."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        value_head_dim: int | None = None,
        layer_shapes: list[tuple[int, int, int]] | None = None,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        num_slots = num_blocks * block_size
        if layer_shapes is None:  # (kv_heads, key head size, value head size) of each layer
            layer_shapes = [(num_kv_heads, head_dim, value_head_dim or head_dim)] * num_layers
        elif len(layer_shapes) != num_layers:
            raise ValueError(f"layer_shapes has {len(layer_shapes)} entries for {num_layers} layers")
        # per layer: keys [kv_heads, num_slots, head_dim], values [kv_heads, num_slots, v_dim]
        self.keys = [torch.zeros(h, num_slots, k, dtype=dtype, device=self.device) for h, k, _ in layer_shapes]
        self.values = [torch.zeros(h, num_slots, v, dtype=dtype, device=self.device) for h, _, v in layer_shapes]
        self._ref_counts = [0] * num_blocks
        # Free blocks kept sorted descending so pop() hands out the lowest id: consecutive
        # allocations tend to be physically contiguous, which lets single sequences skip the gather.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._sequences: dict[int, _Sequence] = {}
        self._next_seq_id = 0
        self._arange_block = torch.arange(block_size)
        self._pending_copies: tuple[list[int], list[int]] | None = None  # (sources, destinations) inside batched_copies

    # ---------------------------------------------------------------- accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def length(self, seq_id: int) -> int:
        return self._seq(seq_id).length

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- block pool
    def _allocate_block(self) -> int:
        if not self._free:
            raise KVCacheExhausted(
                f"KV cache pool exhausted: all {self.num_usable_blocks} blocks of {self.block_size} tokens are in use"
            )
        block = self._free.pop()
        self._ref_counts[block] = 1
        return block

    def _release_block(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            # keep the free list sorted descending (lowest id handed out first)
            free = self._free
            lo, hi = 0, len(free)
            while lo < hi:
                mid = (lo + hi) // 2
                if free[mid] > block:
                    lo = mid + 1
                else:
                    hi = mid
            free.insert(lo, block)

    def grow(self, num_blocks: int) -> None:
        """Enlarge the pool to ``num_blocks`` blocks (no-op if it is that big already).

        Existing blocks keep their ids and contents, so live sequences are untouched; call it between
        forwards, never while a :class:`KVBatch` built on the old tensors is in use.
        """
        old = self.num_blocks
        if num_blocks <= old:
            return
        extra = (num_blocks - old) * self.block_size
        for tensors in (self.keys, self.values):
            for i, t in enumerate(tensors):
                tensors[i] = torch.cat([t, t.new_zeros(t.shape[0], extra, t.shape[2])], dim=1)  # [kv_heads, slots, dim]
        self._ref_counts.extend([0] * (num_blocks - old))
        self._free = list(range(num_blocks - 1, old - 1, -1)) + self._free  # new ids are the highest: handed out last
        self.num_blocks = num_blocks

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of flat slots ``src`` into ``dst`` in every layer (moving an accepted tree path
        into a sequence's own blocks: its K/V is moved, never recomputed). Inside :meth:`batched_copies`
        the copy is queued and runs with the others on exit."""
        if self._pending_copies is not None:
            self._pending_copies[0].extend(src)
            self._pending_copies[1].extend(dst)
            return
        if not src:
            return
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)  # [n]
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)  # [n]
        for k, v in zip(self.keys, self.values):
            k.index_copy_(1, dst_t, k.index_select(1, src_t))
            v.index_copy_(1, dst_t, v.index_select(1, src_t))

    def ensure_free(self, num_blocks: int) -> None:
        """Grow the pool so that at least ``num_blocks`` blocks are free."""
        if self.num_free_blocks < num_blocks:
            self.grow(self.num_blocks + num_blocks - self.num_free_blocks)

    @contextlib.contextmanager
    def batched_copies(self):
        """Run the slot copies made inside the block (copy-on-write in :meth:`append_slots`,
        :meth:`copy_slots`) together on exit: one gather and one scatter per layer instead of a slice
        copy per block (on a GPU, a handful of launches instead of two per layer and block).

        Inside, no copy may read a slot that another copy of the same block writes: sources are slots
        of blocks held before the block began (copy-on-write reads a shared block; its destination is
        a freshly allocated one), and nothing reads the pool until the block ends. Nested blocks join
        the outermost one. The copies run also when the block raises (the block tables already point
        at their destinations)."""
        if self._pending_copies is not None:
            yield
            return
        self._pending_copies = ([], [])
        try:
            yield
        finally:
            src, dst = self._pending_copies
            self._pending_copies = None
            self.copy_slots(src, dst)

    def _copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        s, d = src * self.block_size, dst * self.block_size
        if self._pending_copies is not None:
            self.copy_slots(list(range(s, s + num_tokens)), list(range(d, d + num_tokens)))
            return
        for k, v in zip(self.keys, self.values):
            k[:, d : d + num_tokens] = k[:, s : s + num_tokens]
            v[:, d : d + num_tokens] = v[:, s : s + num_tokens]

    # ---------------------------------------------------------------- sequences
    def _seq(self, seq_id: int) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise KeyError(f"unknown KV sequence {seq_id}") from None

    def new_sequence(self, end_aligned_at: int | None = None) -> int:
        """A new empty sequence. With ``end_aligned_at=n`` its first block is entered at an offset so
        that token ``n - 1`` ends a block: forks taken at length ``n`` (beams over a prompt) then write
        their own tokens into blocks of their own instead of copying a shared partly filled block."""
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        offset = 0 if end_aligned_at is None else (-end_aligned_at) % self.block_size
        self._sequences[seq_id] = _Sequence(offset=offset)
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block (and token) of ``seq_id``; no K/V is copied."""
        parent = self._seq(seq_id)
        child_id = self.new_sequence()
        child = self._sequences[child_id]
        child.blocks = list(parent.blocks)
        child.length = parent.length
        child.offset = parent.offset
        for b in parent.blocks:
            self._ref_counts[b] += 1
        return child_id

    def free(self, seq_id: int) -> None:
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return
        for b in seq.blocks:
            self._release_block(b)

    def free_all(self) -> None:
        for seq_id in list(self._sequences):
            self.free(seq_id)

    def append_slots(self, seq_id: int, num_tokens: int) -> list[int]:
        """Reserve ``num_tokens`` slots at the end of the sequence and return their flat indices.

        A shared block that the new tokens would write into is copied first (copy-on-write).
        On pool exhaustion nothing is changed and :class:`KVCacheExhausted` is raised.
        """
        seq = self._seq(seq_id)
        bs = self.block_size
        start, end = seq.used(seq.length) or seq.offset, seq.offset + seq.length + num_tokens  # table positions
        first_block = start // bs
        needed = self.blocks_needed(end) - len(seq.blocks)
        cow = num_tokens > 0 and first_block < len(seq.blocks) and self._ref_counts[seq.blocks[first_block]] > 1
        if max(needed, 0) + int(cow) > len(self._free):
            raise KVCacheExhausted(
                f"KV cache pool exhausted: need {max(needed, 0) + int(cow)} more blocks of {bs} tokens, "
                f"{len(self._free)} free of {self.num_usable_blocks}"
            )
        if cow:
            old = seq.blocks[first_block]
            new = self._allocate_block()
            self._copy_block(old, new, start - first_block * bs)
            self._release_block(old)
            seq.blocks[first_block] = new
        for _ in range(max(needed, 0)):
            seq.blocks.append(self._allocate_block())
        seq.length += num_tokens
        return [seq.blocks[t // bs] * bs + t % bs for t in range(start, end)]

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens; blocks left empty return to the pool."""
        seq = self._seq(seq_id)
        if num_tokens < 0 or num_tokens > seq.length:
            raise ValueError(f"cannot roll back {num_tokens} tokens of a sequence of length {seq.length}")
        seq.length -= num_tokens
        keep = self.blocks_needed(seq.used(seq.length))
        while len(seq.blocks) > keep:
            self._release_block(seq.blocks.pop())

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep only the first ``length`` tokens."""
        self.rollback(seq_id, self.length(seq_id) - length)

    # ---------------------------------------------------------------- reads
    def read_slots(self, seq_id: int, length: int | None = None) -> torch.Tensor:
        """Flat slot indices of the sequence's first ``length`` tokens.  # [length]"""
        seq = self._seq(seq_id)
        n = seq.length if length is None else length
        table = torch.tensor(seq.blocks[: self.blocks_needed(seq.used(n))], dtype=torch.long)
        slots = (table[:, None] * self.block_size + self._arange_block[None, :]).reshape(-1)  # [blocks * block_size]
        return slots[seq.offset : seq.offset + n]

    def read_slot_table(self, seq_ids: list[int], lengths: list[int], width: int) -> torch.Tensor:
        """Flat slots of each sequence's first ``lengths[r]`` tokens, NULL_SLOT after them.  # [N, width]

        One gather for the whole batch (``read_slots`` row by row costs a few tensor ops per row)."""
        bs = self.block_size
        seqs = [self._seq(s) for s in seq_ids]
        num_blocks = [self.blocks_needed(q.used(n)) for q, n in zip(seqs, lengths)]
        most = max(max(num_blocks), 1)
        table = torch.tensor([q.blocks[:b] + [NULL_BLOCK] * (most - b) for q, b in zip(seqs, num_blocks)],
                             dtype=torch.long)  # [N, most]
        flat = (table[:, :, None] * bs + self._arange_block).reshape(len(seqs), most * bs)  # [N, most * bs]
        column = torch.arange(width)[None, :]  # [1, width]
        index = (torch.tensor([q.offset for q in seqs])[:, None] + column).clamp(max=most * bs - 1)  # [N, width]
        slots = flat.gather(1, index)  # [N, width]
        return slots.masked_fill_(column >= torch.tensor(lengths)[:, None], NULL_SLOT)

    def _shared_spans(
        self, seq_ids: list[int], lengths: list[int]
    ) -> dict[tuple[int, int], list[tuple[int, int, int]]] | None:
        """None if no two of the sequences share a block; else, for every distinct (first position,
        block) pair, the (row, first, end) slots within the block each sequence holding it uses."""
        seqs = [self._seq(s) for s in seq_ids]
        tables = [q.blocks[: self.blocks_needed(q.used(n))] for q, n in zip(seqs, lengths)]
        if len({b for t in tables for b in t}) == sum(len(t) for t in tables):
            return None
        bs = self.block_size
        spans: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for r, (q, n, table) in enumerate(zip(seqs, lengths, tables)):
            used = q.used(n)
            for i, b in enumerate(table):
                first, end = max(q.offset - i * bs, 0), min(used - i * bs, bs)
                spans.setdefault((i * bs - q.offset, b), []).append((r, first, end))
        return spans

    def num_distinct_slots(self, seq_ids: list[int], lengths: list[int]) -> int:
        """How many distinct (position, slot) pairs hold the sequences' first ``lengths[r]`` tokens:
        ``sum(lengths)`` less what forks share."""
        spans = self._shared_spans(seq_ids, lengths)
        if spans is None:
            return sum(lengths)
        return sum(max(e for _, _, e in held) - min(f for _, f, _ in held) for held in spans.values())

    def distinct_slot_table(
        self, seq_ids: list[int], lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences' first ``lengths[r]`` tokens, each (position, slot) pair **once** however many
        of them share it (forks share blocks): ``slots`` ``[U]``, their ``positions`` ``[U]`` (every
        sequence's own in increasing order) and ``holds`` ``[N, U]``, which sequence holds which."""
        spans = self._shared_spans(seq_ids, lengths)
        if spans is None:  # nothing shared: every sequence's own slots, one after another
            width = max(max(lengths), 1)
            table = self.read_slot_table(seq_ids, lengths, width)  # [N, width]
            column = torch.arange(width)[None, :].expand_as(table)  # [N, width]
            held = column < torch.tensor(lengths)[:, None]  # [N, width]
            rows = torch.arange(len(seq_ids))[:, None].expand_as(table)[held]  # [U]
            holds = torch.zeros(len(seq_ids), int(held.sum()), dtype=torch.bool)  # [N, U]
            holds[rows, torch.arange(rows.numel())] = True
            return table[held], column[held], holds
        bs = self.block_size
        slots: list[int] = []
        positions: list[int] = []
        hold_rows: list[int] = []
        hold_cols: list[int] = []
        for (base, block), held in sorted(spans.items()):
            first = min(f for _, f, _ in held)
            end = max(e for _, _, e in held)
            col = len(slots)
            slots.extend(range(block * bs + first, block * bs + end))
            positions.extend(range(base + first, base + end))
            for r, f, e in held:
                hold_rows.extend([r] * (e - f))
                hold_cols.extend(range(col + f - first, col + e - first))
        holds = torch.zeros(len(seq_ids), len(slots), dtype=torch.bool)  # [N, U]
        holds[torch.tensor(hold_rows, dtype=torch.long), torch.tensor(hold_cols, dtype=torch.long)] = True
        return torch.tensor(slots, dtype=torch.long), torch.tensor(positions, dtype=torch.long), holds

    def contiguous_start(self, seq_id: int, length: int) -> int | None:
        """First slot if the sequence's first ``length`` tokens lie in consecutive blocks, else None."""
        seq = self._seq(seq_id)
        blocks = seq.blocks[: self.blocks_needed(seq.used(length))]
        if not blocks:
            return None
        first = blocks[0]
        if blocks[-1] - first != len(blocks) - 1:
            return None
        for i, b in enumerate(blocks):
            if b != first + i:
                return None
        return first * self.block_size + seq.offset
