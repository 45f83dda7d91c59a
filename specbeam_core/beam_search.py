"""Exact speculative beam search.

Plain beam search runs one target forward per step over the ``B`` running beams. Here one target
forward covers several steps:

1. **draft**: from the running beams of every prompt, the draft model runs its own beam search
   ``depth`` levels deep (scores start from the target's running beam scores); at every level the
   best ``tree_width`` (default ``num_beams + 2``) (beam, token) candidates become nodes of a
   :class:`~specbeam_core.tree.TokenTree` under the running beam they descend from, and the best
   ``num_beams`` of them that are not EOS
   expand at the next level;
2. **score**: one target forward over every running beam's unseen tokens and its whole tree
   (ancestor masks over the paged cache) gives the target's logits after every node; the beams'
   trees differ in size (most nodes sit under the best beams), so their rows are packed side by side
   into one row rather than padded to the largest wherever that costs less, with the cached prefix
   they share (forked blocks) read and attended once (:func:`~specbeam_core.model.forward_rows`);
3. **replay**: the target's own beam search (:class:`~specbeam_core.beam_state.BeamSearchState`)
   steps on those logits for as long as every running beam's sequence is a scored node; the first
   step whose running beams leave the trees ends the replay, and the next pass drafts from there.

Every selection is made from target log-probabilities only, so the beams, finished hypotheses and
scores are the target's own; the draft decides only how many steps one target pass covers.

KV: a running beam's target KV sequence is a fork of the sequence it descends from (shared prefix
blocks, reference-counted, copy-on-write of a shared partly filled block); the K/V of tree nodes on
its path are copied into its own blocks, never recomputed; the rest of every tree is released with
the pass. The draft keeps the sequences of its expanded nodes until the next pass, so it never
recomputes them either. All blocks return to the pools when :meth:`SpecBeamSearch.run` returns.

The parts, one module each: :mod:`~specbeam_core.prefix_index` (which KV sequences hold which
prefixes), :mod:`~specbeam_core.beam_drafter` (the draft's trees), :mod:`~specbeam_core.depth_chooser`
(how deep to draft), :mod:`~specbeam_core.beam_stats` (statistics); this module runs the search and
re-exports them.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .beam_drafter import BeamTreeDrafter, draft_log_probs
from .beam_state import BeamSearchState
from .beam_stats import BeamStats
from .checks import check_int, check_same_vocab
from .depth_chooser import DepthChooser
from .model import CausalLM, forward_rows
from .prefix_index import Key, PrefixIndex, blocks_needed
from .tree import TokenTree

__all__ = ["BeamStats", "BeamTreeDrafter", "DepthChooser", "Key", "PrefixIndex", "SpecBeamSearch", "draft_log_probs"]


class SpecBeamSearch:
    """The target's beam search, with token trees from a draft model covering several steps per pass."""

    def __init__(
        self,
        target: CausalLM,
        drafter: BeamTreeDrafter | None,
        *,
        depth: int = 3,
        tree_width: int | None = None,
        block_size: int = 16,
        adaptive: bool = True,
    ) -> None:
        if drafter is not None:
            check_same_vocab(drafter.vocab_size, target.vocab_size, "speculative beam search")
        check_int(depth, "tree depth")
        if tree_width is not None:
            check_int(tree_width, "tree_width")
        self.target, self.drafter = target, drafter
        self.depth, self.tree_width = depth, tree_width
        self.chooser = DepthChooser(depth) if adaptive and drafter is not None else None
        self.cache = target.make_cache(64, block_size)
        self.index = PrefixIndex(self.cache)
        self.logits: dict[Key, torch.Tensor] = {}  # target logits after every scored state [vocab]
        self.stats = BeamStats()

    @property
    def max_positions(self) -> int | None:
        limits = [m for m in (self.target.max_positions, getattr(self.drafter, "max_positions", None)) if m]
        return min(limits) if limits else None

    @torch.inference_mode()
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        padded: torch.Tensor,  # [batch, W] the prompts as the beam state stores them (left-padded)
        *,
        num_beams: int,
        max_length: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        eos_token_ids: Sequence[int] = (),
        fill_value: int = -1,
        logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_step: Callable[[torch.Tensor], None] | None = None,
        on_logits: Callable[[torch.Tensor], None] | None = None,
        do_sample: bool = False,
        sample_device: torch.device | str = "cpu",
        draw: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> BeamSearchState:
        """Beam search over ``prompts``; returns the finished :class:`BeamSearchState` (``.result()``:
        ``(sequences [batch * R, L], scores [batch * R])``).

        ``logits_processor(sequences [batch * B, L], log_probs [batch * B, V])`` and
        ``stop(sequences [N, L]) -> bool [N]`` default to nothing and to EOS / ``max_length``;
        ``on_step(log_probs)`` and ``on_logits(logits)`` see each step's processed log-probabilities
        and raw target logits ``[batch * B, vocab]`` (HF's ``output_scores`` / ``output_logits``).
        ``do_sample``: beam sampling, each step's ``K`` continuations drawn from the processed scores
        (temperature, top-k, top-p are logits processors here, as in HF) with the global generator of
        ``sample_device``: one draw a step, as HF's loop makes it, so a seed gives HF's beams.
        ``draw(scores [batch, B * V], K) -> (log-probs, flat indices)`` replaces that draw
        (:class:`~specbeam_core.beam_state.BeamSearchState`).
        """
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        vocab = self.target.vocab_size
        bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab})
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        limit = self.max_positions
        longest = max(len(p) for p in prompts) + max_length - padded.shape[1]
        if limit is not None and longest > limit:
            raise ValueError(f"prompt + new tokens = {longest} exceeds the models' position limit of {limit} tokens")
        eos = frozenset(int(e) for e in eos_token_ids)
        state = BeamSearchState(
            padded,
            num_beams,
            max_length,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            num_eos_tokens=len(eos),
            fill_value=fill_value,
            do_sample=do_sample,
            sample_device=sample_device,
            draw=draw,
        )
        if stop is None:
            eos_t = torch.tensor(sorted(eos), dtype=torch.long)

            def stop(seqs: torch.Tensor) -> torch.Tensor:
                return torch.isin(seqs[:, -1], eos_t) | (seqs.shape[1] >= max_length)

        self.stats = BeamStats()
        if self.drafter is not None:
            self.drafter.forward_count = 0
        if self.chooser is not None:
            self.chooser.begin_search((len(prompts), num_beams, logits_processor is not None))
        try:
            while not state.done:
                keys = [(b, gen) for b, beams in enumerate(state.running_generated()) for gen in beams]
                if any(k not in self.logits for k in keys):
                    self._score(state, keys, prompts, eos)
                logits = torch.stack([self.logits[k] for k in keys])  # [batch * B, vocab]
                if on_logits is not None:
                    on_logits(logits)
                log_probs = torch.log_softmax(logits, dim=-1)
                if logits_processor is not None:
                    log_probs = logits_processor(state.flat_running_sequences(), log_probs)
                if on_step is not None:
                    on_step(log_probs)
                state.step(log_probs, stop)
                self.stats.steps += 1
        finally:
            self.index.clear()
            self.logits = {}
            if self.drafter is not None:
                self.drafter.clear()
        return state

    def _score(self, state: BeamSearchState, keys: list[Key], prompts, eos: frozenset[int]) -> None:
        """One target pass: every running beam's unseen tokens and its draft tree."""
        scores = state.running_beam_scores.reshape(-1).tolist()
        best: dict[Key, float] = {}
        for k, s in zip(keys, scores):  # identical beams (the first step) are scored once
            best[k] = max(s, best.get(k, float("-inf")))
        roots = list(best)
        depth = self.depth
        if self.chooser is not None:
            depth = self.chooser.choose(
                time.perf_counter(), self.stats.steps, first_pass=self.stats.target_forwards == 0
            )
        # the roots' own logits choose the next step and a depth-j node's the one j steps later: a tree
        # deeper than the steps left minus one is wasted, and its nodes would sit past max_length, where
        # models with learned positions (GPT-2, OPT) have no embedding
        depth = max(0, min(depth, state.max_length - state.cur_len - 1))
        self.cache.ensure_free(len(roots) * blocks_needed(self.cache, self.depth + 1))  # tree paths copied into beams
        seqs, unseen = zip(*self.index.materialize_all(roots, [prompts[k[0]] for k in roots]))
        self.index.clear()  # what the running beams need of the last pass's sequences is now in their own forks
        held = len({b for s in seqs for b in self.cache.block_table(s)})
        self.stats.peak_beam_blocks = max(self.stats.peak_beam_blocks, held)
        if self.drafter is not None and depth > 0:
            trees = self.drafter.trees(
                roots,
                [best[k] for k in roots],
                prompts,
                depth=depth,
                tree_width=self.tree_width or state.num_beams + 2,
                num_beams=state.num_beams,
                eos_token_ids=eos,
            )
            self.stats.draft_forwards = self.drafter.forward_count
        else:
            trees = [TokenTree() for _ in roots]

        rows = [i for i in range(len(roots)) if unseen[i] or len(trees[i])]
        new_logits = {k: self.logits[k] for k, u in zip(roots, unseen) if not u}
        new_nodes: dict[Key, int] = {}
        if rows:
            feeds = [list(unseen[i]) + trees[i].tokens for i in rows]
            t_max = max(len(f) for f in feeds)
            self.cache.ensure_free(sum(blocks_needed(self.cache, len(f)) for f in feeds))
            masks = torch.zeros(len(rows), t_max, t_max, dtype=torch.bool)  # [N, T, T] own order
            depths = torch.zeros(len(rows), t_max, dtype=torch.long)  # [N, T] own order
            for j, (i, f) in enumerate(zip(rows, feeds)):
                masks[j, : len(f), : len(f)] = trees[i].row_mask(len(unseen[i]))
                depths[j, : len(f)] = trees[i].row_depths(len(unseen[i]))
            needed = [len(trees[i]) + (1 if unseen[i] else 0) for i in rows]
            # beams' trees differ in size (most nodes under the best beams): packed where that is cheaper
            row_logits, row_slots = forward_rows(
                self.target, self.cache, [seqs[i] for i in rows], feeds, needed, masks, depths
            )
            self.stats.target_forwards += 1
            self.stats.tree_nodes += sum(len(trees[i]) for i in rows)
            for j, i in enumerate(rows):
                b, gen = roots[i]
                tree, u = trees[i], len(unseen[i])
                first = 0  # this row's needed logits: its root's (when unseen), then every node's
                if u:
                    new_logits[roots[i]] = row_logits[j][first]
                    first += 1
                node_slots = row_slots[j][len(row_slots[j]) - len(tree) :] if len(tree) else []
                for n in range(len(tree)):
                    key = (b, gen + tree.path_tokens(n))
                    new_logits[key] = row_logits[j][first + n]
                    new_nodes[key] = node_slots[n]
        lengths = {k: len(prompts[k[0]]) + len(k[1]) for k in roots}
        self.index.replace({k: (seqs[i], lengths[k]) for i, k in enumerate(roots)}, new_nodes)
        self.logits = new_logits
        used = self.cache.num_usable_blocks - self.cache.num_free_blocks
        self.stats.peak_target_blocks = max(self.stats.peak_target_blocks, used)
        self.stats.records.append(
            {"roots": len(roots), "tree_nodes": [len(t) for t in trees], "step": self.stats.steps, "depth": depth}
        )
