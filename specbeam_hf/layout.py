"""What a transformers model's attention needs from the paged cache: its KV shapes and its masks.

Read from the model itself, not guessed from config names (which differ by family: ``num_key_value_heads``,
``num_kv_heads``, ``multi_query``...): :func:`probe_kv_shapes` runs one token through the model with a
cache that records what each attention layer writes. Sliding-window layers (Mistral, Gemma 2/3,
Cohere 2, gpt-oss...) see only the last ``sliding_window`` positions, and chunked layers (Llama 4)
only the positions of their own ``attention_chunk_size`` chunk; :func:`attention_kind` says which
mask(s) a model takes and :func:`narrowed_masks` narrows the paged batch's mask for those layers, so
nothing is silently attended that the model's own ``generate`` would hide.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from specbeam_core import KVBatch


@dataclass(frozen=True)
class KVShapes:
    """What the attention layers cache: the shape of the first, and ``per_layer`` (kv_heads, key head
    size, value head size) for every layer when the layers differ (else None)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    per_layer: tuple[tuple[int, int, int], ...] | None = None


class _ProbeCache(Cache):
    """Records ``(kv_heads, head_dim, value_head_dim)`` per layer and attends to the new token alone,
    handing it back laid out as the paged pool's gather of several rows is (``[N, heads, K, dim]``
    strided from ``[heads, N, K, dim]``), so a model that cannot take such keys fails here."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.shapes: dict[int, tuple[int, int, int]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.shapes[int(layer_idx)] = (key_states.shape[1], key_states.shape[-1], value_states.shape[-1])
        return (key_states.transpose(0, 1).contiguous().transpose(0, 1),
                value_states.transpose(0, 1).contiguous().transpose(0, 1))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0


@torch.inference_mode()
def probe_kv_shapes(model: PreTrainedModel, cache_arg: str, num_layers_hint: int) -> KVShapes:
    """One forward of one token in two rows: the K/V shapes every attention layer hands its cache."""
    name = type(model).__name__
    device = model.device
    probe = _ProbeCache()
    try:
        model(
            input_ids=torch.zeros(2, 1, dtype=torch.long, device=device),  # [N, T]
            position_ids=torch.zeros(2, 1, dtype=torch.long, device=device),
            attention_mask=torch.zeros(2, 1, 1, 1, dtype=model.dtype, device=device),  # [N, 1, T, K]
            use_cache=True,
            **{cache_arg: probe},
            logits_to_keep=1,
        )
    except Exception as exc:  # the model cannot run on a paged cache with a prepared 4D mask
        raise ValueError(
            f"{name} cannot run on specbeam's paged KV cache: a one-token forward of two rows with a prepared 4D "
            "attention mask and a custom transformers Cache (keys laid out as the pool's gather) failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not probe.shapes:
        raise ValueError(
            f"{name} wrote nothing to its KV cache in a forward: specbeam needs a model that caches keys and values"
        )
    num_layers = max(num_layers_hint, max(probe.shapes) + 1)
    heads, k_dim, v_dim = probe.shapes[min(probe.shapes)]
    # a layer that writes nothing reads the K/V another layer's update returned (Gemma 3n / 4 KV sharing):
    # no pool of its own
    per_layer = tuple(probe.shapes.get(i, (0, k_dim, v_dim)) for i in range(num_layers))
    return KVShapes(num_layers, heads, k_dim, v_dim, per_layer if len(set(per_layer)) > 1 else None)


@dataclass(frozen=True)
class AttentionKind:
    """``sliding_window``: the window of the model's sliding layers (None: none slide);
    ``chunk_size``: the chunk of its chunked layers (None: none are chunked); ``per_layer_type``: the
    model takes a dict of masks by layer type (full and sliding or chunked layers in one model)
    rather than one mask for every layer."""

    sliding_window: int | None
    per_layer_type: bool
    chunk_size: int | None = None


SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# attention implementations that apply a 4D additive mask as given (flash attention is causal or
# unpadded from a 2D mask; flex attention is untested here, its CPU kernels do not build)
MASKED_IMPLEMENTATIONS = {"eager", "sdpa"}
_ALIBI = {"bloom", "mpt"}
_INDEX_MASKED = {"gpt_neo"}  # its attention slices a [max_positions, max_positions] table by key count


def attention_kind(model: PreTrainedModel, config) -> AttentionKind:
    """Which masks ``model`` needs; a clear error for attention specbeam cannot reproduce exactly."""
    name = type(model).__name__
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASKED_IMPLEMENTATIONS:
        raise ValueError(
            f"{name} runs attn_implementation={implementation!r}; specbeam passes a prepared 4D additive mask (a token "
            "tree attends to its ancestors only, not causally), which "
            f"{sorted(MASKED_IMPLEMENTATIONS)} apply as given: "
            f"load the model with one of them, or call model.set_attn_implementation('sdpa')"
        )
    if config.model_type in _INDEX_MASKED:
        raise ValueError(
            f"{name} masks attention by key index within each forward (a causal table, and local layers' windows "
            "counted in columns), not by position; specbeam's token trees and packed beam rows place keys elsewhere: "
            "not supported"
        )
    if config.model_type in _ALIBI or getattr(config, "alibi", False):
        raise ValueError(
            f"{name} uses ALiBi position biases built from a 2D attention mask; "
            "specbeam passes a prepared 4D mask and does not support it"
        )
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        unsupported = set(layer_types) - SUPPORTED_LAYER_TYPES
        if unsupported:
            raise ValueError(
                f"{name} has layers of type {sorted(unsupported)}; specbeam supports {sorted(SUPPORTED_LAYER_TYPES)}"
            )
        if not {"sliding_attention", "chunked_attention"} & set(layer_types):
            return AttentionKind(None, False)
        if "sliding_attention" in layer_types and not window:
            raise ValueError(f"{name} has sliding-attention layers but no sliding_window in its config")
        chunk = getattr(config, "attention_chunk_size", None) if "chunked_attention" in layer_types else None
        if "chunked_attention" in layer_types and not chunk:
            raise ValueError(f"{name} has chunked-attention layers but no attention_chunk_size in its config")
        source = ""
        for inner in (model.base_model, getattr(model, "model", None)):  # Llama 4's base_model_prefix names no module
            try:
                source += inspect.getsource(type(inner).forward) if inner is not None else ""
            except (OSError, TypeError):  # no source to read (a compiled or frozen install): transformers' convention
                source += "causal_mask_mapping"
        if "causal_mask_mapping" not in source:
            raise ValueError(f"{name} mixes layer types but takes no per-layer-type masks; not supported")
        window = int(window) if "sliding_attention" in layer_types else None
        return AttentionKind(window, True, int(chunk) if chunk else None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return AttentionKind(int(window), False)  # every layer slides (Mistral's convention)
    return AttentionKind(None, False)


def key_positions(kv: KVBatch) -> torch.Tensor:
    """Position id of every key of the batch ``[N, K]``: cached keys sit at their index, new ones
    (chain tokens or tree nodes, in the row's own order) at ``kv.positions``; packed rows carry theirs."""
    if kv.key_positions is not None:
        return kv.key_positions
    n_rows, t_max = kv.positions.shape
    keys = torch.arange(kv.kv_length).repeat(n_rows, 1)  # [N, K]
    for r, (cached, new) in enumerate(zip(kv.num_cached, kv.num_new)):
        keys[r, cached : cached + new] = kv.positions[r, t_max - new :]
    return keys


def narrowed_masks(
    kv: KVBatch, kind: AttentionKind, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's additive mask ``[N, 1, T, K]`` (all zeros for one row and one token), and by layer
    type (``"sliding_attention"``, ``"chunked_attention"``) the masks of the layers that see less of
    the batch than that, where some key lies outside their window or chunk; on the host."""
    mask = kv.attention_mask
    if mask is None:  # one row, one token: nothing to hide
        mask = torch.zeros(1, 1, 1, kv.kv_length, dtype=dtype)  # [1, 1, 1, K]
    narrowed = {}
    window = kind.sliding_window
    if window is not None and kv.kv_length > window:
        narrowed["sliding_attention"] = sliding_mask(kv, mask, window)
    chunk = kind.chunk_size
    if chunk is not None and int(kv.positions.max()) >= chunk:  # keys start at position 0: a query past the first chunk
        narrowed["chunked_attention"] = chunked_mask(kv, mask, chunk)
    return mask, narrowed


def layer_masks(mask: torch.Tensor, narrowed: dict[str, torch.Tensor], kind: AttentionKind):
    """What the model's forward takes as ``attention_mask``: ``mask`` where no layer sees less; else a
    dict by layer type (models with layer types) or the one narrowed mask (every layer slides)."""
    if not narrowed:
        return mask
    if kind.per_layer_type:
        return {
            name: narrowed.get(name, mask)
            for name in ("full_attention", *sorted(SUPPORTED_LAYER_TYPES - {"full_attention"}))
        }
    (only,) = narrowed.values()
    return only


def sliding_mask(kv: KVBatch, mask: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` ``[N, 1, T, K]`` (additive) with every key ``window`` or more positions behind its
    query hidden as well — HF's ``kv_idx > q_idx - sliding_window``."""
    far = kv.positions[:, :, None] - key_positions(kv)[:, None, :] >= window  # [N, T, K]
    return mask.masked_fill(far[:, None].to(mask.device), torch.finfo(mask.dtype).min)


def chunked_mask(kv: KVBatch, mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """``mask`` ``[N, 1, T, K]`` (additive) with every key of another ``chunk``-position chunk than its
    query hidden as well — HF's ``kv_idx // chunk_size == q_idx // chunk_size`` (in positions, which
    are HF's unpadded column indices: prompts with masked tokens inside are refused for such models)."""
    other = kv.positions[:, :, None] // chunk != key_positions(kv)[:, None, :] // chunk  # [N, T, K]
    return mask.masked_fill(other[:, None].to(mask.device), torch.finfo(mask.dtype).min)
