"""The record of skipped draft forwards and what the catch-up feeds the draft (no vLLM needed).

Steps at draft length 0 skip the draft; when drafting resumes, each running request's missed tokens
must come back contiguous, in position order, with their own ids, rows in the current step's order,
requests that ended left out, and chunks within the draft's token budget.
"""

from __future__ import annotations

import numpy as np
import torch

from specbeam_vllm.draft_lag import DraftLag


def step(lag: DraftLag, rows: dict[str, tuple[int, int]]) -> None:
    """Record a skipped step: request id -> (first position, tokens); token id = 1000 * request + position."""
    ids, tokens, positions, starts = list(rows), [], [], [0]
    for req_id, (first, n) in rows.items():
        pos = list(range(first, first + n))
        positions += pos
        tokens += [1000 * int(req_id[1:]) + p for p in pos]
        starts.append(starts[-1] + n)
    lag.record(ids, torch.tensor(starts, dtype=torch.int32), torch.tensor(tokens), torch.tensor(positions))


def per_row(chunk) -> dict[int, tuple[list[int], list[int]]]:
    out = {}
    for i, row in enumerate(chunk.rows):
        s, e = chunk.query_start[i], chunk.query_start[i + 1]
        out[int(row)] = (chunk.tokens[s:e].tolist(), chunk.positions[s:e].tolist())
    return out


def test_missed_tokens_come_back_per_current_row_contiguous_and_in_order():
    lag = DraftLag(max_tokens=10_000)
    step(lag, {"r1": (10, 1), "r2": (20, 1)})
    step(lag, {"r2": (21, 1), "r3": (0, 5), "r1": (11, 1)})  # r3 prefills; rows reordered
    step(lag, {"r1": (12, 1), "r3": (5, 1), "r2": (22, 1)})
    assert lag.num_tokens == 12
    chunks = lag.take(["r3", "r9", "r1"], budget=100)  # r2 ended; r9 is new (nothing missed)
    assert not lag and lag.num_tokens == 0 and len(chunks) == 1
    got = per_row(chunks[0])
    assert sorted(got) == [0, 2]  # rows of r3 and r1 in the current step
    assert got[0] == ([3000 + p for p in range(6)], list(range(6)))
    assert got[2] == ([1010, 1011, 1012], [10, 11, 12])
    assert chunks[0].num_tokens == 9 and list(chunks[0].query_start) == [0, 6, 9]


def test_chunks_keep_within_the_budget_and_in_step_order():
    lag = DraftLag(max_tokens=10_000)
    for t in range(6):
        step(lag, {"r1": (t * 2, 2), "r2": (100 + t * 2, 2)})  # 4 tokens a step
    chunks = lag.take(["r2", "r1"], budget=8)
    assert [c.num_tokens for c in chunks] == [8, 8, 8]
    seen = {0: [], 1: []}
    for c in chunks:
        for row, (_, pos) in per_row(c).items():
            seen[row] += pos
    assert seen[0] == list(range(100, 112)) and seen[1] == list(range(12))  # nothing lost, nothing repeated


def test_the_record_is_bounded_dropping_ended_requests_first_then_the_oldest_steps():
    lag = DraftLag(max_tokens=6)
    step(lag, {"r1": (0, 3)})
    step(lag, {"r2": (0, 3)})
    step(lag, {"r2": (3, 2)})  # 8 > 6: r1 is not in this step, so its tokens go
    assert lag.num_tokens == 5 and lag.dropped_steps == 0
    assert sorted({r for s in lag.steps for r in s.req_ids}) == ["r2"]
    step(lag, {"r2": (5, 3)})  # 8 > 6 with every request live: the oldest step goes
    assert lag.dropped_steps == 1 and lag.num_tokens == 5
    (chunk,) = lag.take(["r2"], budget=100)
    assert per_row(chunk)[0][1] == [3, 4, 5, 6, 7]


def test_prune_keeps_the_tokens_of_live_requests_exactly():
    lag = DraftLag(max_tokens=10_000)
    step(lag, {"r1": (0, 2), "r2": (0, 3), "r3": (7, 1)})
    lag.prune({"r3", "r1"})
    (kept,) = lag.steps
    assert kept.req_ids == ("r1", "r3") and list(kept.query_start) == [0, 2, 3]
    assert kept.tokens.tolist() == [1000, 1001, 3007] and kept.positions.tolist() == [0, 1, 7]
    assert np.array_equal(kept.query_start, [0, 2, 3]) and lag.num_tokens == 3
