"""RoPE that switches with the sequence length: ``longrope`` (Phi-3 / Phi-3.5 128k, Phi-3.5-MoE).

A longrope model has two sets of RoPE frequencies. HF picks one per forward, from that forward's
largest position: the short set while the sequence is at most ``original_max_position_embeddings``
tokens long, the long set past it (for a batch, the padded length decides). Phi-3 also drops its
cache at the step that crosses over and recomputes every position with the long set.

A specbeam pass differs from HF's steps in two ways. Its draft tokens sit ahead of the sequence. A
row can also run in a forward without the longer rows of its batch, once those have finished. So
the choice made per forward would not be HF's. :func:`rope_pinned` pins, for the whole generate
call, the set that HF uses at every one of its steps. It refuses a call whose steps would cross
over, because HF changes every cached key at that step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Switch:
    """One longrope frequency set of ``module`` (``layer_type``: the set of that layer type, or None)."""

    module: nn.Module
    layer_type: str | None
    original_max: int

    @property
    def prefix(self) -> str:
        return "" if self.layer_type is None else f"{self.layer_type}_"

    @property
    def params(self) -> dict:
        return _rope_params(self.module, self.layer_type)


def _rope_params(module: nn.Module, layer_type: str | None) -> dict:
    """The rope parameters HF's own frequency update reads ``original_max_position_embeddings`` from."""
    params = module.config.rope_parameters
    return params if layer_type is None else params[layer_type]


def longrope_switches(model: nn.Module) -> list[_Switch]:
    """The longrope frequency sets of ``model``'s rotary embeddings (empty for every other RoPE)."""
    switches = []
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        by_layer = (
            {None: rope_type} if isinstance(rope_type, str) else dict(rope_type) if isinstance(rope_type, dict) else {}
        )
        for layer_type, kind in by_layer.items():
            if kind == "longrope":
                original_max = int(_rope_params(module, layer_type)["original_max_position_embeddings"])
                switches.append(_Switch(module, layer_type, original_max))
    return switches


def _long_frequencies(switch: _Switch) -> torch.Tensor:
    """The long ``inv_freq`` of ``switch``, as HF's own update makes it."""
    module, prefix = switch.module, switch.prefix
    original = getattr(module, f"{prefix}original_inv_freq", None)
    if original is None:
        raise ValueError(
            f"{type(module).__name__} uses longrope, but this transformers version keeps its frequencies "
            "where specbeam does not look for them; not supported"
        )
    if getattr(module, f"{prefix}long_inv_freq", None) is None:  # HF makes it on the first long forward; make it so
        x = torch.zeros(1, 1, 1, device=original.device)  # [batch, seq, dim]: only its dtype and device are read
        position = torch.tensor([[switch.original_max]], device=original.device)  # [batch, seq]: past the switch
        kwargs = {} if switch.layer_type is None else {"layer_type": switch.layer_type}
        module(x, position, **kwargs)
    return getattr(module, f"{prefix}long_inv_freq").clone()


@contextmanager
def rope_pinned(model: nn.Module, input_length: int, max_length: int):
    """Within the block, ``model``'s longrope frequencies are the set HF's ``generate`` uses for an
    input of ``input_length`` (padded) tokens generating up to ``max_length``; a ValueError if HF
    would switch sets part way. A no-op for models without longrope."""
    switches = longrope_switches(model)
    for s in switches:
        # HF's forward for the last new token sees max_length - 1 tokens; long once a forward sees more
        # than original_max
        if input_length <= s.original_max < max_length - 1:
            raise ValueError(
                f"{type(model).__name__} uses longrope: HF switches from its short to its long RoPE frequencies once "
                f"the sequence passes original_max_position_embeddings = {s.original_max} tokens, and recomputes every "
                f"cached position at that step. This call would cross it (input {input_length} tokens, max_length "
                f"{max_length}); specbeam does not replay the switch. Keep max_length <= {s.original_max + 1}, or "
                f"start from an input longer than {s.original_max} tokens"
            )
    saved = []
    try:
        for s in switches:
            names = (f"{s.prefix}original_inv_freq", f"{s.prefix}long_inv_freq", f"{s.prefix}inv_freq")
            params = s.params
            before = [getattr(s.module, n, None) for n in names[:2]], getattr(s.module, names[2]).clone()
            saved.append((s, names, params, params["original_max_position_embeddings"], *before))
            if input_length > s.original_max:
                # HF's update takes long_inv_freq past the switch and original_inv_freq before it: both long
                # (transformers 5.19 recomputes the long set past the switch itself: long as well)
                pinned = _long_frequencies(s)
                setattr(s.module, names[0], pinned)
                setattr(s.module, names[1], pinned)
            else:
                # no forward is past a switch that is never reached: the short set, draft tokens ahead included
                params["original_max_position_embeddings"] = _NEVER
        yield
    finally:
        for s, names, params, original_max, (original, long_freq), current in reversed(saved):
            params["original_max_position_embeddings"] = original_max
            setattr(s.module, names[0], original)
            setattr(s.module, names[1], long_freq)
            # HF may have replaced the buffer by one made in inference mode (5.19): put a fresh one back
            setattr(s.module, names[2], current)


_NEVER = 2**62  # an original_max_position_embeddings no sequence passes
