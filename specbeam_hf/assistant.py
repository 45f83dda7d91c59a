"""``SpecBeam``: the assistant object handed to ``model.generate``."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

from specbeam_core import (
    AdaptiveDraftLength,
    BeamTreeDrafter,
    SpecBeamSearch,
    SpecEngine,
    SpecStats,
    VocabResizedDraft,
    get_plugin_manager,
    make_drafter,
)
from specbeam_core.checks import check_int

from .fast_draft import draft_causal_lm
from .runner import HFCausalLM


class SpecBeam:
    """A draft model (or any drafter plugin) that speeds up a target's ``generate`` exactly.

    ``SpecBeam(draft_model, num_draft_tokens=4)``; ``last_stats`` holds the statistics of the
    most recent ``generate`` call (acceptance rate, mean accepted length, forward counts, and a
    per-step record). The paged KV pools persist between calls and are sized on demand.

    Options: ``drafter`` (``"draft_model"``: chains, the default; ``"draft_tree"``: token trees;
    ``"multi_draft"``: several draft models' trees merged, chosen by default when ``draft_model`` is a
    list), ``confidence_threshold`` (chains: stop a row's draft after a token the draft gives less
    than this probability, default 0 = always draft ``num_draft_tokens``), ``tree_width`` (top tokens
    offered per tree node, default 3), ``tree_budget`` (tree nodes
    per request and step, default width × depth), ``prompt_lookup`` (trees: merge a branch drafted by
    prompt lookup into every tree, no draft forward; default False; ``drafter="prompt_lookup"`` alone
    drafts chains by prompt lookup with no draft model); ``num_draft_tokens`` is the chain length or
    the tree depth.
    With ``num_beams > 1``: ``beam_depth`` (levels drafted ahead at most, default 3),
    ``beam_candidates`` (draft candidates per level and prompt, default ``num_beams + 2``) and
    ``beam_adaptive`` (default True: each pass drafts the depth, 0 .. ``beam_depth``, that has cost
    the fewest seconds per beam step so far, measured per workload — prompts x beams, processors or
    not — and revisited every 16 passes: ``specbeam_core.beam_search.DepthChooser``; False: always
    ``beam_depth``);
    ``last_beam_stats`` then holds steps per target pass. ``block_size``: KV block size (16).
    ``adaptive_draft`` (default False; greedy and sampling): each step drafts the length, 0 ..
    ``num_draft_tokens``, that has cost the fewest seconds per emitted token so far, measured per
    batch size and whether logits processors run, and revisited every 16 steps; 0 is plain
    decoding, so speculation turns itself off where it loses (``specbeam_core.AdaptiveDraftLength``).
    It explores every length twice per workload first, which a short single call pays for.
    ``kv_blocks_in_use()`` counts the KV blocks held in its pools (``kv_pools()``): 0 between calls.
    ``vocab_size`` (default None: the draft's own, which must be the target's): the target's vocabulary
    size, for a draft that shares the target's tokenizer but whose embedding is padded to another size
    (Qwen2.5 0.5B-7B: 151,936 rows, 14B and up: 152,064): ``SpecBeam(draft, vocab_size=target.config.vocab_size)``.
    The draft's logits are cut or padded with ``-inf`` to that size (it never proposes an id the other
    lacks) and an id past its embedding is fed to it as id 0; outputs stay the target's
    (:class:`specbeam_core.VocabResizedDraft`).
    ``draft_dtype`` (``"bfloat16"``, ``"float16"``, ``"float32"`` or a ``torch.dtype``; default None:
    the draft's own): run the drafts on a copy of their weights in this dtype, the models passed in
    are left as they are. A float32 target with a bfloat16 draft is the fast pairing on CPUs with
    bfloat16 matrix units (AVX512-BF16, AMX; measured in BENCHMARKS.md); outputs stay exactly the target's, since
    every draft token is verified against the target and sampled drafts against the very
    probabilities they were drawn from. The copy costs the draft's size in the new dtype.

    Threads: one ``generate`` call at a time uses a ``SpecBeam`` (its engines and KV pools are
    stateful); calls from other threads that share it wait for it. Give each thread its own
    ``SpecBeam`` (the draft model may be shared) to run them side by side.
    """

    _OPTIONS = {
        "block_size",
        "drafter",
        "plugin_manager",
        "confidence_threshold",
        "tree_width",
        "tree_budget",
        "beam_depth",
        "beam_candidates",
        "beam_adaptive",
        "prompt_lookup",
        "draft_dtype",
        "vocab_size",
        "adaptive_draft",
    }

    def __init__(self, draft_model=None, num_draft_tokens: int = 4, **options: Any) -> None:
        unknown = sorted(set(options) - self._OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown SpecBeam option(s): {', '.join(unknown)}; known: {', '.join(sorted(self._OPTIONS))}"
            )
        check_int(num_draft_tokens, "num_draft_tokens")
        self.num_draft_tokens = num_draft_tokens
        self.in_use = threading.Lock()  # held by the generate call running on this assistant
        self.in_use_by: int | None = None  # the thread (ident) holding it
        self.block_size = int(options.get("block_size", 16))
        self.drafter_name = options.get("drafter", "draft_model")
        self.pm = options.get("plugin_manager") or get_plugin_manager()
        self.adaptive_draft = None
        if options.get("adaptive_draft"):  # chains and trees: the length (0 = none) measured cheapest per token
            self.adaptive_draft = AdaptiveDraftLength(num_draft_tokens)
            self.pm.register(self.adaptive_draft)
        drafts = (
            list(draft_model)
            if isinstance(draft_model, (list, tuple))
            else []
            if draft_model is None
            else [draft_model]
        )
        draft_dtype = _dtype(options.get("draft_dtype"))
        if draft_dtype is not None:
            if not drafts:
                raise ValueError("draft_dtype sets the dtype of the draft model, but no draft model was given")
            drafts = [_in_dtype(d, draft_dtype) for d in drafts]
        self.draft_dtype = draft_dtype
        self.drafts = [draft_causal_lm(d) for d in drafts]  # lean forward for llama-shaped drafts
        vocab_size = options.get("vocab_size")
        if vocab_size is not None:
            if not drafts:
                raise ValueError("vocab_size resizes the draft model's vocabulary, but no draft model was given")
            self.drafts = [d if d.vocab_size == vocab_size else VocabResizedDraft(d, vocab_size) for d in self.drafts]
        self.draft = self.drafts[0] if self.drafts else None
        tree_options = {
            k: options[k]
            for k in ("tree_width", "tree_budget", "confidence_threshold", "prompt_lookup")
            if k in options
        }
        if isinstance(draft_model, (list, tuple)):
            tree_options["models"] = self.drafts
        if len(self.drafts) > 1 and self.drafter_name == "draft_model":
            self.drafter_name = "multi_draft"
        if options.get("prompt_lookup") and self.drafter_name not in ("draft_tree", "multi_draft"):
            raise ValueError(
                f"prompt_lookup=True merges a lookup branch into token trees, but drafter={self.drafter_name!r} drafts "
                "chains: use drafter='draft_tree' (or several draft models), "
                "or drafter='prompt_lookup' for lookup chains"
            )
        if self.draft is None and self.drafter_name in _MODEL_DRAFTERS:
            raise ValueError(f"the {self.drafter_name} drafter needs a draft model: pass SpecBeam(draft_model, ...)")
        self.drafter = make_drafter(
            self.pm, self.drafter_name, model=self.draft, block_size=self.block_size, **tree_options
        )
        self.beam_depth = options.get("beam_depth", 3)
        self.beam_candidates = options.get("beam_candidates")
        self.beam_adaptive = bool(options.get("beam_adaptive", True))
        self._engines: "weakref.WeakKeyDictionary[Any, SpecEngine]" = weakref.WeakKeyDictionary()
        self._beam_searchers: "weakref.WeakKeyDictionary[Any, SpecBeamSearch]" = weakref.WeakKeyDictionary()
        self._beam_drafter: BeamTreeDrafter | None = None
        self.last_stats: SpecStats | None = None
        self.last_beam_stats = None
        for name, value, low in (("beam_depth", self.beam_depth, 1), ("beam_candidates", self.beam_candidates, 1)):
            if name == "beam_candidates" and value is None:  # default: num_beams + 2
                continue
            check_int(value, name, low)

    def engine_for(self, target_model) -> SpecEngine:
        """The engine (and its KV pools) that speeds up ``target_model``; made on first use."""
        engine = self._engines.get(target_model)
        if engine is None:
            with _vocab_hint():
                engine = SpecEngine(
                    HFCausalLM(target_model),
                    self.drafter,
                    self.num_draft_tokens,
                    block_size=self.block_size,
                    plugin_manager=self.pm,
                )
            self._engines[target_model] = engine
        return engine

    def kv_pools(self) -> list:
        """Every paged KV pool this assistant holds (``specbeam_core.PagedKVCache``): each target's
        engine and beam search pool, and the drafts' pools; each once."""
        pools, seen = [], set()

        def add(pool) -> None:
            if pool is not None and id(pool) not in seen:
                seen.add(id(pool))
                pools.append(pool)

        drafters = [self.drafter, self._beam_drafter]
        for engine in list(self._engines.values()):
            add(engine.target_cache)
            drafters.append(engine.drafter)
        for searcher in list(self._beam_searchers.values()):
            add(searcher.cache)
        for drafter in drafters:
            for part in getattr(drafter, "drafters", [drafter]):  # merged drafts: each one's pool
                add(getattr(part, "cache", None))
        return pools

    def kv_blocks_in_use(self) -> int:
        """KV blocks held in all of :meth:`kv_pools`: 0 between ``generate`` calls (every block of a
        finished, failed or aborted call goes back to its pool)."""
        return sum(pool.num_usable_blocks - pool.num_free_blocks for pool in self.kv_pools())

    @classmethod
    def for_draft(cls, draft_model) -> "SpecBeam":
        """The assistant for ``generate(..., assistant_model=draft)`` (HF's own spelling): one
        ``SpecBeam(draft)`` with default options, kept on the draft model so that its engines and KV
        pools are reused by the next call."""
        if isinstance(draft_model, SpecBeam):
            return draft_model
        if not isinstance(draft_model, torch.nn.Module):
            raise ValueError(
                f"assistant_model must be a draft model (or a specbeam_hf.SpecBeam), got {type(draft_model).__name__}"
            )
        slot = draft_model.__dict__.setdefault("_specbeam_assistant", _AssistantSlot())
        if slot.assistant is None:
            slot.assistant = cls(draft_model)
        return slot.assistant

    def beam_searcher_for(self, target_model) -> SpecBeamSearch:
        """The speculative beam search (and its KV pools) for ``target_model``; made on first use."""
        searcher = self._beam_searchers.get(target_model)
        if searcher is None:
            if self._beam_drafter is None and self.draft is not None:
                self._beam_drafter = BeamTreeDrafter(self.draft, block_size=self.block_size)
            with _vocab_hint():
                searcher = SpecBeamSearch(
                    HFCausalLM(target_model),
                    self._beam_drafter,
                    depth=self.beam_depth,
                    tree_width=self.beam_candidates,
                    block_size=self.block_size,
                    adaptive=self.beam_adaptive,
                )
            self._beam_searchers[target_model] = searcher
        return searcher


_MODEL_DRAFTERS = {"draft_model", "draft_tree", "multi_draft"}  # the built-in drafters that run a draft model


@contextmanager
def _vocab_hint():
    """The core's vocabulary-mismatch error, with this adapter's spelling of the fix."""
    try:
        yield
    except ValueError as exc:
        if not str(exc).startswith("draft and target vocabularies differ"):
            raise
        raise ValueError(f"{exc}; with specbeam_hf: SpecBeam(draft, vocab_size=target.config.vocab_size)") from None


class _AssistantSlot:
    """Holds the ``SpecBeam`` made for ``assistant_model=draft``, on the draft model. A copy or a
    pickle of the draft (``copy.deepcopy``, ``torch.save``) gets an empty slot: the assistant's
    lock, engines and KV pools stay with the original."""

    def __init__(self) -> None:
        self.assistant: SpecBeam | None = None

    def __deepcopy__(self, memo) -> "_AssistantSlot":
        return _AssistantSlot()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.assistant = None


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(value) -> torch.dtype | None:
    """``draft_dtype`` as a torch dtype (None: keep the draft's own)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"draft_dtype must be one of {', '.join(_DTYPES)} (or the torch dtype), got {value!r}")


def _in_dtype(model, dtype: torch.dtype):
    """``model`` itself if it already runs in ``dtype``, else a copy of it in ``dtype``: made as
    ``from_pretrained(..., dtype=dtype)`` makes it (the class built from the config in ``dtype``, then
    the weights loaded into it), so buffers kept in float32 stay so (a rotary embedding's ``inv_freq``:
    ``model.to(dtype)`` would round it and shift every position's angle)."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"draft_dtype needs a transformers PreTrainedModel draft, got {type(model).__name__}")
    if model.dtype == dtype:
        return model
    converted = type(model)._from_config(model.config, dtype=dtype)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"cannot copy {type(model).__name__} into {dtype}: weights missing {missing}, unexpected {unexpected}"
        )
    return converted.to(model.device).eval()
