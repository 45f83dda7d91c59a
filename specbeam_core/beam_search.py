"""Exact speculative beam search.

Plain beam search runs one target forward per step over the ``B`` running beams. Here one target
forward covers several steps:

1. **draft**: from the running beams of every prompt, the draft model runs its own beam search
   ``depth`` levels deep (scores start from the target's running beam scores); at every level the
   best ``tree_width`` (default ``num_beams + 2``) (beam, token) candidates become nodes of a :class:`~specbeam_core.tree.TokenTree`
   under the running beam they descend from, and the best ``num_beams`` of them that are not EOS
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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .beam_state import BeamSearchState
from .kv_cache import PagedKVCache
from .model import CausalLM, build_kv_batch, forward_rows
from .sampling import check_finite
from .tree import TokenTree

Key = tuple[int, tuple[int, ...]]  # (prompt index, generated tokens)


class PrefixIndex:
    """Which KV sequences of one pool hold which token prefixes.

    ``seqs[key] = (seq_id, length)``: the sequence's first ``length`` tokens are the prompt followed by
    ``key``'s generated tokens. ``nodes[key] = slot``: the K/V of ``key``'s last token sits at this
    flat slot (a tree node written after its root's tokens); its parent is ``key`` minus that token.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.seqs: dict[Key, tuple[int, int]] = {}
        self.nodes: dict[Key, int] = {}

    def materialize_all(self, keys: Sequence[Key], prompts: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
        """:meth:`materialize` for every key, the copies (tree-node K/V, copy-on-write) of all of them run
        together. Their sources are slots of this index's sequences, held until :meth:`replace`; their
        destinations lie in the new sequences' own blocks, which nothing else holds: no copy reads
        another's destination."""
        with self.cache.batched_copies():
            return [self.materialize(k, p) for k, p in zip(keys, prompts)]

    def materialize(self, key: Key, prompt: Sequence[int]) -> tuple[int, list[int]]:
        """A new sequence holding the longest known prefix of ``key``; returns it and the tokens it still
        lacks (the tree-node K/V on its path is copied into its own blocks, never recomputed)."""
        b, gen = key
        for i in range(len(gen), -1, -1):
            prefix = (b, gen[:i])
            if prefix in self.seqs or prefix in self.nodes:
                break
        else:  # the prompt ends a block, so beams forked from it never copy its last block
            return self.cache.new_sequence(end_aligned_at=len(prompt)), list(prompt) + list(gen)
        path_slots = []
        while prefix in self.nodes:
            path_slots.append(self.nodes[prefix])
            prefix = (b, prefix[1][:-1])
        base, length = self.seqs[prefix]
        seq = self.cache.fork(base)
        self.cache.truncate(seq, length)
        if path_slots:
            self.cache.copy_slots(path_slots[::-1], self.cache.append_slots(seq, len(path_slots)))
        return seq, list(gen[i:])

    def replace(self, seqs: dict[Key, tuple[int, int]], nodes: dict[Key, int]) -> None:
        """Adopt the new pass's sequences and nodes; release every old sequence."""
        for seq, _ in self.seqs.values():
            self.cache.free(seq)
        self.seqs, self.nodes = seqs, nodes

    def clear(self) -> None:
        self.replace({}, {})


def _blocks(cache: PagedKVCache, tokens: int) -> int:
    return -(-tokens // cache.block_size) + 2  # + a copied-on-write block + a partly filled one


def draft_log_probs(model: CausalLM, cache: PagedKVCache, seqs: list[int], feeds: list[list[int]]) -> torch.Tensor:
    """One draft forward over ragged feeds (the pool grows if it must); log-probs after each row's
    last token ``[N, vocab]``."""
    cache.ensure_free(sum(_blocks(cache, len(f)) for f in feeds))
    t_max = max(len(f) for f in feeds)
    tokens = torch.zeros(len(feeds), t_max, dtype=torch.long)  # [N, T] left-padded
    for i, f in enumerate(feeds):
        tokens[i, t_max - len(f) :] = torch.tensor(f)
    kv = build_kv_batch(cache, seqs, [len(f) for f in feeds], cache.dtype)
    logits = model.forward(tokens, kv, 1)[:, 0]  # [N, vocab]
    check_finite(logits, "draft model logits")
    return torch.log_softmax(logits, dim=-1)


class BeamTreeDrafter:
    """Draft-model beam search that grows one token tree per running target beam."""

    name = "draft_beam_tree"

    def __init__(self, model: CausalLM, block_size: int = 16) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_positions = model.max_positions
        self.cache = model.make_cache(64, block_size)
        self.index = PrefixIndex(self.cache)
        self.log_probs: dict[Key, torch.Tensor] = {}  # draft log-probs after every kept state [vocab]
        self.forward_count = 0
        # the last pass's candidates: per level, per prompt, the keys of its tree nodes, best draft score first
        self.last_levels: list[dict[int, list[Key]]] = []

    def _forward(self, seqs: list[int], feeds: list[list[int]]) -> torch.Tensor:
        self.forward_count += 1
        return draft_log_probs(self.model, self.cache, seqs, feeds)

    def trees(
        self,
        roots: list[Key],
        root_scores: list[float],
        prompts: Sequence[Sequence[int]],
        *,
        depth: int,
        tree_width: int,
        num_beams: int,
        eos_token_ids: frozenset[int],
    ) -> list[TokenTree]:
        trees = [TokenTree() for _ in roots]
        new_seqs: dict[Key, tuple[int, int]] = {}
        new_log_probs: dict[Key, torch.Tensor] = {}

        # root states: reuse the draft K/V (and log-probs) of the last pass, feed the rest
        seqs, feeds = zip(*self.index.materialize_all(roots, [prompts[k[0]] for k in roots]))
        fed = [i for i, f in enumerate(feeds) if f]
        log_probs = [self.log_probs.get(k) for k in roots]
        if fed:
            out = self._forward([seqs[i] for i in fed], [feeds[i] for i in fed])  # [n, vocab]
            for j, i in enumerate(fed):
                log_probs[i] = out[j]
        for i, k in enumerate(roots):
            new_seqs[k] = (seqs[i], len(prompts[k[0]]) + len(k[1]))
            new_log_probs[k] = log_probs[i]

        # frontier entries: (root index, node index or -1, key, draft sequence, log-probs, score)
        frontier = [(i, -1, k, seqs[i], log_probs[i], root_scores[i]) for i, k in enumerate(roots)]
        self.last_levels = []
        for level in range(depth):
            chosen = []  # (frontier entry, token, node, key, score), best first per prompt
            self.last_levels.append({})
            by_prompt: dict[int, list] = {}
            for f in frontier:
                by_prompt.setdefault(f[2][0], []).append(f)
            for b, entries in by_prompt.items():
                scores = torch.stack([f[5] + f[4] for f in entries])  # [F, vocab]
                k = min(tree_width, scores.numel())
                top_scores, top_idx = torch.topk(scores.reshape(-1), k)  # [k]
                for score, flat in zip(top_scores.tolist(), top_idx.tolist()):
                    f = entries[flat // self.vocab_size]
                    token = flat % self.vocab_size
                    node = trees[f[0]].add(token, f[1])
                    chosen.append((f, token, node, (b, f[2][1] + (token,)), score))
                self.last_levels[-1][b] = [c[3] for c in chosen[len(chosen) - k :]]
            if level == depth - 1:
                break
            expand, per_prompt = [], {}
            for c in chosen:
                b = c[3][0]
                if c[1] not in eos_token_ids and per_prompt.get(b, 0) < num_beams:
                    per_prompt[b] = per_prompt.get(b, 0) + 1
                    expand.append(c)
            if not expand:
                break
            child_seqs = [self.cache.fork(c[0][3]) for c in expand]
            out = self._forward(child_seqs, [[c[1]] for c in expand])  # [n, vocab]
            frontier = []
            for j, (f, token, node, key, score) in enumerate(expand):
                frontier.append((f[0], node, key, child_seqs[j], out[j], score))
                new_seqs[key] = (child_seqs[j], len(prompts[key[0]]) + len(key[1]))
                new_log_probs[key] = out[j]
        self.index.replace(new_seqs, {})
        self.log_probs = new_log_probs
        return trees

    def clear(self) -> None:
        self.index.clear()
        self.log_probs = {}
        self.last_levels = []


class DepthChooser:
    """How many levels to draft ahead in each pass: the depth with the fewest measured seconds per
    beam step. Depth 0 is plain beam search on the paged cache (one step per pass), so speculation
    never stays on where it costs more than it saves: how far the draft's trees reach and what a tree
    token costs on this hardware decide.

    A measurement runs from one pass to the next (the pass and the steps it covered); the first pass
    of a search (the prompt's prefill) is not measured. Measurements are kept per *workload* (the
    key :meth:`begin_search` is given: prompts x beams and whether a logits processor runs), since
    what pays at one prompt and four beams does not at sixteen rows; within a workload each depth is
    tried ``trials`` times, deepest first, then the cheapest is kept. Older measurements of a depth
    weigh ``decay`` times less with each new one, and every ``explore_every`` passes the depth
    measured longest ago is tried once more: a choice made on a cold start, or under a load that has
    since changed, is revisited rather than kept for good.
    """

    def __init__(self, max_depth: int, trials: int = 2, decay: float = 0.97, explore_every: int = 16) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if explore_every < 1:
            raise ValueError(f"explore_every must be at least 1, got {explore_every}")
        self.depths = list(range(max_depth + 1))
        self.trials, self.decay, self.explore_every = trials, decay, explore_every
        self.workloads: dict[object, _DepthRecord] = {}
        self._record = _DepthRecord(self.depths)  # until the first begin_search names a workload
        self._open: tuple[int, float, int] | None = None  # (depth, started, steps before)

    def _record_for(self, workload: object) -> "_DepthRecord":
        if workload not in self.workloads:
            self.workloads[workload] = _DepthRecord(self.depths)
        return self.workloads[workload]

    # the current workload's measurements (decayed seconds and steps, raw pass counts)
    @property
    def seconds(self) -> dict[int, float]:
        return self._record.seconds

    @property
    def steps(self) -> dict[int, float]:
        return self._record.steps

    @property
    def passes(self) -> dict[int, int]:
        return self._record.passes

    def begin_search(self, workload: object = None) -> None:
        self._open = None
        self._record = self._record_for(workload)

    def best(self) -> int:
        r = self._record
        return min(self.depths, key=lambda d: r.seconds[d] / max(r.steps[d], 1e-9) if r.passes[d] else float("inf"))

    def choose(self, now: float, steps_so_far: int, first_pass: bool) -> int:
        r = self._record
        if self._open is not None:
            d, started, before = self._open
            r.seconds[d] = r.seconds[d] * self.decay + (now - started)
            r.steps[d] = r.steps[d] * self.decay + (steps_so_far - before)
            r.passes[d] += 1
            r.last_measured[d] = r.clock
        r.clock += 1
        untried = [d for d in self.depths if r.passes[d] < self.trials]
        if untried:
            depth = untried[-1]
        else:
            depth = self.best()
            r.since_explore += 1
            if r.since_explore >= self.explore_every and len(self.depths) > 1:
                r.since_explore = 0
                depth = min((d for d in self.depths if d != depth), key=lambda d: r.last_measured[d])
        self._open = None if first_pass else (depth, now, steps_so_far)
        return depth


@dataclass
class _DepthRecord:
    """One workload's measurements for :class:`DepthChooser`."""

    depths: list[int]
    seconds: dict[int, float] = field(init=False)  # decayed sum of measured seconds
    steps: dict[int, float] = field(init=False)  # decayed sum of beam steps covered in them
    passes: dict[int, int] = field(init=False)  # measurements taken
    last_measured: dict[int, int] = field(init=False)  # the pass count when each depth was last measured
    clock: int = 0
    since_explore: int = 0

    def __post_init__(self) -> None:
        self.seconds = {d: 0.0 for d in self.depths}
        self.steps = {d: 0.0 for d in self.depths}
        self.passes = {d: 0 for d in self.depths}
        self.last_measured = {d: -1 for d in self.depths}


@dataclass
class BeamStats:
    """Target passes against beam steps: ``steps / target_forwards`` is the speed-up in target passes."""

    steps: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    tree_nodes: int = 0
    peak_target_blocks: int = 0  # blocks in use after a pass, trees included
    peak_beam_blocks: int = 0  # distinct blocks the running beams hold between passes (shared prefixes once)
    records: list[dict] = field(default_factory=list)

    @property
    def steps_per_target_forward(self) -> float:
        return self.steps / self.target_forwards if self.target_forwards else 0.0

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "tree_nodes": self.tree_nodes,
            "steps_per_target_forward": self.steps_per_target_forward,
            "peak_target_blocks": self.peak_target_blocks,
            "peak_beam_blocks": self.peak_beam_blocks,
        }


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
        if drafter is not None and drafter.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft and target vocabularies differ: draft has {drafter.vocab_size} tokens, "
                f"target has {target.vocab_size}; speculative beam search needs one shared vocabulary "
                "(a draft with the target's tokenizer and an embedding padded to another size, as Qwen2.5 0.5B-7B "
                "against 14B+: wrap it in specbeam_core.VocabResizedDraft, or pass SpecBeam(draft, vocab_size=...))"
            )
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"tree depth must be an integer >= 1, got {depth!r}")
        if tree_width is not None and (isinstance(tree_width, bool) or not isinstance(tree_width, int) or tree_width < 1):
            raise ValueError(f"tree_width must be an integer >= 1, got {tree_width!r}")
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
            raise ValueError(
                f"prompt + new tokens = {longest} exceeds the models' position limit of {limit} tokens"
            )
        eos = frozenset(int(e) for e in eos_token_ids)
        state = BeamSearchState(
            padded, num_beams, max_length, length_penalty=length_penalty, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences, num_eos_tokens=len(eos), fill_value=fill_value,
            do_sample=do_sample, sample_device=sample_device, draw=draw,
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
            depth = self.chooser.choose(time.perf_counter(), self.stats.steps, first_pass=self.stats.target_forwards == 0)
        # the roots' own logits choose the next step and a depth-j node's the one j steps later: a tree
        # deeper than the steps left minus one is wasted, and its nodes would sit past max_length, where
        # models with learned positions (GPT-2, OPT) have no embedding
        depth = max(0, min(depth, state.max_length - state.cur_len - 1))
        self.cache.ensure_free(len(roots) * _blocks(self.cache, self.depth + 1))  # tree paths copied into beams
        seqs, unseen = zip(*self.index.materialize_all(roots, [prompts[k[0]] for k in roots]))
        self.index.clear()  # what the running beams need of the last pass's sequences is now in their own forks
        held = len({b for s in seqs for b in self.cache.block_table(s)})
        self.stats.peak_beam_blocks = max(self.stats.peak_beam_blocks, held)
        if self.drafter is not None and depth > 0:
            trees = self.drafter.trees(
                roots, [best[k] for k in roots], prompts, depth=depth,
                tree_width=self.tree_width or state.num_beams + 2, num_beams=state.num_beams, eos_token_ids=eos,
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
            self.cache.ensure_free(sum(_blocks(self.cache, len(f)) for f in feeds))
            masks = torch.zeros(len(rows), t_max, t_max, dtype=torch.bool)  # [N, T, T] own order
            depths = torch.zeros(len(rows), t_max, dtype=torch.long)  # [N, T] own order
            for j, (i, f) in enumerate(zip(rows, feeds)):
                masks[j, : len(f), : len(f)] = trees[i].row_mask(len(unseen[i]))
                depths[j, : len(f)] = trees[i].row_depths(len(unseen[i]))
            needed = [len(trees[i]) + (1 if unseen[i] else 0) for i in rows]
            # beams' trees differ in size (most nodes under the best beams): packed where that is cheaper
            row_logits, row_slots = forward_rows(self.target, self.cache, [seqs[i] for i in rows], feeds, needed, masks, depths)
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
