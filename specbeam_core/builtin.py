"""Built-in plugin: the draft-model, tree and prompt-lookup drafters and the default draft-length policy."""

from __future__ import annotations

from typing import Any

from .drafting import DraftModelDrafter
from .drafting_tree import DraftTreeDrafter, MergedTreeDrafter
from .hookspecs import hookimpl
from .prompt_lookup import PromptLookupDrafter


@hookimpl
def specbeam_drafter_names() -> list[str]:
    return [DraftModelDrafter.name, DraftTreeDrafter.name, MergedTreeDrafter.name, PromptLookupDrafter.name]


def _tree_drafter(model, options: dict[str, Any]) -> DraftTreeDrafter:
    return DraftTreeDrafter(
        model, width=options.get("tree_width", 3), budget=options.get("tree_budget"),
        block_size=options.get("block_size", 16),
    )


@hookimpl(trylast=True)
def specbeam_make_drafter(name: str, options: dict[str, Any]):
    if name == DraftTreeDrafter.name:
        if options.get("model") is None:
            raise ValueError("the draft_tree drafter needs a draft model: options['model'], a CausalLM")
        tree = _tree_drafter(options["model"], options)
        return MergedTreeDrafter([tree, PromptLookupDrafter()]) if options.get("prompt_lookup") else tree
    if name == MergedTreeDrafter.name:
        models = options.get("models") or []
        if len(models) < 1:
            raise ValueError("the multi_draft drafter needs draft models: options['models'], a list of CausalLMs")
        lookup = [PromptLookupDrafter()] if options.get("prompt_lookup") else []  # a branch copied from the request
        return MergedTreeDrafter([_tree_drafter(m, options) for m in models] + lookup)
    if name == PromptLookupDrafter.name:  # no model: drafts copied from the request's own tokens
        return PromptLookupDrafter(min_ngram=options.get("min_ngram", 2), max_ngram=options.get("max_ngram", 4))
    if name != DraftModelDrafter.name:
        return None
    if options.get("model") is None:
        raise ValueError(
            "the draft_model drafter needs a draft model: options['model'], a CausalLM"
        )
    return DraftModelDrafter(
        options["model"], block_size=options.get("block_size", 16),
        confidence_threshold=options.get("confidence_threshold", 0.0),
    )


@hookimpl(trylast=True)
def specbeam_draft_length(requests, default: int) -> int:
    return default
