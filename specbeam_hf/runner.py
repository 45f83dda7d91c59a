"""Runs a HuggingFace causal LM as a ``specbeam_core.CausalLM`` on the core's paged KV cache.

Transformers models call ``cache.update(keys, values, layer_idx)`` (``past_key_values`` before 5.24) in every attention
layer and take a prepared 4D attention mask as-is, so a ``Cache`` subclass that forwards
``update`` to :meth:`specbeam_core.KVBatch.update` is all the plumbing needed: no model code is
patched, and every attention implementation (eager, sdpa) works unchanged.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from specbeam_core import KVBatch, PagedKVCache

from .layout import attention_kind, layer_masks, narrowed_masks, probe_kv_shapes


class PagedCache(Cache):
    """A ``transformers`` cache backed by one forward's :class:`specbeam_core.KVBatch`."""

    def __init__(self, kv: KVBatch) -> None:
        super().__init__(layers=[])
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.kv.update(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return min(self.kv.num_cached)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv.kv_length, 0

    def __len__(self) -> int:
        return self.kv.cache.num_layers


def _text_config(model: PreTrainedModel):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _keys_per_token(model: PreTrainedModel, config, shapes) -> float | None:
    """Linear-layer multiply-adds of one token over attention multiply-adds of one (query, key) pair
    (``specbeam_core.pack_is_cheaper``); None where the config does not say its query heads. Every
    parameter counts, so a mixture of experts reads as costlier per token than it runs."""
    heads = getattr(config, "num_attention_heads", None)
    if not heads or not shapes.num_layers:
        return None
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings().weight
    # parameters() counts a tied LM head once, as the input embedding: a lookup, not a matmul, but the head is one
    linear = sum(p.numel() for p in model.parameters()) - emb_in.numel() + (emb_out.numel() if emb_out is emb_in else 0)
    per_layer = shapes.per_layer or [(heads, shapes.head_dim, shapes.value_head_dim)] * shapes.num_layers
    per_pair = sum(int(heads) * (k_dim + v_dim) for _, k_dim, v_dim in per_layer)
    return linear / per_pair


class HFCausalLM:
    """A ``transformers`` causal LM seen through the ``specbeam_core.CausalLM`` interface."""

    def __init__(self, model: PreTrainedModel) -> None:
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(model).__name__} is an encoder-decoder model; specbeam drives decoder-only causal LMs"
            )
        self.model = model
        config = _text_config(model)
        self.config = config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.forward_count = 0
        # transformers >= 5.24 names the cache argument `cache` (`past_key_values` is deprecated, to be removed in 5.40)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.attention = attention_kind(model, config)
        shapes = probe_kv_shapes(model, self._cache_arg, int(getattr(config, "num_hidden_layers", 0) or 0))
        self.num_layers = shapes.num_layers
        self.num_kv_heads = shapes.num_kv_heads
        self.head_dim = shapes.head_dim
        self.value_head_dim = shapes.value_head_dim
        self.layer_shapes = list(shapes.per_layer) if shapes.per_layer else None  # None: every layer as the first
        self.keys_per_token = _keys_per_token(model, config, shapes)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=self.dtype,
            device=self.device,
            value_head_dim=self.value_head_dim,
            layer_shapes=self.layer_shapes,
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVBatch, num_logits: int) -> torch.Tensor:
        device = self.device
        mask, narrowed = narrowed_masks(
            kv, self.attention, self.dtype
        )  # [N, 1, T, K], and sliding / chunked layers' by type
        narrowed = {name: m.to(device) for name, m in narrowed.items()}
        attention_mask = layer_masks(mask.to(device), narrowed, self.attention)
        out = self.model(
            input_ids=tokens.to(device),
            position_ids=kv.positions.to(device),
            attention_mask=attention_mask,
            use_cache=True,
            **{self._cache_arg: PagedCache(kv)},
            logits_to_keep=num_logits,
        )
        self.forward_count += 1
        return out.logits[:, -num_logits:].float().cpu()  # [N, num_logits, vocab] on the host
