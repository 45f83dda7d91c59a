"""Match vLLM's batch rows to the draft state kept for each request, by their tokens alone.

The proposer matches by vLLM's request ids where its runner hook passes them, and comes here for
the rest (no hook installed, or states made before ids were known). vLLM hands a custom proposer no
request ids: rows are reordered between steps, and requests finish,
are preempted or aborted without notice. A row belongs to a state when the row's tokens extend the
tokens the state was created from (its prompt and first tokens); among several such states (the
same prompt sent twice) the one sharing the longest prefix wins, and each state goes to one row.
States are indexed by their first ``KEY_LEN`` tokens (or all of them, if fewer), so a lookup costs
one dict probe per distinct key length, not a scan of every state.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from specbeam_core import Request

KEY_LEN = 16


@dataclass(eq=False)
class DraftState:
    """What the proposer keeps for one request: a core ``Request`` whose draft K/V lives in the pool."""

    request: Request  # request.tokens: the row's tokens at the last step that drafted for it
    anchor: np.ndarray  # [anchor_len] int32: tokens the state was created from; a matching row extends them
    req_id: str | None = None  # vLLM's id when the runner hook told it (frees the state at finish)
    last_claimed: int = 0  # proposer step that last matched a row to this state
    key: tuple[int, ...] = field(default=())

    def extended_by(self, tokens: np.ndarray) -> bool:
        """True when ``tokens`` start with the tokens this state was created from."""
        return len(self.anchor) <= len(tokens) and _lcp(self.anchor, tokens) == len(self.anchor)


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two 1-D int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class RowMatcher:
    """An index of live draft states by their first tokens."""

    def __init__(self) -> None:
        self._index: dict[tuple[int, ...], list[DraftState]] = defaultdict(list)
        self._key_lengths: dict[int, int] = defaultdict(int)  # key length -> states indexed with it

    def __len__(self) -> int:
        return sum(self._key_lengths.values())

    def states(self) -> list[DraftState]:
        return [s for bucket in self._index.values() for s in bucket]

    def add(self, state: DraftState) -> None:
        state.key = tuple(int(t) for t in state.anchor[:KEY_LEN])
        self._index[state.key].append(state)
        self._key_lengths[len(state.key)] += 1

    def remove(self, state: DraftState) -> None:
        bucket = self._index[state.key]
        bucket.remove(state)
        if not bucket:
            del self._index[state.key]
        self._key_lengths[len(state.key)] -= 1
        if not self._key_lengths[len(state.key)]:
            del self._key_lengths[len(state.key)]

    def match(self, rows: dict[int, np.ndarray], eligible=None) -> dict[int, DraftState]:
        """For each row (index -> its tokens), the unclaimed state it extends, if any (among the states
        ``eligible(state)`` accepts, when given)."""
        claimed: set[int] = set()
        found: dict[int, DraftState] = {}
        for row, tokens in rows.items():
            best, best_len = None, -1
            for key_len in self._key_lengths:
                if key_len > len(tokens):
                    continue
                for state in self._index.get(tuple(int(t) for t in tokens[:key_len]), ()):
                    if id(state) in claimed or (eligible is not None and not eligible(state)):
                        continue
                    if not state.extended_by(tokens):
                        continue  # the row does not extend this request's first tokens
                    shared = _lcp(np.asarray(state.request.tokens), tokens)
                    if shared > best_len:
                        best, best_len = state, shared
            if best is not None:
                claimed.add(id(best))
                found[row] = best
        return found
