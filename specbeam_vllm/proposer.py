"""specbeam as a vLLM speculative proposer (``method: custom_class``).

vLLM constructs the class with its ``VllmConfig`` and, after every step, calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)``:

- ``sampled_token_ids``: per batch row, the tokens this step committed (accepted drafts plus the
  recovered or bonus token); empty for rows still in prefill.
- ``num_tokens_no_spec`` [max_num_reqs] and ``token_ids_cpu`` [max_num_reqs, max_model_len]: every
  row's verified tokens.

The draft model runs through :class:`specbeam_core.DraftModelDrafter` on its own paged KV cache.
Rows are matched to per-request draft states by vLLM's request ids where the runner hook passes them
(one dict probe a row), else by their tokens (:mod:`specbeam_vllm.rows`); each step
the drafter keeps the longest prefix of its cache that still agrees with the row (rejected drafts
roll back, accepted tokens are never recomputed) and feeds only the tokens it has not seen. States
no row claims for ``UNCLAIMED_STEPS`` steps are freed, and so is a state whose request vLLM reports
finished (when the runner hook in :mod:`specbeam_vllm.runner_hooks` is installed). The pool is
bounded; when it is full, idle states are evicted first and rows that still do not fit draft nothing.
What the draft catches up in one step is bounded too (``max_catch_up_tokens``): rows whose unseen
tokens do not fit are caught up over the next steps and draft nothing until they are.
In steps where the draft-length policy gives the draft model nothing (large batches), rows whose
last tokens occurred before get prompt-lookup drafts instead (``lookup_draft_tokens``; no draft
forward), while their acceptance, over the batch and per request, stays above
``lookup_min_acceptance`` (:class:`specbeam_vllm.policy.LookupGate`).

Each request gets its own draft generator, seeded from a stream seeded by the configuration (never
by the process), so every tensor-parallel rank proposes the same drafts.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from specbeam_core import DraftModelDrafter, Request, SamplingParams, VocabResizedDraft, get_plugin_manager
from specbeam_core.engine import check_draft_length
from specbeam_core.hookspecs import PROJECT
from specbeam_core.prompt_lookup import lookup_drafts

from .cpu_gemm import use_vllm_cpu_gemm
from .options import SpecBeamVllmOptions, catch_up_budget, parse_options
from .vocab import check_draft_vocab, tokenizer_vocab
from .policy import BatchSizePolicy, LookupGate
from .rows import DraftState, RowMatcher

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours

UNCLAIMED_STEPS = 2  # free a state after this many steps in which no row claimed it
STATS_INTERVAL_S = 0.25  # stats_file: at most one write per this many seconds while requests run
# counters["propose_ms_histogram"][i]: proposals that took under PROPOSE_MS_BUCKETS[i] ms (and not under
# the bucket before); the last entry counts the rest (a reader diffs two snapshots for a stretch's spread)
PROPOSE_MS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def load_draft(options: SpecBeamVllmOptions, dtype: torch.dtype, target_tokenizer: str | None, target_vocab: int,
               on_cpu: bool = False):
    """Load the draft with transformers' ``from_pretrained`` and check it can draft for the target."""
    from transformers import AutoModelForCausalLM

    from specbeam_hf.fast_draft import draft_causal_lm

    if options.dtype is not None:
        dtype = getattr(torch, options.dtype)
    model = AutoModelForCausalLM.from_pretrained(options.draft, dtype=dtype).eval()
    if on_cpu and options.vllm_cpu_gemm:
        use_vllm_cpu_gemm(model)
    draft = draft_causal_lm(model)
    target_tokens = tokenizer_vocab(target_tokenizer) if target_tokenizer is not None else None
    check_draft_vocab(options.draft, draft.vocab_size, target_vocab, target_tokens)
    if draft.vocab_size < target_vocab:  # logits padded with -inf, ids past its embedding fed as id 0
        draft = VocabResizedDraft(draft, target_vocab)
    return draft


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no vLLM, or no distributed state (unit tests): a single rank
        return 0


class SpecBeamProposer:
    """vLLM ``custom_class`` proposer: a draft model on specbeam_core's paged KV cache."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        model_config = vllm_config.model_config
        self.options = parse_options(getattr(vllm_config, "additional_config", None))
        self.num_speculative_tokens = check_draft_length(spec.num_speculative_tokens, "num_speculative_tokens")
        self.max_model_len = int(model_config.max_model_len)
        self.max_num_seqs = int(vllm_config.scheduler_config.max_num_seqs)
        self.vocab_size = int(model_config.get_vocab_size())
        seed = self.options.seed if self.options.seed is not None else (model_config.seed or 0)
        self._seeds = np.random.default_rng(seed)  # per-request draft seeds; the same on every rank
        self.pm = get_plugin_manager(load_entrypoints=False)
        self._batch_policy = BatchSizePolicy(self.options.full_draft_max_batch, self.options.no_draft_min_batch)
        self.pm.register(self._batch_policy, name="specbeam-vllm-batch-policy")
        self.pm.load_setuptools_entrypoints(PROJECT)  # registered later, so called before the batch policy
        on_cpu = getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu") == "cpu"
        # the target's dtype, as vLLM's draft_model: alone, a small float32 draft runs about as fast as a
        # bfloat16 one on the CPU, but next to the target's forward (which evicts it from cache) each
        # proposal re-reads its weights, and there bfloat16 took 4.2 ms against 5.6 (BENCHMARKS.md)
        draft = load_draft(self.options, model_config.dtype, getattr(model_config, "tokenizer", None), self.vocab_size,
                           on_cpu=on_cpu)
        if draft.max_positions is not None and draft.max_positions < self.max_model_len:
            raise ValueError(
                f"draft model {self.options.draft!r} handles {draft.max_positions} positions but --max-model-len "
                f"is {self.max_model_len}; lower --max-model-len or use a draft with a longer context")
        self.drafter = DraftModelDrafter(draft, block_size=self.options.block_size,
                                         confidence_threshold=self.options.confidence_threshold,
                                         max_catch_up_tokens=catch_up_budget(self.options, on_cpu,
                                                                             vllm_config.scheduler_config))
        # a draft with a padded vocabulary must never propose (or put probability on) ids the target lacks
        self._vocab_mask = None if draft.vocab_size == self.vocab_size else self._mask_padded_ids
        slots = self.options.draft_kv_tokens or self.max_num_seqs * (self.max_model_len + self.options.block_size)
        self.drafter.reserve(1, slots)  # one bounded pool of ceil(slots / block_size) + 2 blocks
        self.cache = self.drafter.cache
        self.baseline_free_blocks = self.cache.num_free_blocks
        self.matcher = RowMatcher()
        self._by_req_id: dict[str, DraftState] = {}  # vLLM request id -> its state (runner hook installed)
        self._next_id = 0
        self.step = 0
        self.rank = _tensor_parallel_rank()
        self._stats_written = float("-inf")  # time.monotonic() of the last stats_file write
        self._digest = hashlib.sha256()  # of every proposal and draft distribution: equal on all TP ranks
        self.counters = {"proposals": 0, "draft_rows": 0, "drafted_tokens": 0, "states_created": 0,
                         "states_freed": 0, "rows_skipped_pool_full": 0, "rows_waiting_for_catch_up": 0,
                         "sampled_draft_rows": 0, "lookup_steps": 0, "lookup_rows": 0, "lookup_tokens": 0,
                         "lookup_accepted": 0, "propose_seconds": 0.0,
                         "propose_ms_histogram": [0] * (len(PROPOSE_MS_BUCKETS) + 1)}
        # set by the runner hook before each propose() (specbeam_vllm.runner_hooks), else None
        self.batch_req_ids: list[str] | None = None
        self.batch_params: list[SamplingParams] | None = None
        self._last_draft_probs: torch.Tensor | None = None
        self.lookup_gate = LookupGate(self.options.lookup_min_acceptance)
        self._lookup_pending = 0  # lookup draft tokens proposed by the last call, judged by the next
        self._lookup_by_req: dict[str, int] = {}  # the same per vLLM request id (runner hook installed)
        self._lookup_gates: dict[str, LookupGate] = {}  # vLLM request id -> its own lookup gate
        from .runner_hooks import install as install_runner_hooks

        self.runner_hooks = install_runner_hooks()
        logger.info("specbeam proposer: draft %s, γ=%d, draft KV pool %d blocks of %d tokens, runner hooks: %s",
                    self.options.draft, self.num_speculative_tokens, self.cache.num_usable_blocks,
                    self.options.block_size, self.runner_hooks)

    # vLLM's CPU runner calls load_model(target) on every drafter; the draft was loaded in __init__
    # so that a bad draft stops start-up with its own message.
    def load_model(self, target_model: Any = None) -> None:
        return None

    # ------------------------------------------------------------------ state
    def _new_state(self, tokens: np.ndarray) -> DraftState:
        self._next_id += 1
        seed = int(self._seeds.integers(0, 2**62))
        request = Request(request_id=self._next_id, prompt=tokens.tolist(), params=SamplingParams(seed=seed),
                          max_new_tokens=self.max_model_len)
        state = DraftState(request=request, anchor=tokens.copy(), last_claimed=self.step)
        self.matcher.add(state)
        self.counters["states_created"] += 1
        return state

    def _free(self, state: DraftState) -> None:
        self.matcher.remove(state)
        if state.req_id is not None and self._by_req_id.get(state.req_id) is state:
            del self._by_req_id[state.req_id]
        self.drafter.release(state.request)
        self.counters["states_freed"] += 1

    def finish_requests(self, req_ids) -> None:
        """Free the states of requests vLLM reports finished or aborted (called by the runner hook)."""
        if not req_ids:
            return
        freed = 0
        for req_id in req_ids:
            self._lookup_gates.pop(req_id, None)
            state = self._by_req_id.get(req_id)
            if state is not None:
                self._free(state)
                freed += 1
        if freed:
            self._write_stats(force=len(self.matcher) == 0)  # the last state gone: a reader sees it at once

    def _make_room(self, blocks: int, keep: set[int]) -> bool:
        """Evict states not claimed this step (oldest first) until ``blocks`` are free."""
        if self.cache.num_free_blocks >= blocks:
            return True
        idle = sorted((s for s in self.matcher.states() if id(s) not in keep), key=lambda s: s.last_claimed)
        for state in idle:
            self._free(state)
            if self.cache.num_free_blocks >= blocks:
                return True
        return False

    # ---------------------------------------------------------------- propose
    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **_: Any) -> list[list[int]]:
        started = time.perf_counter()
        try:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        finally:
            took = time.perf_counter() - started
            self.counters["propose_seconds"] += took
            self.counters["propose_ms_histogram"][bisect.bisect_right(PROPOSE_MS_BUCKETS, 1000 * took)] += 1
            self._write_stats()

    def _propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[list[int]]:
        self.step += 1
        self._last_draft_probs = None
        n_rows = len(sampled_token_ids)
        if self._lookup_pending:  # this step verified the last step's lookup drafts (and no others)
            self._judge_lookups(sampled_token_ids)
        if self._batch_policy_decides() and \
                self._batch_policy.length(sum(1 for t in sampled_token_ids if t), self.num_speculative_tokens) == 0:
            return self._lookup(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)  # without the hook's per-row view
        rows = {i: np.asarray(token_ids_cpu[i, : int(num_tokens_no_spec[i])])
                for i in range(n_rows) if sampled_token_ids[i]}  # decoding rows -> [num_tokens]
        proposals: list[list[int]] = [[] for _ in range(n_rows)]
        order = sorted(rows)
        as_lists = {i: rows[i].tolist() for i in order}
        if rows:
            greedy = SamplingParams()
            placeholders = [Request(request_id=-1, prompt=as_lists[i], params=greedy, max_new_tokens=1,
                                    tokens=as_lists[i])
                            for i in order]  # what the draft-length hook sees (read-only): one per decoding row
            gamma = self.pm.hook.specbeam_draft_length(requests=placeholders, default=self.num_speculative_tokens)
            gamma = check_draft_length(gamma, "draft length chosen by the specbeam_draft_length hook", allow_zero=True)
            gamma = min(gamma, self.num_speculative_tokens)  # vLLM takes at most num_speculative_tokens per row
            if gamma == 0:  # no draft-model drafts this step; states stay as they are (no matching cost)
                return self._lookup(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        matched = self._match(rows)
        for state in matched.values():
            state.last_claimed = self.step
        for state in self.matcher.states():
            if self.step - state.last_claimed >= UNCLAIMED_STEPS:
                self._free(state)  # finished, preempted or aborted without notice
        if not rows:
            return proposals
        requests, draft_rows, num_draft = [], [], []
        claimed = {id(s) for s in matched.values()}
        pending = 0  # blocks the rows taken so far this step will allocate when the drafter runs
        for i in order:
            tokens = rows[i]
            g = min(gamma, self.max_model_len - len(tokens) - 1)
            if g <= 0:
                continue
            state = matched.get(i)
            short = self.cache.blocks_needed(len(tokens) + g) if state is None else \
                self.drafter.blocks_short(state.request, len(tokens) + g)
            if not self._make_room(pending + short, claimed):
                self.counters["rows_skipped_pool_full"] += 1
                continue
            pending += short
            if state is None:
                state = self._new_state(tokens)
                claimed.add(id(state))
            if self.batch_req_ids is not None and i < len(self.batch_req_ids) and state.req_id is None:
                state.req_id = self.batch_req_ids[i]
                self._by_req_id[state.req_id] = state
            request = state.request
            request.tokens = as_lists[i]
            request.params = self._row_params(i, request.params.seed)
            request.logits_processor = self._vocab_mask
            if not request.params.greedy and request.generator is None:
                request.generator = request.params.make_generator()
            requests.append(request)
            draft_rows.append(i)
            num_draft.append(g)
        if not requests:
            return proposals

        draft = self.drafter.propose(requests, num_draft)
        tokens_out = draft.tokens.tolist()  # [n, G]
        for j, i in enumerate(draft_rows):
            proposals[i] = tokens_out[j][: draft.num_draft[j]]
        if draft.probs is not None:
            self._last_draft_probs = self._probs_for_vllm(n_rows, draft_rows, draft)
        if self.options.stats_file:
            self._digest.update(repr(proposals).encode())
            if self._last_draft_probs is not None:
                self._digest.update(self._last_draft_probs.numpy().tobytes())
        self.counters["proposals"] += 1
        self.counters["draft_rows"] += len(draft_rows)
        self.counters["drafted_tokens"] += sum(draft.num_draft)
        self.counters["rows_waiting_for_catch_up"] += sum(1 for n in draft.num_draft if n == 0)
        return proposals

    def _lookup(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[list[int]]:
        """Prompt-lookup drafts (``lookup_draft_tokens`` each) for decoding rows whose last tokens occurred
        before: a step where the draft model does not pay may still gain from drafts that cost nothing."""
        n_rows = len(sampled_token_ids)
        proposals: list[list[int]] = [[] for _ in range(n_rows)]
        k = min(self.options.lookup_draft_tokens, self.num_speculative_tokens)
        decoding = [i for i in range(n_rows) if sampled_token_ids[i]]
        if k == 0 or not decoding or not self.lookup_gate.open():
            return proposals
        lengths = torch.as_tensor(np.asarray(num_tokens_no_spec[:n_rows], dtype=np.int64))[decoding]  # [rows]
        width = int(lengths.max())
        tokens = torch.as_tensor(np.asarray(token_ids_cpu[:n_rows, :width], dtype=np.int64))[decoding]  # [rows, width]
        drafts, num = lookup_drafts(tokens, lengths, k, self.options.lookup_min_ngram, self.options.lookup_max_ngram)
        room = (self.max_model_len - 1 - lengths).clamp(min=0)  # [rows] verified tokens must fit the context
        num = torch.minimum(num, room).tolist()
        drafts = drafts.tolist()
        ids = self.batch_req_ids
        for j, i in enumerate(decoding):
            if num[j] and ids is not None and i < len(ids):
                if not self._request_gate(ids[i]).open():
                    num[j] = 0  # this request's lookups have not paid lately
                else:
                    self._lookup_by_req[ids[i]] = num[j]
            if num[j]:
                proposals[i] = drafts[j][: num[j]]
        self._lookup_pending = sum(num)
        if self.options.stats_file:
            self._digest.update(repr(proposals).encode())
        self.counters["lookup_steps"] += 1
        self.counters["lookup_rows"] += sum(1 for n in num if n)
        self.counters["lookup_tokens"] += self._lookup_pending
        return proposals

    def _request_gate(self, req_id: str) -> LookupGate:
        gate = self._lookup_gates.get(req_id)
        if gate is None:
            if len(self._lookup_gates) >= 4 * self.max_num_seqs:  # requests gone without a finish report
                live = set(self.batch_req_ids or ())
                self._lookup_gates = {r: g for r, g in self._lookup_gates.items() if r in live}
            # quick to close and to probe again: a request's text may repeat only after its first lines
            gate = self._lookup_gates[req_id] = LookupGate(self.options.lookup_min_acceptance, decay=0.7,
                                                           min_evidence=4.0, probe_every=4)
        return gate

    def _judge_lookups(self, sampled_token_ids) -> None:
        """Count the last step's lookup tokens that this step accepted: a row commits its accepted
        drafts plus one token. By request where the ids are known (rows may have moved, finished or
        been preempted since), else over the whole batch (the last step drafted by lookup alone)."""
        ids = self.batch_req_ids
        if self._lookup_by_req and ids is not None:
            drafted = accepted = 0
            for i, req_id in enumerate(ids[: len(sampled_token_ids)]):
                d = self._lookup_by_req.get(req_id)
                if d:
                    a = min(max(len(sampled_token_ids[i]) - 1, 0), d)
                    self._request_gate(req_id).record(d, a)
                    drafted, accepted = drafted + d, accepted + a
        else:
            drafted = self._lookup_pending
            accepted = min(sum(len(t) - 1 for t in sampled_token_ids if t), drafted)
        self.lookup_gate.record(drafted, accepted)
        self.counters["lookup_accepted"] += accepted
        self._lookup_pending = 0
        self._lookup_by_req = {}

    def _match(self, rows: dict[int, np.ndarray]) -> dict[int, DraftState]:
        """Each row's state: by vLLM's request id where the runner hook gave the batch's ids (the state
        must still be a prefix of the row), by tokens for the rest among states that have no id."""
        ids = self.batch_req_ids
        if ids is None:
            return self.matcher.match(rows)
        found: dict[int, DraftState] = {}
        rest: dict[int, np.ndarray] = {}
        for i, tokens in rows.items():
            state = self._by_req_id.get(ids[i]) if i < len(ids) else None
            if state is not None and state.extended_by(tokens):
                found[i] = state
            else:
                rest[i] = tokens
        if rest and len(self._by_req_id) < len(self.matcher):  # states made before ids were known
            found.update(self.matcher.match(rest, eligible=lambda s: s.req_id is None))
        return found

    def _batch_policy_decides(self) -> bool:
        """True when the built-in batch policy answers the draft-length hook (no plugin answers first)."""
        first = [impl for impl in self.pm.hook.specbeam_draft_length.get_hookimpls() if not impl.trylast]
        return len(first) == 1 and first[0].plugin is self._batch_policy

    def _row_params(self, row: int, seed: int | None) -> SamplingParams:
        """The row's sampling parameters for the draft, or greedy where vLLM cannot take draft probs."""
        if not self.options.sample_drafts or self.batch_params is None or row >= len(self.batch_params):
            return SamplingParams(seed=seed)
        p = self.batch_params[row]
        return SamplingParams(do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                              seed=seed)

    def _probs_for_vllm(self, n_rows: int, draft_rows: list[int], draft) -> torch.Tensor:
        """Draft probabilities in vLLM's row order, [batch_rows, γ, vocab]; one-hot for greedy rows."""
        g_max = self.num_speculative_tokens
        probs = torch.zeros(n_rows, g_max, self.vocab_size)  # [batch_rows, γ, vocab]
        for j, i in enumerate(draft_rows):
            g = draft.num_draft[j]
            q = draft.probs[j, :g, : self.vocab_size]  # [g, vocab]
            if float(q.sum()) == 0.0:  # greedy row: its drafts are argmax tokens, verified as one-hot
                probs[i, torch.arange(g), draft.tokens[j, :g]] = 1.0
            else:
                probs[i, :g] = q
                self.counters["sampled_draft_rows"] += 1
        return probs

    def _mask_padded_ids(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Logits processor for a padded draft: ids past the target's vocabulary get -inf."""
        logits = logits.clone()  # [positions, draft_vocab]
        logits[..., self.vocab_size:] = float("-inf")
        return logits

    def take_last_draft_probs(self) -> torch.Tensor | None:
        """The probabilities of the last proposal's sampled drafts (vLLM's draft-model interface)."""
        probs, self._last_draft_probs = self._last_draft_probs, None
        return probs

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        used = self.cache.num_usable_blocks - self.cache.num_free_blocks
        return {"rank": self.rank, "proposal_digest": self._digest.hexdigest(), "states": len(self.matcher), "used_blocks": used, "free_blocks": self.cache.num_free_blocks,
                "baseline_free_blocks": self.baseline_free_blocks, "total_blocks": self.cache.num_usable_blocks,
                "step": self.step, "lookup_acceptance": self.lookup_gate.rate, **self.counters}

    def _write_stats(self, force: bool = False) -> None:
        """Write the counters to ``stats_file`` at most every ``STATS_INTERVAL_S`` (a file per engine step,
        or per finished request, costs a busy server throughput: at 16 requests in flight one finishes
        about every step), and at once when the last state is freed, so a reader sees the final
        counters and blocks as soon as its requests are done."""
        path = self.options.stats_file
        if not path:
            return
        now = time.monotonic()
        if not force and now - self._stats_written < STATS_INTERVAL_S:
            return
        self._stats_written = now
        path = path.replace("{rank}", str(self.rank))
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".specbeam-stats-")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.stats(), fh)
        os.replace(tmp, path)
