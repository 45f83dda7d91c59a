"""Steps at draft length 0 that skip the draft's forward, and the catch-up that follows them.

vLLM's draft-model proposer runs the draft over every token the target processes, drafts or not: at
draft length 0 a step still pays a draft forward, only to keep the draft's KV cache complete. Where
the draft costs about what the target does, such a step costs about twice a spec-off step, so
"length 0" would not be plain decoding.

specbeam skips that forward in a step that drafts nothing and verified nothing, and records what the
draft missed: for each such step, its requests, their query offsets (host) and the target's tokens
and positions (device copies; no host sync). When drafting resumes, one draft forward over every
missed token of the requests still running (:func:`catch_up`, in chunks of at most the draft's
token budget) writes their draft KV before the step's own draft pass reads it. Requests that ended
meanwhile drop out of the record. Exactness never depends on any of this: the target verifies every
draft; a draft KV entry left unwritten only lowers acceptance.

The record is bounded (``max_tokens``): past it, the oldest steps are dropped and their requests
draft from an incomplete cache until they finish (they stay exact; the cost model sees the lower
acceptance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SkippedStep:
    """What one skipped draft forward would have processed."""

    req_ids: tuple[str, ...]  # rows of the step, in its order
    query_start: np.ndarray  # [rows + 1] host offsets of each row's tokens
    tokens: torch.Tensor  # [tokens] target token ids (device copy)
    positions: torch.Tensor  # [tokens] their positions (device copy)


class DraftLag:
    """The record of skipped draft forwards."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.steps: list[SkippedStep] = []
        self.num_tokens = 0
        self.dropped_steps = 0

    def __bool__(self) -> bool:
        return bool(self.steps)

    def record(self, req_ids, query_start_cpu: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        rows = len(req_ids)
        query_start = query_start_cpu[: rows + 1].numpy().astype(np.int64, copy=True)  # [rows + 1]
        n = int(query_start[-1])
        self.steps.append(SkippedStep(tuple(req_ids), query_start, tokens[:n].clone(), positions[:n].clone()))
        self.num_tokens += n
        if self.num_tokens > self.max_tokens:
            self.prune(set(req_ids))
        while self.num_tokens > self.max_tokens and len(self.steps) > 1:
            self.num_tokens -= int(self.steps.pop(0).query_start[-1])
            self.dropped_steps += 1

    def prune(self, live: set[str]) -> None:
        """Forget the tokens of requests not in ``live`` (ended, or preempted: those recompute)."""
        kept: list[SkippedStep] = []
        total = 0
        for step in self.steps:
            keep = [i for i, r in enumerate(step.req_ids) if r in live]
            if len(keep) == len(step.req_ids):
                kept.append(step)
            elif keep:
                starts, ends = step.query_start[keep], step.query_start[np.asarray(keep) + 1]
                index = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])  # [kept tokens]
                index_dev = torch.from_numpy(index).to(step.tokens.device)
                lengths = ends - starts
                kept.append(SkippedStep(tuple(step.req_ids[i] for i in keep), np.concatenate([[0], np.cumsum(lengths)]),
                                        step.tokens[index_dev], step.positions[index_dev]))
            else:
                continue
            total += int(kept[-1].query_start[-1])
        self.steps, self.num_tokens = kept, total

    def take(self, req_ids, budget: int) -> list["CatchUp"]:
        """The catch-up forwards for the rows ``req_ids`` of the current step, at most ``budget`` tokens
        each, in step order; the record is emptied."""
        row_of = {r: i for i, r in enumerate(req_ids)}
        chunks: list[CatchUp] = []
        current: list[SkippedStep] = []
        size = 0
        for step in self.steps:
            n = sum(int(step.query_start[i + 1] - step.query_start[i])
                    for i, r in enumerate(step.req_ids) if r in row_of)
            if current and size + n > budget:
                chunks.append(_gather(current, row_of))
                current, size = [], 0
            if n:
                current.append(step)
                size += n
        if current:
            chunks.append(_gather(current, row_of))
        self.steps, self.num_tokens = [], 0
        return [c for c in chunks if c.num_tokens]


@dataclass
class CatchUp:
    """One catch-up forward: rows of the current step and their missed tokens, row by row."""

    rows: np.ndarray  # [n] row of each request in the current step
    query_start: np.ndarray  # [n + 1] host offsets
    tokens: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])


def _gather(steps: list[SkippedStep], row_of: dict[str, int]) -> CatchUp:
    """Each current row's tokens from ``steps`` (consecutive skipped steps), contiguous and in position order."""
    offsets = np.cumsum([0] + [int(s.query_start[-1]) for s in steps])  # where each step's tokens start
    pieces: dict[int, list[np.ndarray]] = {}
    for base, step in zip(offsets, steps):
        for i, req_id in enumerate(step.req_ids):
            row = row_of.get(req_id)
            if row is not None and step.query_start[i + 1] > step.query_start[i]:
                pieces.setdefault(row, []).append(np.arange(base + step.query_start[i], base + step.query_start[i + 1]))
    rows = np.asarray(sorted(pieces), dtype=np.int64)
    index = [np.concatenate(pieces[r]) for r in rows]
    lengths = np.asarray([len(ix) for ix in index], dtype=np.int64)
    query_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    device = steps[0].tokens.device
    index_dev = torch.from_numpy(np.concatenate(index) if index else np.zeros(0, np.int64)).to(device)  # [tokens]
    tokens = torch.cat([s.tokens for s in steps])[index_dev]
    positions = torch.cat([s.positions for s in steps])[index_dev]
    return CatchUp(rows, query_start, tokens, positions)


def catch_up(proposer, chunk: CatchUp, cad) -> None:
    """Run ``proposer``'s draft model over ``chunk``'s tokens, writing their draft KV (vLLM's attention
    metadata builders and forward context, as the proposer's own first pass; eager, no CUDA graph)."""
    from vllm.forward_context import set_forward_context
    from vllm.v1.attention.backend import CommonAttentionMetadata

    device = proposer.device
    n, rows = chunk.num_tokens, len(chunk.rows)
    rows_dev = torch.from_numpy(chunk.rows).to(device)  # [rows]
    block_table = cad.block_table_tensor[rows_dev]  # [rows, max_blocks]
    lengths = torch.from_numpy(np.diff(chunk.query_start)).to(device)  # [rows]
    token_row = torch.repeat_interleave(torch.arange(rows, device=device), lengths)  # [tokens]
    positions = chunk.positions.to(torch.int64)  # [tokens]
    bs = proposer.block_size
    slots = block_table[token_row, positions // bs].to(torch.int64) * bs + positions % bs  # [tokens]
    seq_lens = torch.zeros(rows, dtype=torch.int64, device=device).scatter_reduce(
        0, token_row, positions + 1, reduce="amax").to(torch.int32)  # [rows] context each row attends to
    query_start_cpu = torch.from_numpy(chunk.query_start.astype(np.int32))  # [rows + 1]
    meta = CommonAttentionMetadata(
        query_start_loc=query_start_cpu.to(device), query_start_loc_cpu=query_start_cpu, seq_lens=seq_lens,
        num_reqs=rows, num_actual_tokens=n, max_query_len=int(np.diff(chunk.query_start).max()),
        max_seq_len=int(cad.max_seq_len), block_table_tensor=block_table, slot_mapping=slots, causal=True,
        positions=positions)
    proposer.input_ids[:n] = chunk.tokens.to(proposer.input_ids.dtype)
    proposer._set_positions(n, positions)
    _, per_layer = proposer.build_per_group_and_layer_attn_metadata(meta)
    with set_forward_context(per_layer, proposer.vllm_config, num_tokens=n,
                             slot_mapping=proposer._get_slot_mapping(n, slots)):
        proposer.model(input_ids=proposer.input_ids[:n], positions=proposer._get_positions(n), inputs_embeds=None)
