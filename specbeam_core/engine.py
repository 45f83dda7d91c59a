"""The speculative decoding loop: draft → verify → commit, over a ragged batch of requests.

One step, for every unfinished request at once::

    gamma  = hook specbeam_draft_length(...)           # how far to speculate (0 = plain decoding)
    draft  = drafter.propose(requests, gamma)          # up to gamma tokens per row (+ their q)
    logits = target.forward(unseen tokens + draft)     # ONE target pass, [N, gamma + 1, vocab]
    result = verify(draft, logits)                     # accepted drafts + recovered/bonus token
    commit: roll back the target's rejected slots, append the tokens, stop on EOS/length/stop

The target's KV cache always holds every token but the last, so the next step feeds the last
token followed by the new drafts; a request's first step feeds its whole prompt (prefill and
the first verification share one pass). Rows stop independently; finished or aborted requests
free their blocks at once.
"""

from __future__ import annotations

import itertools
import time
import weakref
from typing import Callable, Iterable, Sequence

import pluggy
import torch

from .checks import check_int, check_same_vocab
from .drafting import Drafter, is_tree_drafter
from .kv_cache import PagedKVCache
from .model import CausalLM, build_kv_batch, forward_rows, left_pad
from .plugins import get_plugin_manager
from .processing import apply_logits_processors
from .request import LogitsProcessor, Request
from .sampling import SamplingParams, check_finite, probabilities, probabilities_per_row, warp_logits
from .stats import SpecStats, StepRecord
from .tree_verification import verify_tree_greedy, verify_tree_rejection_sampling
from .verification import VerifyResult, verify_greedy, verify_rejection_sampling


def check_draft_length(value, what: str = "num_draft_tokens", allow_zero: bool = False) -> int:
    return check_int(value, what, 0 if allow_zero else 1)


def _unregister(pm: pluggy.PluginManager, plugin) -> None:
    if pm.is_registered(plugin):
        pm.unregister(plugin)


_request_ids = itertools.count()  # unique across engines: drafters may be shared


class SpecEngine:
    """Exact speculative decoding of a target :class:`CausalLM` with a :class:`Drafter`.

    Not thread-safe: one thread drives an engine (``add``, ``step``, ``abort``); its requests share
    each step."""

    def __init__(
        self,
        target: CausalLM,
        drafter: Drafter | None = None,
        num_draft_tokens: int = 4,
        *,
        block_size: int = 16,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.num_draft_tokens = check_draft_length(num_draft_tokens)
        if drafter is not None:
            check_same_vocab(drafter.vocab_size, target.vocab_size)
        self.block_size = block_size
        self.pm = plugin_manager or get_plugin_manager()
        self.stats = SpecStats(source=id(self))
        self.pm.register(self.stats)
        weakref.finalize(self, _unregister, self.pm, self.stats)  # the stats observer leaves with the engine
        self.target_cache: PagedKVCache | None = None
        self._requests: dict[int, Request] = {}
        self._steps = 0
        # request id -> (raw logits, scores) of its output tokens this step
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ requests
    @property
    def max_positions(self) -> int | None:
        limits = [m for m in (self.target.max_positions, getattr(self.drafter, "max_positions", None)) if m]
        return min(limits) if limits else None

    def make_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 32,
        eos_token_ids: Iterable[int] = (),
        stop: Callable[[list[int]], bool] | None = None,
        logits_processor: LogitsProcessor | None = None,
        record_scores: bool = False,
        batch_logits_processor=None,
        batch_stop=None,
    ) -> Request:
        """Validate and build a request (not yet scheduled). ``record_scores``: keep the raw logits
        and the scores of every emitted token (``Request.raw_logits`` / ``Request.scores``).
        ``batch_logits_processor``: the ``logits_processor`` for many positions of the requests that
        share it in one call (:mod:`specbeam_core.processing`). ``batch_stop``: shown, once per step,
        the tokens of all the requests that share it before they are appended, so that ``stop`` can
        answer from one judgement of them all (``Request.batch_stop``)."""
        prompt = [int(t) for t in prompt]
        if len(prompt) == 0:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        vocab = self.target.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        check_int(max_new_tokens, "max_new_tokens")
        limit = self.max_positions
        if limit is not None and len(prompt) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {len(prompt) + max_new_tokens} "
                f"exceeds the models' position limit of {limit} tokens"
            )
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        request = Request(
            request_id=next(_request_ids),
            prompt=prompt,
            params=params,
            max_new_tokens=max_new_tokens,
            eos_token_ids=frozenset(int(e) for e in eos_token_ids),
            stop=stop,
            logits_processor=logits_processor,
            batch_logits_processor=batch_logits_processor if logits_processor is not None else None,
            batch_stop=batch_stop if stop is not None else None,
            generator=None if params.greedy else params.make_generator(),
            record_scores=record_scores,
        )
        return request

    def _tokens_per_sequence(self, request: Request) -> int:
        # a pass appends the drafts (a chain of num_draft_tokens, or every node of a tree) and one more
        trees = is_tree_drafter(self.drafter)
        drafted = max(self.num_draft_tokens, self.drafter.max_tree_nodes(self.num_draft_tokens) if trees else 0)
        return len(request.prompt) + request.max_new_tokens + drafted + 1

    def reserve(self, requests: Sequence[Request]) -> None:
        """Size the KV pools for these requests together with every request already added.

        Pools grow in place (live sequences keep their blocks), so requests can join between steps.
        """
        live = list(self._requests.values()) + [r for r in requests if r.request_id not in self._requests]
        longest = max(self._tokens_per_sequence(r) for r in live)
        blocks = len(live) * (-(-longest // self.block_size)) + 2
        if self.target_cache is None:
            self.target_cache = self.target.make_cache(blocks, self.block_size)
        else:
            self.target_cache.grow(blocks)
        if self.drafter is not None:
            self.drafter.reserve(len(live), longest)

    def add(self, request: Request) -> Request:
        """Schedule ``request`` (from :meth:`make_request`); it joins at the next :meth:`step`."""
        self.reserve([request])
        request.target_seq = self.target_cache.new_sequence()
        self._requests[request.request_id] = request
        return request

    def abort(self, request: Request) -> None:
        if not request.finished:
            request.finish_reason = "abort"
        self._release(request)

    def _release(self, request: Request) -> None:
        if self._requests.pop(request.request_id, None) is None:
            return
        if request.target_seq is not None:
            self.target_cache.free(request.target_seq)
            request.target_seq = None
        if self.drafter is not None:
            self.drafter.release(request)
        self.pm.hook.specbeam_on_request_finished(request=request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ one step
    def _draft_lengths(self, requests: list[Request]) -> list[int]:
        if self.drafter is None:
            return [0] * len(requests)
        gamma = self.pm.hook.specbeam_draft_length(requests=requests, default=self.num_draft_tokens)
        gamma = check_draft_length(gamma, "draft length chosen by the specbeam_draft_length hook", allow_zero=True)
        return [max(0, min(gamma, r.remaining - 1)) for r in requests]

    @staticmethod
    def _process_chains(requests: list[Request], drafted: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """Apply each row's logits processor at its positions ``0 .. len(drafted[i])`` of ``logits``
        ``[N, G + 1, vocab]`` (position k after the row's tokens and its first k drafts), all rows in
        one :func:`apply_logits_processors`; positions past a short draft are never read and stay raw."""
        at = [
            (i, k) for i, r in enumerate(requests) if r.logits_processor is not None for k in range(len(drafted[i]) + 1)
        ]
        contexts = [requests[i].tokens + drafted[i][:k] for i, k in at]
        if len(at) == logits.shape[0] * logits.shape[1]:  # every position of every row: processed as one flat view
            flat = logits.reshape(len(at), logits.shape[-1])  # [N * (G + 1), vocab], row-major like ``at``
            return apply_logits_processors([requests[i] for i, _ in at], contexts, flat).reshape(logits.shape)
        rows, cols = torch.tensor([i for i, _ in at]), torch.tensor([k for _, k in at])  # [E], [E]
        processed = logits.clone()  # [N, G + 1, vocab]
        processed[rows, cols] = apply_logits_processors([requests[i] for i, _ in at], contexts, logits[rows, cols])
        return processed

    @staticmethod
    def _process_trees(requests: list[Request], trees, row_logits) -> list[torch.Tensor]:
        """Each row's logits processor at its root and every node (after the node's path), all rows
        in one :func:`apply_logits_processors`; ``row_logits[i]`` is ``[len(trees[i]) + 1, vocab]``."""
        rows = [i for i, r in enumerate(requests) if r.logits_processor is not None]
        if not rows:
            return list(row_logits)
        contexts = [
            requests[i].tokens + list(trees[i].path_tokens(j)) if j >= 0 else requests[i].tokens
            for i in rows
            for j in range(-1, len(trees[i]))
        ]
        owners = [requests[i] for i in rows for _ in range(len(trees[i]) + 1)]
        flat = apply_logits_processors(owners, contexts, torch.cat([row_logits[i] for i in rows]))  # [E, vocab]
        processed = list(row_logits)
        for i, part in zip(rows, flat.split([len(trees[i]) + 1 for i in rows])):
            processed[i] = part
        return processed

    def _verify(self, requests, draft_tokens, num_draft, probs_q, logits) -> VerifyResult:
        """Greedy rows by argmax, sampled rows by exact rejection sampling; results in row order."""
        n_rows = len(requests)
        greedy_rows = [r for r in range(n_rows) if requests[r].params.greedy]
        sample_rows = [r for r in range(n_rows) if not requests[r].params.greedy]
        parts: dict[int, tuple[int, list[int], bool]] = {}
        if greedy_rows:
            idx = torch.tensor(greedy_rows)
            res = verify_greedy(draft_tokens[idx], [num_draft[r] for r in greedy_rows], logits[idx])
            for j, r in enumerate(greedy_rows):
                parts[r] = (res.num_accepted[j], res.output_tokens[j], res.bonus[j])
        if sample_rows:
            idx = torch.tensor(sample_rows)
            target_probs = probabilities_per_row(logits[idx], [requests[r].params for r in sample_rows])  # [n, G+1, V]
            res = verify_rejection_sampling(
                draft_tokens[idx],
                [num_draft[r] for r in sample_rows],
                target_probs,
                None if probs_q is None else probs_q[idx],
                [requests[r].generator for r in sample_rows],
            )
            for j, r in enumerate(sample_rows):
                parts[r] = (res.num_accepted[j], res.output_tokens[j], res.bonus[j])
        return VerifyResult(
            num_accepted=[parts[r][0] for r in range(n_rows)],
            output_tokens=[parts[r][1] for r in range(n_rows)],
            bonus=[parts[r][2] for r in range(n_rows)],
        )

    def _chain_pass(self, requests: list[Request], num_draft: list[int]) -> tuple[VerifyResult, list[list[int]]]:
        """Draft chains, score them in one target pass, verify, roll back the rejected slots."""
        g_max = max(num_draft)
        if g_max > 0:
            draft = self.drafter.propose(requests, num_draft)
            draft_tokens, probs_q = draft.tokens, draft.probs  # [N, G], [N, G, vocab] | None
            num_draft = [min(g, d) for g, d in zip(num_draft, draft.num_draft)]  # a drafter may stop early
            g_max = max(num_draft)
            draft_tokens = draft_tokens[:, :g_max]
            probs_q = None if probs_q is None else probs_q[:, :g_max]
        else:
            draft_tokens, probs_q = torch.zeros(len(requests), 0, dtype=torch.long), None  # [N, 0]
        drafted = [draft_tokens[i, : num_draft[i]].tolist() for i in range(len(requests))]

        # one target pass over every row's unseen tokens and drafts
        feeds = [r.tokens[r.target_len :] + drafted[i] for i, r in enumerate(requests)]
        tokens = left_pad(feeds)  # [N, T]
        kv = build_kv_batch(
            self.target_cache, [r.target_seq for r in requests], [len(f) for f in feeds], self.target_cache.dtype
        )
        logits = self.target.forward(tokens, kv, g_max + 1)  # [N, G + 1, vocab], row r's last num_draft[r] + 1 useful
        if min(num_draft) < g_max:  # align each row's useful logits to start at column 0
            shift = torch.tensor([g_max - g for g in num_draft])[:, None]  # [N, 1]
            cols = (shift + torch.arange(g_max + 1)[None, :]).clamp(max=g_max)  # [N, G + 1]
            logits = logits.gather(1, cols[:, :, None].expand(-1, -1, logits.shape[-1]))
        check_finite(logits, "target model logits")
        raw = logits  # [N, G + 1, vocab]
        if any(r.logits_processor is not None for r in requests):
            logits = self._process_chains(requests, drafted, logits)

        result = self._verify(requests, draft_tokens, num_draft, probs_q, logits)
        for i, r in enumerate(requests):
            self.target_cache.rollback(r.target_seq, num_draft[i] - result.num_accepted[i])
            r.target_len = len(r.tokens) + result.num_accepted[i]
            if r.record_scores:  # output token k was chosen at position k
                k = len(result.output_tokens[i])
                self._pending[r.request_id] = (raw[i, :k], logits[i, :k])
        return result, drafted

    def _tree_pass(self, requests: list[Request], depths: list[int]) -> tuple[VerifyResult, list[list[int]]]:
        """Draft token trees, score them in one target pass, verify, keep only the accepted path's K/V."""
        trees = self.drafter.propose_trees(requests, depths)
        unseen = [r.tokens[r.target_len :] for r in requests]
        feeds = [u + t.tokens for u, t in zip(unseen, trees)]
        t_max = max(len(f) for f in feeds)
        masks = torch.zeros(len(requests), t_max, t_max, dtype=torch.bool)  # [N, T, T] each row's own order
        positions = torch.zeros(len(requests), t_max, dtype=torch.long)  # [N, T] each row's own order
        for i, f in enumerate(feeds):
            masks[i, : len(f), : len(f)] = trees[i].row_mask(len(unseen[i]))
            positions[i, : len(f)] = trees[i].row_depths(len(unseen[i]))
        needed = [len(t) + 1 for t in trees]  # the root's logits (after the last unseen token), then every node's
        row_logits, row_slots = forward_rows(
            self.target, self.target_cache, [r.target_seq for r in requests], feeds, needed, masks, positions
        )

        processed = self._process_trees(requests, trees, row_logits)
        accepted, outputs, bonus = [], [], []
        for i, (r, tree) in enumerate(zip(requests, trees)):
            n = len(tree)
            raw, row = row_logits[i], processed[i]  # [n + 1, vocab]: root, then node j at j + 1
            if r.params.greedy:
                res = verify_tree_greedy(tree, row)
            else:
                res = verify_tree_rejection_sampling(tree, probabilities(row, r.params), r.generator)
            # move the accepted path's K/V next to the sequence (node j of the path -> tree slot j), drop the rest
            node_slots = row_slots[i][len(row_slots[i]) - n :] if n else []
            path = res.accepted_nodes
            if r.record_scores:  # the first output token was chosen at the root, the next ones at the accepted nodes
                at = torch.tensor([0] + [j + 1 for j in path])
                self._pending[r.request_id] = (raw[at], row[at])
            self.target_cache.copy_slots([node_slots[j] for j in path], node_slots[: len(path)])
            self.target_cache.rollback(r.target_seq, n - len(path))
            r.target_len = len(r.tokens) + len(path)
            accepted.append(len(path))
            outputs.append(res.output_tokens)
            bonus.append(res.bonus)
        return VerifyResult(num_accepted=accepted, output_tokens=outputs, bonus=bonus), [t.tokens for t in trees]

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, list[int]]]:
        """One draft → verify → commit step; returns each request's newly emitted tokens."""
        requests = [r for r in self._requests.values() if not r.finished]
        if not requests:
            return []
        started = time.perf_counter()
        draft_forwards_before = self.drafter.forward_count if self.drafter is not None else 0

        num_draft = self._draft_lengths(requests)
        self._pending.clear()  # nothing left over from a step that raised before its commit
        if max(num_draft) > 0 and is_tree_drafter(self.drafter):
            result, drafted = self._tree_pass(requests, num_draft)
        else:
            result, drafted = self._chain_pass(requests, num_draft)

        # commit
        self._judge_stops(requests, result.output_tokens)
        emitted_all: list[list[int]] = []
        events: list[tuple[Request, list[int]]] = []
        for i, r in enumerate(requests):
            emitted: list[int] = []
            if r.record_scores:
                raw, chosen_from = self._pending.pop(r.request_id)
                if not r.params.greedy:  # the scores sampled from: after temperature / top-k / top-p
                    chosen_from = warp_logits(chosen_from, r.params)
            for j, token in enumerate(result.output_tokens[i]):
                if r.record_scores:  # recorded before append, so that a stop callback sees this token's scores
                    r.raw_logits.append(raw[j].clone())
                    r.scores.append(chosen_from[j].clone())
                emitted.append(token)
                if r.append(token):
                    break
            emitted_all.append(emitted)
            events.append((r, emitted))

        self._steps += 1
        self.pm.hook.specbeam_on_step(
            record=StepRecord(
                source=id(self),
                step=self._steps,
                request_ids=[r.request_id for r in requests],
                num_drafted=[len(d) for d in drafted],
                num_accepted=result.num_accepted,
                bonus=[b and len(d) > 0 for b, d in zip(result.bonus, drafted)],
                drafted_tokens=drafted,
                emitted_tokens=emitted_all,
                draft_forwards=(self.drafter.forward_count if self.drafter is not None else 0) - draft_forwards_before,
                target_forwards=1,
                seconds=time.perf_counter() - started,
            )
        )
        for r in requests:
            if r.finished:
                self._release(r)
        return events

    @staticmethod
    def _judge_stops(requests: list[Request], outputs: list[list[int]]) -> None:
        """Hand each shared ``batch_stop`` the tokens its requests are about to append, in one call
        before any is appended; each request's ``stop`` is still asked after every token it appends."""
        groups: dict[int, tuple[Callable, list[tuple[Request, list[int]]]]] = {}
        for r, tokens in zip(requests, outputs):
            if r.batch_stop is not None and r.stop is not None and tokens:
                groups.setdefault(id(r.batch_stop), (r.batch_stop, []))[1].append((r, list(tokens)))
        for judge, rows in groups.values():
            judge(rows)

    # ------------------------------------------------------------------ whole runs
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        max_new_tokens: int = 32,
        eos_token_ids: Iterable[int] = (),
        stop: Callable[[list[int]], bool] | None = None,
        logits_processor: LogitsProcessor | None = None,
        on_tokens: Callable[[Request, list[int]], None] | None = None,
        batch_logits_processor=None,
        batch_stop=None,
    ) -> list[Request]:
        """Run requests to completion. Every block is freed on return, also on error or abort.
        ``batch_logits_processor``: ``logits_processor`` for many positions in one call
        (:mod:`specbeam_core.processing`).
        ``batch_stop``: judges a step's tokens of all rows for ``stop`` in one call (``Request.batch_stop``)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        eos = tuple(eos_token_ids)
        requests = [
            self.make_request(
                p,
                sp,
                max_new_tokens,
                eos,
                stop,
                logits_processor,
                batch_logits_processor=batch_logits_processor,
                batch_stop=batch_stop,
            )
            for p, sp in zip(prompts, params)
        ]
        self.reserve(requests)
        for r in requests:
            self.add(r)
        try:
            while any(not r.finished for r in requests):
                for request, new_tokens in self.step():
                    if on_tokens is not None and new_tokens:
                        on_tokens(request, new_tokens)
        finally:
            for r in requests:
                self.abort(r)
        return requests
