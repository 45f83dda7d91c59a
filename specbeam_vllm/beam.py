"""Exact speculative beam search over vLLM's offline API (``vllm.LLM``).

vLLM's own ``LLM.beam_search`` is a front-end loop: every **beam step** is one engine call (a batch of
``max_tokens=1`` requests, one per running beam, each asking for the target's top ``2 * beam_width``
log-probs), after which every running beam's candidates are scored (``cum_logprob + logprob``),
candidates ending in EOS go to the finished list, and the best ``beam_width`` of the rest, by
``cum_logprob / len(tokens) ** length_penalty``, run on.

:func:`beam_search` gives the same beams with fewer engine calls. One **pass**:

1. **draft**: a draft model runs the same beam search ``num_draft_steps`` levels ahead from the
   running beams of every prompt (draft log-probs, ``draft_width`` beams per prompt kept per level);
   this grows a **draft tree** under every running beam. Every tree node without kept children is a
   **draft path** (root beam + continuation);
2. **score**: one engine call scores every draft path as a prompt with
   ``SamplingParams(max_tokens=1, prompt_logprobs=K, logprobs=K)``, ``K = 2 * beam_width``: the
   prompt log-probs give the target's top-K after every prefix of the path, the sample log-probs
   the top-K after the whole path;
3. **replay**: vLLM's beam step (:func:`replay_step`, a copy of its arithmetic and ordering) runs
   per prompt on those top-K lists for as long as every running beam is a scored prefix. The first
   step that leaves the scored prefixes ends the pass; the next pass drafts from there.

Every decision uses target log-probs only; the draft decides how many beam steps one engine call
covers. The replayed numbers are the ones vLLM's loop sees: prompt and sample log-probs both come
from ``Sampler.compute_logprobs`` (``log_softmax`` in float32 of the same logits) and the same
``topk``; the sample top-K list of a greedy request is the top-K in rank order with the greedy pick
first, which is what :func:`sampled_format` rebuilds from a prompt top-K list. That the two paths
give bit-identical numbers is checked, not assumed: the tests compare every returned top-K list and
cumulative log-prob with ``LLM.beam_search``'s. The greedy pick is known except on an exact tie at
the top: with a 16-bit target it is the lowest tied token id (the CPU greedy kernel returns the first
maximum, and bf16/fp16 logits tie exactly when their log-probs do); otherwise the prefix is marked
**ambiguous** and never replayed, and a prompt whose next step is ambiguous runs an ordinary step
(its running beams scored as they are, which gives the real sampled lists) in the next pass.

Only what vLLM's loop supports at temperature 0 without structured outputs, LoRA or multi-modal
inputs is supported (greedy top-K lists are deterministic; sampled ones are not replayable).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from specbeam_core.vocab import fit_ids, fit_logits

from .vocab import check_draft_vocab

AMBIGUOUS = None  # marker in the scored-prefix map: a top-K list whose order cannot be rebuilt


# ----------------------------------------------------------------------------------------------
# counting engine work


@dataclass
class EngineCounter:
    """Engine calls (``LLM._run_engine``: one batch of requests run to completion) and engine steps
    (``LLMEngine.step``) made while :func:`count_engine_calls` is active."""

    calls: int = 0
    steps: int = 0


@contextmanager
def count_engine_calls(llm: Any) -> Iterator[EngineCounter]:
    """Count ``llm``'s engine calls and engine steps inside the ``with`` block (instance wrappers,
    removed on exit; counters nest)."""
    counter = EngineCounter()
    engine = llm.llm_engine
    run_engine, step = llm._run_engine, engine.step
    wrapped_run, wrapped_step = "_run_engine" in vars(llm), "step" in vars(engine)  # by an outer counter

    def counted_run_engine(*args, **kwargs):
        counter.calls += 1
        return run_engine(*args, **kwargs)

    def counted_step(*args, **kwargs):
        counter.steps += 1
        return step(*args, **kwargs)

    llm._run_engine, engine.step = counted_run_engine, counted_step
    try:
        yield counter
    finally:
        if wrapped_run:
            llm._run_engine = run_engine
        else:
            del llm._run_engine  # back to the class method
        if wrapped_step:
            engine.step = step
        else:
            del engine.step


# ----------------------------------------------------------------------------------------------
# draft model


class HFDraftModel:
    """A HuggingFace causal LM that gives next-token log-probs for batches of token lists (no KV
    cache: the draft is small and its sequences short, so it recomputes them). :func:`beam_search`
    moves it to the engine's device."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.path = path
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(self.device)
        self.own_vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.vocab_size = self.own_vocab_size  # the target's, once match_vocab has seen it
        self.forward_count = 0

    def to(self, device: str | torch.device) -> "HFDraftModel":
        """Move the draft to ``device`` (the engine's: CUDA on a GPU server)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def match_vocab(self, target_vocab: int, target_tokenizer: Any) -> None:
        """Draft for a target of ``target_vocab`` ids (:func:`~specbeam_vllm.vocab.check_draft_vocab`):
        log-probs cut or padded with ``-inf`` to its size, ids past the draft's embedding read as id 0."""
        try:
            target_tokens = target_tokenizer.get_vocab()
        except AttributeError:  # a tokenizer without a vocabulary map: nothing to compare
            target_tokens = None
        check_draft_vocab(self.path, self.own_vocab_size, target_vocab, target_tokens)
        self.vocab_size = target_vocab

    @torch.inference_mode()
    def next_log_probs(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probs of the token after each sequence ``[N, vocab]`` (right padding: causal
        attention keeps pads out of every real position)."""
        self.forward_count += 1
        lengths = torch.tensor([len(s) for s in seqs])  # [N]
        tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)  # [N, T]
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        tokens = fit_ids(tokens, self.own_vocab_size).to(self.device)  # ids only the target has: the draft reads id 0
        hidden = self.model.get_decoder()(input_ids=tokens).last_hidden_state  # [N, T, hidden]
        last = hidden[torch.arange(len(seqs), device=self.device), lengths.to(self.device) - 1]  # [N, hidden]
        logits = self.model.get_output_embeddings()(last).float()  # [N, own]: the head on last positions only
        return torch.log_softmax(fit_logits(logits, self.vocab_size), dim=-1).cpu()  # [N, vocab], for the host replay


_DRAFTS: dict[str, HFDraftModel] = {}


def load_draft(draft: str | HFDraftModel) -> HFDraftModel:
    """A draft model from a folder path (loaded once per process) or as given."""
    if isinstance(draft, HFDraftModel):
        return draft
    if not isinstance(draft, str) or not draft:
        raise ValueError(f"draft must be a model folder path or an HFDraftModel, got {draft!r}")
    if draft not in _DRAFTS:
        _DRAFTS[draft] = HFDraftModel(draft)
    return _DRAFTS[draft]


# ----------------------------------------------------------------------------------------------
# beam state (vLLM's BeamSearchInstance / BeamSearchSequence, kept as vLLM's own classes)


@dataclass
class SearchConfig:
    """The beam search parameters both loops share."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool
    length_penalty: float
    eos_token_id: int | None
    sort_key: Callable[[Any], float]

    @property
    def num_logprobs(self) -> int:
        """Candidates per running beam per step (vLLM: ``2 * beam_width``)."""
        return 2 * self.beam_width


@dataclass
class PromptSearch:
    """One prompt's search: vLLM's ``BeamSearchInstance`` plus the beam steps it has taken."""

    instance: Any  # vllm BeamSearchInstance
    steps: int = 0
    plain_next: bool = False  # the next pass runs an ordinary step (no draft) for this prompt

    def running(self, cfg: SearchConfig) -> bool:
        return bool(self.instance.beams) and self.steps < cfg.max_tokens


def replay_step(search: PromptSearch, top_lists: list[dict], cfg: SearchConfig) -> None:
    """vLLM's beam step for one prompt (``BeamSearchOfflineMixin._beam_search_step``), given the
    top-K list (sample-log-prob format) after each running beam, in beam order."""
    from vllm.entrypoints.generate.beam_search.utils import BeamSearchSequence

    instance = search.instance
    new_beams = []
    for beam, logprobs in zip(instance.beams, top_lists):
        for token_id, logprob_obj in logprobs.items():
            new_beam = BeamSearchSequence(
                beam.orig_prompt,
                tokens=beam.tokens + [token_id],
                logprobs=beam.logprobs + [logprobs],
                lora_request=beam.lora_request,
                cum_logprob=beam.cum_logprob + logprob_obj.logprob,
            )
            if token_id == cfg.eos_token_id and not cfg.ignore_eos:
                instance.completed.append(new_beam)
            else:
                new_beams.append(new_beam)
    instance.beams = sorted(new_beams, key=cfg.sort_key, reverse=True)[: cfg.beam_width]
    search.steps += 1


def sampled_format(prompt_top: dict, k: int, resolve_top_ties: bool = False) -> dict | None:
    """The sample-log-prob top-K list a greedy request would return after this prefix, rebuilt from
    its prompt-log-prob list (``{prompt token, top-K...}``, the prompt token first): the greedy pick
    first, then the top-K in rank order (vLLM's dict keeps a token where it first appears, with its
    top-K rank).

    The greedy pick is the rank-1 token unless the top log-probs tie. On a tie it is the lowest token
    id of the tied set (vLLM's CPU ``greedy_argmax`` and ``torch.argmax`` return the first maximum)
    when ``resolve_top_ties`` and the tied set is all inside the list; otherwise the list is
    ``AMBIGUOUS`` (never replayed)."""
    from vllm.logprobs import Logprob

    top = sorted((lp.rank, tok, lp.logprob) for tok, lp in prompt_top.items() if lp.rank <= k)
    if len(top) < k or [r for r, _, _ in top] != list(range(1, k + 1)):
        return AMBIGUOUS  # not a full top-K list (should not happen): never replay it
    tied = [tok for _, tok, lp in top if lp == top[0][2]]
    if len(tied) > 1:
        if not resolve_top_ties or len(tied) == k:  # the tied set may go on past the list
            return AMBIGUOUS
        first = min(tied)
        top = [t for t in top if t[1] == first] + [t for t in top if t[1] != first]
    return {tok: Logprob(logprob=lp, rank=rank, decoded_token=None) for rank, tok, lp in top}


# ----------------------------------------------------------------------------------------------
# drafting


@dataclass
class DraftNode:
    """A draft tree node: a token sequence (prompt + generated), its draft score, whether it has a
    kept child."""

    tokens: tuple[int, ...]
    cum_logprob: float
    has_child: bool = False


def draft_paths(
    draft: HFDraftModel,
    searches: list[PromptSearch],
    depths: list[int],
    cfg: SearchConfig,
    draft_width: int,
    known: dict[tuple[int, ...], dict | None] | None = None,
    draft_lists: dict[tuple[int, ...], list[tuple[int, float]]] | None = None,
) -> list[list[tuple[int, ...]]]:
    """Per prompt, the draft paths to score: the draft model's beam search (vLLM's step rules on
    draft log-probs, ``draft_width`` beams kept per level) ``depths[i]`` levels from the running
    beams; every tree node without a kept child (running beams included) is one path.

    ``known``: target top-K lists already scored (earlier passes'); a node that has one takes its
    candidates from it (the target's own, exact) instead of from the draft. ``draft_lists``: the
    draft's top-K per node already computed (filled in here)."""
    known = known or {}
    draft_lists = {} if draft_lists is None else draft_lists
    trees: list[list[DraftNode]] = []
    frontiers: list[list[DraftNode]] = []
    for search in searches:
        roots = [DraftNode(tuple(b.tokens), b.cum_logprob) for b in search.instance.beams]
        trees.append(list(roots))
        frontiers.append(roots)
    for level in range(max(depths, default=0)):
        grow = [i for i, f in enumerate(frontiers) if f and level < depths[i]]
        if not grow:
            break
        nodes = [n for i in grow for n in frontiers[i]]
        lists = _candidate_lists(draft, nodes, known, cfg.num_logprobs, draft_lists)
        for i in grow:
            candidates = []
            for node in frontiers[i]:
                for tok, lp in lists[node.tokens]:
                    if tok == cfg.eos_token_id and not cfg.ignore_eos:
                        continue  # a finished candidate needs no next-token list
                    candidates.append((node, DraftNode(node.tokens + (tok,), node.cum_logprob + lp)))
            candidates.sort(key=lambda c: cfg.sort_key(_Scored(c[1])), reverse=True)
            frontiers[i] = []
            for parent, child in candidates[:draft_width]:
                parent.has_child = True
                frontiers[i].append(child)
                trees[i].append(child)
    return [[n.tokens for n in tree if not n.has_child] for tree in trees]


def _candidate_lists(
    draft: HFDraftModel,
    nodes: list[DraftNode],
    known: dict[tuple[int, ...], dict | None],
    k: int,
    draft_lists: dict[tuple[int, ...], list[tuple[int, float]]],
) -> dict[tuple[int, ...], list[tuple[int, float]]]:
    """Each node's top-K (token, log-prob) candidates: the target's where ``known`` has them, else
    the draft model's, from ``draft_lists`` (kept across passes: next pass's trees regrow from this
    pass's nodes) or one forward over the rest."""
    lists: dict[tuple[int, ...], list[tuple[int, float]]] = {}
    for node in nodes:
        top = known.get(node.tokens)
        if top is not None:
            lists[node.tokens] = [(tok, lp.logprob) for tok, lp in top.items()]
        elif node.tokens in draft_lists:
            lists[node.tokens] = draft_lists[node.tokens]
    rest = [n for n in nodes if n.tokens not in lists]
    if rest:
        log_probs = draft.next_log_probs([n.tokens for n in rest])  # [N, vocab]
        top_lp, top_tok = torch.topk(log_probs, k, dim=-1)  # [N, K] each
        for n, lps, toks in zip(rest, top_lp.tolist(), top_tok.tolist()):
            lists[n.tokens] = draft_lists[n.tokens] = list(zip(toks, lps))
    return lists


@dataclass
class _Scored:
    """Adapter so a draft node can be ranked by vLLM's sort key (``tokens``, ``cum_logprob``)."""

    node: DraftNode

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.node.tokens

    @property
    def cum_logprob(self) -> float:
        return self.node.cum_logprob


# ----------------------------------------------------------------------------------------------
# scoring and replay


def score_paths(
    llm: Any,
    paths: list[tuple[int, ...]],
    roots: list[int],
    k: int,
    read_prefix_cache: bool = True,
    stats: SpecBeamStats | None = None,
    resolve_top_ties: bool = False,
) -> dict[tuple[int, ...], dict | None]:
    """One engine call over every draft path; the target's top-K list (sample format) after every
    scored prefix, from each path's root beam (``roots[i]`` tokens) to its end.

    ``read_prefix_cache``: let the requests read the prefix cache (vLLM turns that off for
    prompt-log-prob requests by default). The prompt log-probs of the ``num_cached_tokens`` cached
    positions are then never computed (their rows are left unfilled), so prefixes that end inside
    the cached part are left out: a long prompt is not recomputed for every path."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=k, prompt_logprobs=k, detokenize=False, skip_clone=True,
        skip_reading_prefix_cache=not read_prefix_cache,
        flat_logprobs=True,  # flat lists: no dict per prompt position until one is read
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in paths], sampling_params=params, use_tqdm=False
    )
    scored: dict[tuple[int, ...], dict | None] = {}
    if stats is not None:
        stats.cached_tokens += sum(out.num_cached_tokens or 0 for out in outputs)
    for path, root_len, out in zip(paths, roots, outputs):
        scored[path] = out.outputs[0].logprobs[0]  # the real sample list after the whole path
        # prompt_logprobs[j] comes from the hidden state at position j - 1: computed iff j > cached
        first = max(root_len, (out.num_cached_tokens or 0) + 1 if read_prefix_cache else 0)
        for j in range(first, len(path)):
            prefix = path[:j]
            if scored.get(prefix) is None:  # a real or unambiguous list wins over an ambiguous one
                scored[prefix] = sampled_format(out.prompt_logprobs[j], k, resolve_top_ties)
                if stats is not None and _top_tied(scored[prefix]):
                    stats.top_ties += 1
    return scored


def merge_scored(
    known: dict[tuple[int, ...], dict | None], scored: dict[tuple[int, ...], dict | None]
) -> dict[tuple[int, ...], dict | None]:
    """Earlier passes' top-K lists updated with this pass's; a list never gives way to ``AMBIGUOUS``
    (both are the target's numbers for the same prefix: they can differ only in being rebuilt)."""
    merged = dict(known)
    for key, lst in scored.items():
        if lst is not None or key not in merged:
            merged[key] = lst
    return merged


def _top_tied(top_list: dict | None) -> bool:
    """Whether a rebuilt top-K list has a tie at the top (its greedy pick came from the tie rule)."""
    if top_list is None or len(top_list) < 2:
        return False
    first, second = list(top_list.values())[:2]
    return first.logprob == second.logprob


def replay(search: PromptSearch, scored: dict[tuple[int, ...], dict | None], cfg: SearchConfig) -> int:
    """vLLM's beam steps for one prompt while every running beam has a scored, unambiguous top-K
    list; returns the steps taken."""
    taken = 0
    while search.running(cfg):
        lists = [scored.get(tuple(b.tokens)) for b in search.instance.beams]
        if any(lst is None for lst in lists):
            break
        replay_step(search, lists, cfg)
        taken += 1
    return taken


@dataclass
class SpecBeamStats:
    """What one :func:`beam_search` run did."""

    passes: int = 0
    beam_steps: int = 0  # beam steps replayed, summed over prompts
    scored_paths: int = 0  # requests sent (draft paths)
    cached_tokens: int = 0  # prompt tokens of those requests read from the prefix cache
    top_ties: int = 0  # scored prefixes whose top log-probs tie (greedy pick by the tie rule)
    plain_steps: int = 0  # prompts that ran an ordinary step after an ambiguous or missed prefix
    engine_calls: int = 0
    engine_steps: int = 0
    draft_forwards: int = 0
    draft_seconds: float = 0.0
    wall_seconds: float = 0.0
    steps_per_pass: list[int] = field(default_factory=list)


def _check_inputs(prompts: Sequence[Any], beam_width: int, max_tokens: int, temperature: float) -> None:
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if temperature != 0.0:
        raise ValueError("speculative beam search replays greedy top-K lists: temperature must be 0")
    if not prompts:
        raise ValueError("prompts is empty")
    for p in prompts:
        empty_dict = isinstance(p, dict) and not (p.get("prompt") or p.get("prompt_token_ids"))
        if p is None or (isinstance(p, str) and not p) or empty_dict:
            raise ValueError(f"empty prompt: {p!r}")


def beam_search(
    llm: Any,
    prompts: Sequence[Any],
    beam_width: int,
    max_tokens: int,
    draft: str | HFDraftModel,
    *,
    ignore_eos: bool = False,
    length_penalty: float = 1.0,
    temperature: float = 0.0,
    skip_special_tokens: bool = True,
    num_draft_steps: int = 4,
    draft_width: int | None = None,
    read_prefix_cache: bool = True,
    resolve_top_ties: bool | None = None,
    stats: SpecBeamStats | None = None,
) -> list[Any]:
    """The beams ``llm.beam_search(prompts, BeamSearchParams(beam_width, max_tokens, ...))`` returns
    (vLLM ``BeamSearchOutput`` objects: same sequences, order, cumulative log-probs and top-K lists),
    computed in passes of one engine call each (see the module docstring).

    ``prompts``: strings, ``{"prompt": ...}`` or ``{"prompt_token_ids": [...]}`` as for vLLM.
    ``num_draft_steps``: draft tree depth (beam steps one pass can cover); ``draft_width``: draft
    beams kept per prompt per level (default ``2 * beam_width``). ``read_prefix_cache``: scoring
    requests reuse cached prefix blocks (see :func:`score_paths`). ``resolve_top_ties``: rebuild the
    greedy pick of a tied top from token ids (see :func:`sampled_format`); default: on for 16-bit
    targets, whose logits (bf16/fp16 values) tie exactly when their float32 log-probs do, off for
    others (a tie in log-probs may then hide distinct logits). ``stats`` is filled if given.
    """
    from vllm.entrypoints.generate.beam_search.utils import (
        BeamSearchInstance,
        BeamSearchOutput,
        create_sort_beams_key_function,
    )

    _check_inputs(prompts, beam_width, max_tokens, temperature)
    if num_draft_steps < 0:
        raise ValueError(f"num_draft_steps must be >= 0, got {num_draft_steps}")
    draft_model = load_draft(draft).to(llm.llm_engine.vllm_config.device_config.device)
    width = 2 * beam_width if draft_width is None else draft_width
    if width < 1:
        raise ValueError(f"draft_width must be >= 1, got {width}")
    stats = stats if stats is not None else SpecBeamStats()
    t_start = time.perf_counter()

    tokenizer = llm.renderer.get_tokenizer()
    cfg = SearchConfig(
        beam_width=beam_width,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        length_penalty=length_penalty,
        eos_token_id=tokenizer.eos_token_id,
        sort_key=create_sort_beams_key_function(tokenizer.eos_token_id, length_penalty),
    )
    engine_inputs = llm._preprocess_cmpl(list(prompts))
    for inp in engine_inputs:
        if inp.get("type") != "token" or not inp.get("prompt_token_ids"):
            raise ValueError("only non-empty text or token prompts are supported")
    searches = [PromptSearch(BeamSearchInstance(inp, lora_request=None, logprobs=None)) for inp in engine_inputs]
    model_config = llm.llm_engine.vllm_config.model_config
    draft_model.match_vocab(int(model_config.get_vocab_size()), tokenizer)
    max_len = model_config.max_model_len
    if resolve_top_ties is None:
        resolve_top_ties = model_config.dtype in (torch.bfloat16, torch.float16)

    known: dict[tuple[int, ...], dict | None] = {}  # scored top-K lists still ahead of some beam
    draft_lists: dict[tuple[int, ...], list[tuple[int, float]]] = {}  # the draft's, this search
    with count_engine_calls(llm) as counter:
        while True:
            live = [s for s in searches if s.running(cfg)]
            if not live:
                break
            depths = []
            for s in live:
                longest = max(len(b.tokens) for b in s.instance.beams)
                depth = 0 if s.plain_next else min(num_draft_steps, cfg.max_tokens - s.steps - 1)
                depths.append(max(0, min(depth, max_len - 1 - longest)))
            t_draft = time.perf_counter()
            forwards = draft_model.forward_count
            paths_per_prompt = draft_paths(draft_model, live, depths, cfg, width, known, draft_lists)
            stats.draft_forwards += draft_model.forward_count - forwards
            stats.draft_seconds += time.perf_counter() - t_draft

            paths, roots = [], []
            for s, prompt_paths in zip(live, paths_per_prompt):
                root_len = len(s.instance.beams[0].tokens)  # every running beam has the same length
                paths.extend(prompt_paths)
                roots.extend([root_len] * len(prompt_paths))
            scored = score_paths(
                llm, paths, roots, cfg.num_logprobs, read_prefix_cache, stats, resolve_top_ties
            )
            known = merge_scored(known, scored)
            stats.passes += 1
            stats.scored_paths += len(paths)

            taken = 0
            for s in live:
                stats.plain_steps += s.plain_next
                steps = replay(s, known, cfg)
                s.plain_next = steps == 0
                taken += steps
            stats.beam_steps += taken
            stats.steps_per_pass.append(taken)
            shortest = min((len(s.instance.beams[0].tokens) for s in searches if s.running(cfg)), default=0)
            known = {key: lst for key, lst in known.items() if len(key) >= shortest}  # the rest is behind every beam
    stats.engine_calls += counter.calls
    stats.engine_steps += counter.steps

    outputs = []
    for s in searches:
        instance = s.instance
        instance.completed.extend(instance.beams)
        best = sorted(instance.completed, key=cfg.sort_key, reverse=True)[:beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=skip_special_tokens)
        outputs.append(BeamSearchOutput(sequences=best))
    stats.wall_seconds += time.perf_counter() - t_start
    return outputs
