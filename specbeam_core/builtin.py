"""Built-in plugin: the draft-model drafter and the default draft-length policy."""

from __future__ import annotations

from typing import Any

from .drafting import DraftModelDrafter
from .hookspecs import hookimpl


@hookimpl
def specbeam_drafter_names() -> list[str]:
    return [DraftModelDrafter.name]


@hookimpl(trylast=True)
def specbeam_make_drafter(name: str, options: dict[str, Any]):
    if name != DraftModelDrafter.name:
        return None
    if options.get("model") is None:
        raise ValueError(
            "the draft_model drafter needs a draft model: pass SpecBeam(draft_model, ...) "
            "(core: options['model'], a CausalLM)"
        )
    return DraftModelDrafter(options["model"], block_size=options.get("block_size", 16))


@hookimpl(trylast=True)
def specbeam_draft_length(requests, default: int) -> int:
    return default
