"""A lean forward for llama-family *draft* models: the same weights and modules, none of the wrappers.

A one-layer draft spends most of a HF forward in generic machinery (mask building, output
capturing, kwargs plumbing), not in its matmuls. :class:`FastLlamaDraft` calls the model's own
submodules (embedding, rotary embedding, norms, projections, MLP, LM head) in the order of
``LlamaModel.forward`` and attends with ``scaled_dot_product_attention`` over the paged KV cache.

Only drafts use it: a draft's logits may differ from HF's in the last bits without changing any
output (verification is against the target), while the target always runs through HF's own forward.
:func:`draft_causal_lm` picks it for llama-shaped models and falls back to :class:`HFCausalLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specbeam_core import KVBatch

from .runner import HFCausalLM

# model types whose decoder layers are llama's: pre-norm attention + gated MLP, rotary positions,
# no sliding window, no extra norms
LLAMA_SHAPED = {"llama", "mistral", "qwen2"}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def supports(model: PreTrainedModel) -> str | None:
    """None if :class:`FastLlamaDraft` can run ``model``, else why not."""
    config = model.config
    if config.model_type not in LLAMA_SHAPED:
        return f"model type {config.model_type!r} is not llama-shaped"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and \
            "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "sliding-window attention"
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        return "no rotary embedding module"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act!r}"
    return None


class FastLlamaDraft(HFCausalLM):
    """``HFCausalLM`` with a direct forward for llama-shaped models (drafts only)."""

    def __init__(self, model: PreTrainedModel) -> None:
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"FastLlamaDraft cannot run {type(model).__name__}: {reason}")
        super().__init__(model)
        self.scaling = self.head_dim ** -0.5

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVBatch, num_logits: int) -> torch.Tensor:
        inner = self.model.model
        n, t = tokens.shape
        x = inner.embed_tokens(tokens)  # [N, T, hidden]
        cos, sin = inner.rotary_emb(x, kv.positions)  # [N, T, head_dim] each
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, T, head_dim]
        mask = kv.attention_mask  # [N, 1, T, K] additive, or None
        if mask is not None:
            mask = mask.to(x.dtype)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)  # [N, T, hidden]
            q = attn.q_proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)  # [N, heads, T, head_dim]
            k = attn.k_proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)  # [N, kv_heads, T, head_dim]
            v = attn.v_proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = kv.update(i, k, v)  # [N, kv_heads, K, head_dim]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=keys.shape[1] != q.shape[1])  # [N, heads, T, head_dim]
            x = x + attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = inner.norm(x[:, -num_logits:])  # [N, num_logits, hidden]
        self.forward_count += 1
        return self.model.lm_head(x).float()  # [N, num_logits, vocab]


def draft_causal_lm(model: PreTrainedModel) -> HFCausalLM:
    """The fastest runner for a draft model: :class:`FastLlamaDraft` where it applies, else HF's forward."""
    return FastLlamaDraft(model) if supports(model) is None else HFCausalLM(model)
