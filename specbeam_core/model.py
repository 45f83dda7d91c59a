"""The small model interface the engine drives, and the ragged KV batch it hands to a model.

A framework plugs in by implementing :class:`CausalLM`: given new tokens, their positions and a
:class:`KVBatch` (where to write their K/V in the paged pool, what to read back, and the attention
mask), return logits. The HF adapter does this with a ``transformers.Cache`` subclass whose
``update`` calls :meth:`KVBatch.update`; any other framework calls it from its attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from .kv_cache import NULL_SLOT, PagedKVCache
from .sampling import check_finite


@dataclass
class KVBatch:
    """One forward's view of a :class:`PagedKVCache` over a ragged batch of ``N`` sequences.

    Row ``r`` feeds ``num_new[r]`` tokens (left-padded to ``T``) after ``num_cached[r]`` tokens already
    in the cache. Keys/values are read back as ``[N, heads, K, head_dim]`` with
    ``K = max(num_cached + num_new)``; ``attention_mask`` hides everything a query must not see.
    """

    cache: PagedKVCache
    write_slots: torch.Tensor  # [N * T] flat slot of each new token's K/V (NULL_SLOT for padding), on the host
    write_start: int | None  # N == 1 and the new slots are consecutive: write slots [write_start, write_start + T)
    read_slots: torch.Tensor | None  # [N, K] flat slots to read, or None when read_start is set
    read_start: int | None  # N == 1 and the sequence is contiguous: read slots [read_start, read_start + K)
    attention_mask: torch.Tensor | None  # [N, 1, T, K] additive (0 or dtype-min), None when nothing is hidden
    positions: torch.Tensor  # [N, T] position id of each new token
    num_cached: list[int]
    num_new: list[int]
    # [N, K] position of every key, set where keys are not 0..K-1 (packed rows)
    key_positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # The engine keeps its bookkeeping on the host; the slot indices the pool reads and writes
        # with go to the pool's device once per forward (a no-op for a CPU pool).
        device = self.cache.device
        self._write_index = self.write_slots.to(device) if self.write_start is None else None  # [N * T]
        self._read_index = None if self.read_slots is None else self.read_slots.reshape(-1).to(device)  # [N * K]

    @property
    def kv_length(self) -> int:
        return max(c + n for c, n in zip(self.num_cached, self.num_new))

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' ``keys``/``values`` ``[N, heads, T, dim]`` and return the full ones."""
        k_pool, v_pool = self.cache.keys[layer], self.cache.values[layer]
        n, h, t, _ = keys.shape
        if self.write_start is not None:  # one row, consecutive slots: a plain slice copy
            k_pool[:, self.write_start : self.write_start + t] = keys[0]
            v_pool[:, self.write_start : self.write_start + t] = values[0]
        else:
            k_pool.index_copy_(1, self._write_index, keys.transpose(0, 1).reshape(h, n * t, -1).to(k_pool.dtype))
            v_pool.index_copy_(1, self._write_index, values.transpose(0, 1).reshape(h, n * t, -1).to(v_pool.dtype))
        if self.read_start is not None:
            end = self.read_start + self.kv_length
            return k_pool[None, :, self.read_start : end], v_pool[None, :, self.read_start : end]
        n_rows, k_len = self.read_slots.shape
        flat = self._read_index  # index_select: a third of the time of advanced indexing here
        keys_out = k_pool.index_select(1, flat).view(h, n_rows, k_len, -1).transpose(0, 1)  # [N, heads, K, dim]
        values_out = v_pool.index_select(1, flat).view(h, n_rows, k_len, -1).transpose(0, 1)
        return keys_out, values_out


def left_pad(feeds: Sequence[Sequence[int]]) -> torch.Tensor:
    """Ragged rows of token ids as one ``[N, T]`` long tensor, each row right-aligned (left-padded
    with 0 to ``T = max(len(row))``), the layout :func:`build_kv_batch` expects."""
    t_max = max(len(f) for f in feeds)
    tokens = torch.zeros(len(feeds), t_max, dtype=torch.long)  # [N, T]
    for r, f in enumerate(feeds):
        tokens[r, t_max - len(f) :] = torch.tensor(list(f), dtype=torch.long)
    return tokens


def build_kv_batch(
    cache: PagedKVCache,
    seq_ids: Sequence[int],
    num_new: Sequence[int],
    dtype: torch.dtype,
    new_token_mask: torch.Tensor | None = None,
    new_token_depths: torch.Tensor | None = None,
) -> KVBatch:
    """Reserve slots for ``num_new[r]`` tokens at the end of each sequence and describe the forward.

    New tokens are **left-padded** to ``T = max(num_new)``: row ``r``'s tokens fill the last
    ``num_new[r]`` columns, so the last column is every row's last token and "the last ``k``
    positions" means the same columns for every row.

    ``new_token_mask`` ``[N, T, T]`` (bool, in each row's own token order, unpadded at index 0)
    says which new tokens each new token may attend to; the default is causal (a chain). Token
    trees pass their ancestor mask and ``new_token_depths`` ``[N, T]`` (position offsets, same
    order); chains use ``0..T-1``.
    """
    n_rows = len(seq_ids)
    if n_rows == 0 or min(num_new) < 1:
        raise ValueError("every row of a KV batch must feed at least one token")
    if n_rows == 1 and new_token_mask is None:
        return _single_chain(cache, seq_ids[0], num_new[0], dtype)
    t_max = max(num_new)
    num_cached = [cache.length(s) for s in seq_ids]
    padded_slots: list[list[int]] = []  # per row: NULL_SLOT padding, then its new tokens' slots
    write_start = None
    done = 0
    try:
        with cache.batched_copies():  # the rows' copy-on-write copies run together
            for s, n in zip(seq_ids, num_new):
                slots = cache.append_slots(s, n)
                padded_slots.append([NULL_SLOT] * (t_max - n) + slots)
                if n_rows == 1 and slots == list(range(slots[0], slots[0] + n)):
                    write_start = slots[0]
                done += 1
    except Exception:
        for s, n in zip(seq_ids[:done], num_new[:done]):
            cache.rollback(s, n)
        raise
    write_slots = torch.tensor(padded_slots, dtype=torch.long)  # [N, T]
    total = [c + n for c, n in zip(num_cached, num_new)]
    k_len = max(total)

    cached_t = torch.tensor(num_cached)[:, None]  # [N, 1]
    new_t = torch.tensor(list(num_new))[:, None]  # [N, 1]
    own = torch.arange(t_max)[None, :] - (t_max - new_t)  # [N, T] index among the row's new tokens (< 0: padding)
    if new_token_depths is None:
        depth = own
    else:
        depth = new_token_depths.gather(1, own.clamp(min=0))  # [N, T]
    positions = torch.where(own >= 0, cached_t + depth, 0)  # [N, T]

    read_start = None
    read_slots = None
    if n_rows == 1:
        read_start = cache.contiguous_start(seq_ids[0], k_len)
    if read_start is None:
        read_slots = cache.read_slot_table(seq_ids, total, k_len)  # [N, K]

    attention_mask = None
    if t_max == 1 and new_token_mask is None:  # one new token per row (decode steps): it sees its row's keys
        visible = torch.arange(k_len)[None, :] < torch.tensor(total)[:, None]  # [N, K]
        attention_mask = torch.zeros(n_rows, 1, 1, k_len, dtype=dtype)  # [N, 1, 1, K]
        attention_mask.masked_fill_(~visible[:, None, None], torch.finfo(dtype).min)
    elif t_max > 1 or n_rows > 1:
        key = torch.arange(k_len)[None, None, :]  # [1, 1, K]
        q_own = own[:, :, None]  # [N, T, 1]
        rel = key - cached_t[:, :, None]  # [N, 1, K] index of the key among the row's new tokens
        if new_token_mask is None:
            new_ok = (rel >= 0) & (rel <= q_own)  # [N, T, K] causal among new tokens
        else:
            shifted = torch.zeros(n_rows, t_max + 1, t_max + 1, dtype=torch.bool)  # [N, T + 1, T + 1], index 0 = none
            shifted[:, 1:, 1:] = new_token_mask
            rows = torch.arange(n_rows)[:, None, None]
            new_ok = shifted[rows, (q_own + 1).clamp(min=0), (rel + 1).clamp(min=0, max=t_max)]  # [N, T, K]
        allowed = (key < cached_t[:, :, None]) | new_ok  # [N, T, K]
        allowed &= key < torch.tensor(total)[:, None, None]
        allowed = torch.where(q_own >= 0, allowed, key == 0)  # padding queries see key 0 only
        attention_mask = torch.zeros(n_rows, 1, t_max, k_len, dtype=dtype)  # [N, 1, T, K]
        attention_mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    return KVBatch(
        cache=cache,
        write_slots=write_slots.reshape(-1),
        write_start=write_start,
        read_slots=read_slots,
        read_start=read_start,
        attention_mask=attention_mask,
        positions=positions,
        num_cached=num_cached,
        num_new=list(num_new),
    )


@dataclass
class PackedRows:
    """Where :func:`build_packed_kv_batch` put each row's new tokens in its single packed row.

    ``columns[r]`` lists the packed columns of row ``r``'s new tokens, in the row's own order. Every
    row's last ``num_needed[r]`` tokens sit at the end of the packed row, row after row, so a forward
    returning the last ``sum(num_needed)`` columns returns them in that order."""

    columns: list[list[int]]
    num_needed: list[int]

    @property
    def total_needed(self) -> int:
        return sum(self.num_needed)

    def tokens(self, feeds: Sequence[Sequence[int]]) -> torch.Tensor:
        """The packed input ids ``[1, T]`` of the rows' ``feeds`` (each row's new tokens, own order)."""
        out = torch.zeros(1, sum(len(c) for c in self.columns), dtype=torch.long)  # [1, T]
        for cols, feed in zip(self.columns, feeds):
            out[0, cols] = torch.tensor(list(feed), dtype=torch.long)
        return out

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the last ``total_needed`` packed columns ``[1, total_needed, vocab]`` → each row's
        ``[num_needed[r], vocab]``."""
        return list(logits[0].split(self.num_needed))


def build_packed_kv_batch(
    cache: PagedKVCache,
    seq_ids: Sequence[int],
    num_new: Sequence[int],
    num_needed: Sequence[int],
    dtype: torch.dtype,
    new_token_mask: torch.Tensor | None = None,
    new_token_depths: torch.Tensor | None = None,
) -> tuple[KVBatch, PackedRows]:
    """:func:`build_kv_batch` for ragged rows, packed into **one** row with no padding.

    A left-padded batch computes ``N × max(num_new)`` positions; rows of very different lengths
    (beam trees: most nodes under the best beam) waste most of them in every linear layer. Here the
    rows' new tokens are laid side by side (``T = sum(num_new)``) and so are their keys: first the
    rows' cached keys, each (position, pool slot) pair **once** however many rows hold it (beams
    forked from one another share their prefix blocks, so a shared prefix is read and attended once,
    not once per beam: :meth:`PagedKVCache.distinct_slot_table`), then every row's new keys, row after
    row. The mask lets a query see
    the cached keys of its own row and its row's new keys in the row's causal or tree order;
    positions are the row's own. Rows' tokens that need no logits come first, then every row's last
    ``num_needed[r]`` tokens, row after row (see :class:`PackedRows`). Masks and depths are as for
    :func:`build_kv_batch`.
    """
    n_rows = len(seq_ids)
    if n_rows == 0 or min(num_new) < 1:
        raise ValueError("every row of a KV batch must feed at least one token")
    if any(not 0 <= k <= n for k, n in zip(num_needed, num_new)):
        raise ValueError(f"num_needed {list(num_needed)} must lie within num_new {list(num_new)}")
    num_cached = [cache.length(s) for s in seq_ids]
    new_slots: list[list[int]] = []
    try:
        with cache.batched_copies():  # the rows' copy-on-write copies run together
            for s, n in zip(seq_ids, num_new):
                new_slots.append(cache.append_slots(s, n))
    except Exception:
        for s, n in zip(seq_ids[: len(new_slots)], num_new[: len(new_slots)]):
            cache.rollback(s, n)
        raise

    # columns: every row's leading (no-logits) tokens, then every row's needed tokens
    columns: list[list[int]] = [[] for _ in range(n_rows)]
    col = 0
    for r, (n, k) in enumerate(zip(num_new, num_needed)):
        columns[r].extend(range(col, col + n - k))
        col += n - k
    for r, k in enumerate(num_needed):
        columns[r].extend(range(col, col + k))
        col += k
    t_total = col

    q_row = torch.empty(t_total, dtype=torch.long)  # [T] row of each packed query
    q_own = torch.empty(t_total, dtype=torch.long)  # [T] its index among the row's new tokens
    write = [0] * t_total
    for r in range(n_rows):
        cols = torch.tensor(columns[r], dtype=torch.long)
        q_row[cols] = r
        q_own[cols] = torch.arange(num_new[r])
        for j, c in enumerate(columns[r]):
            write[c] = new_slots[r][j]

    # cached keys, each (position, slot) pair once: the prefix that forked beams share is read once
    cached_slots, cached_pos, row_sees = cache.distinct_slot_table(list(seq_ids), num_cached)  # [U], [U], [N, U]
    n_distinct = cached_slots.numel()

    cached_t = torch.tensor(num_cached)  # [N]
    if new_token_depths is None:
        q_depth = q_own
    else:
        q_depth = new_token_depths[q_row, q_own]  # [T]
    positions = (cached_t[q_row] + q_depth)[None]  # [1, T]
    # [sum(num_new)] row of each new key
    k_row = torch.repeat_interleave(torch.arange(n_rows), torch.tensor(list(num_new)))
    k_new = torch.cat([torch.arange(n) for n in num_new])  # [sum(num_new)] its index among the row's new tokens
    if new_token_depths is None:
        new_pos = cached_t[k_row] + k_new
    else:
        new_pos = cached_t[k_row] + new_token_depths[k_row, k_new]  # [sum(num_new)]
    key_pos = torch.cat([cached_pos, new_pos])  # [K]
    read_slots = torch.cat([cached_slots, torch.tensor([s for slots in new_slots for s in slots])])[None]  # [1, K]

    if new_token_mask is None:
        new_ok = k_new[None, :] <= q_own[:, None]  # [T, sum(num_new)] causal among the row's new tokens
    else:
        new_ok = new_token_mask[q_row[:, None], q_own[:, None], k_new[None, :]]  # [T, sum(num_new)]
    allowed = torch.cat([row_sees[q_row], new_ok & (q_row[:, None] == k_row[None, :])], dim=1)  # [T, K]
    k_total = allowed.shape[1]
    attention_mask = torch.zeros(1, 1, t_total, k_total, dtype=dtype)  # [1, 1, T, K]
    attention_mask.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)

    kv = KVBatch(
        cache=cache,
        write_slots=torch.tensor(write, dtype=torch.long),
        write_start=None,
        read_slots=read_slots,
        read_start=None,
        attention_mask=attention_mask,
        positions=positions,
        num_cached=[n_distinct],
        num_new=[k_total - n_distinct],
        key_positions=key_pos[None],
    )
    return kv, PackedRows(columns=columns, num_needed=list(num_needed))


DEFAULT_KEYS_PER_TOKEN = 1024.0  # a CausalLM that does not say: a model of hidden size ~200 to ~500
# Gathering one key (and its value) out of the paged pool costs about as much as scoring 16 (query, key)
# pairs: a copy of heads x dim values through memory against as many multiply-adds in cache
# (benchmarks/bench_pack_layout.py: forked beams, one token each, padded against packed).
KEY_READ_PAIRS = 16.0


def pack_is_cheaper(
    num_cached: Sequence[int], num_new: Sequence[int], keys_per_token: float, distinct_cached: int | None = None
) -> bool:
    """Whether packing ragged rows into one (:func:`build_packed_kv_batch`) costs less work than
    left-padding them (:func:`build_kv_batch`).

    Work is counted in (query, key) attention pairs: a query token costs ``keys_per_token`` pairs' worth
    in the linear layers, plus one pair per key it is scored against, and every key read from the pool
    ``KEY_READ_PAIRS``. Padded: ``N * max(num_new)`` queries, each against ``max(num_cached + num_new)``
    keys, and every row reads that many. Packed: ``sum(num_new)`` queries, each against the packed
    row's keys, read once: the rows' ``distinct_cached`` cached keys (a prefix the rows share counted
    once; ``sum(num_cached)`` when not given) and all ``sum(num_new)`` new ones (other rows' masked).
    Ragged rows and shared prefixes favour packing; long contexts the rows do not share favour
    padding, whose attention stays per row.
    """
    total = [c + n for c, n in zip(num_cached, num_new)]
    if distinct_cached is None:
        distinct_cached = sum(num_cached)
    padded_keys = max(total)
    packed_keys = distinct_cached + sum(num_new)
    padded = len(num_new) * (max(num_new) * (keys_per_token + padded_keys) + KEY_READ_PAIRS * padded_keys)
    packed = sum(num_new) * (keys_per_token + packed_keys) + KEY_READ_PAIRS * packed_keys
    return packed < padded


def forward_rows(
    model: "CausalLM",
    cache: PagedKVCache,
    seq_ids: Sequence[int],
    feeds: Sequence[Sequence[int]],
    num_needed: Sequence[int],
    new_token_mask: torch.Tensor,
    new_token_depths: torch.Tensor,
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """One forward of ``model`` over ragged rows (``feeds[r]`` new tokens after sequence ``seq_ids[r]``,
    in the order of ``new_token_mask`` ``[N, T, T]`` and ``new_token_depths`` ``[N, T]``, as for
    :func:`build_kv_batch`), padded or packed, whichever :func:`pack_is_cheaper` says.

    Returns each row's logits of its last ``num_needed[r]`` tokens ``[num_needed[r], vocab]`` and the
    pool slots its new tokens' K/V were written to, in the row's own order.
    """
    num_new = [len(f) for f in feeds]
    keys_per_token = getattr(model, "keys_per_token", None)
    if keys_per_token is None:
        keys_per_token = DEFAULT_KEYS_PER_TOKEN
    num_cached = [cache.length(s) for s in seq_ids]
    if len(feeds) > 1 and pack_is_cheaper(
        num_cached, num_new, keys_per_token, cache.num_distinct_slots(list(seq_ids), num_cached)
    ):
        kv, packed = build_packed_kv_batch(
            cache,
            seq_ids,
            num_new,
            num_needed,
            cache.dtype,
            new_token_mask=new_token_mask,
            new_token_depths=new_token_depths,
        )
        logits = model.forward(packed.tokens(feeds), kv, packed.total_needed)  # [1, sum(num_needed), vocab]
        check_finite(logits, "target model logits")
        write_slots = kv.write_slots.tolist()
        return packed.split(logits), [[write_slots[c] for c in cols] for cols in packed.columns]
    t_max = max(num_new)
    tokens = left_pad(feeds)  # [N, T]
    kv = build_kv_batch(
        cache, seq_ids, num_new, cache.dtype, new_token_mask=new_token_mask, new_token_depths=new_token_depths
    )
    width = max(num_needed)
    logits = model.forward(tokens, kv, width)  # [N, max(num_needed), vocab]
    check_finite(logits, "target model logits")
    write_slots = kv.write_slots.view(len(feeds), t_max).tolist()
    rows = [logits[r, width - k :] for r, k in enumerate(num_needed)]
    return rows, [write_slots[r][t_max - n :] for r, n in enumerate(num_new)]


def _single_chain(cache: PagedKVCache, seq_id: int, n: int, dtype: torch.dtype) -> KVBatch:
    """The decode hot path (one sequence, a chain of ``n`` new tokens): no padding, a causal mask."""
    cached = cache.length(seq_id)
    slots = cache.append_slots(seq_id, n)
    total = cached + n
    read_start = cache.contiguous_start(seq_id, total)
    attention_mask = None
    if n > 1:  # query i sees keys 0 .. cached + i
        attention_mask = torch.full((1, 1, n, total), torch.finfo(dtype).min, dtype=dtype).triu(
            cached + 1
        )  # [1, 1, n, K]
    return KVBatch(
        cache=cache,
        write_slots=torch.tensor(slots, dtype=torch.long),
        write_start=slots[0] if slots == list(range(slots[0], slots[0] + n)) else None,
        read_slots=None if read_start is not None else cache.read_slots(seq_id, total)[None],
        read_start=read_start,
        attention_mask=attention_mask,
        positions=torch.arange(cached, total)[None],
        num_cached=[cached],
        num_new=[n],
    )


@runtime_checkable
class CausalLM(Protocol):
    """What the engine needs of a model. Implemented by ``specbeam_hf.HFCausalLM`` for transformers.

    Optional: ``keys_per_token``, how many (query, key) attention pairs cost as much as one token
    through the linear layers (linear parameters / attention multiply-adds per pair); it decides
    between padded and packed ragged rows (:func:`pack_is_cheaper`). Without it,
    ``DEFAULT_KEYS_PER_TOKEN``."""

    vocab_size: int
    max_positions: int | None

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A paged KV pool shaped for this model (layers, KV heads, head dim, dtype, device)."""
        ...

    def forward(self, tokens: torch.Tensor, kv: KVBatch, num_logits: int) -> torch.Tensor:
        """``tokens`` ``[N, T]`` (left-padded) at ``kv.positions`` → logits of the last ``num_logits``
        columns ``[N, num_logits, vocab]``, float32, **on the host**.

        ``tokens``, ``kv.positions`` and ``kv.attention_mask`` are host tensors: a model on an
        accelerator moves them to its device (``kv.update`` already indexes the pool on its own
        device) and returns its logits to the host, where the engine verifies and samples."""
        ...
