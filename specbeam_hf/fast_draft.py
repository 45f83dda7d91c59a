"""A lean forward for llama-family *draft* models: the same weights and modules, none of the wrappers.

A one-layer draft spends most of a HF forward in generic machinery (mask building, output
capturing, kwargs plumbing), not in its matmuls. :class:`FastLlamaDraft` calls the model's own
submodules (embedding, rotary embedding, projections, LM head) in the order of
``LlamaModel.forward``, normalises with one fused ``rms_norm`` over the norms' weights, runs the gated
MLP from its three projections, and attends with ``scaled_dot_product_attention`` over the paged KV
cache.

Only drafts use it: a draft's logits may differ from HF's in the last bits without changing any
output (verification is against the target), while the target always runs through HF's own forward.
:func:`draft_causal_lm` picks it for llama-shaped models and falls back to :class:`HFCausalLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specbeam_core import KVBatch

from .layout import attention_kind, narrowed_masks
from .runner import HFCausalLM

# model types whose decoder layers are llama's: pre-norm attention + gated MLP, rotary positions,
# no extra norms (sliding-window layers get the window in their mask, as in HF's forward)
LLAMA_SHAPED = {"llama", "mistral", "qwen2"}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's llama RMSNorm (normalise in float32, cast back, scale) as one fused op where it can be."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:  # not llama's RMSNorm: its own forward
        return norm(x)
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, eps)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, eps).to(x.dtype)


def supports(model: PreTrainedModel) -> str | None:
    """None if :class:`FastLlamaDraft` can run ``model``, else why not."""
    config = model.config
    if config.model_type not in LLAMA_SHAPED:
        return f"model type {config.model_type!r} is not llama-shaped"
    try:
        kind = attention_kind(model, config)  # sliding windows are applied per layer below; anything else is refused
    except ValueError as exc:
        return str(exc)
    if kind.chunk_size is not None:
        return "chunked attention layers"
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        return "no rotary embedding module"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act!r}"
    if not all(
        hasattr(layer.mlp, name) for layer in model.model.layers for name in ("gate_proj", "up_proj", "down_proj")
    ):
        return "MLP is not llama's gated MLP"
    return None


# rotary variants whose cos/sin depend on the position alone (not on the sequence length), so one
# table built once serves every forward
STATIC_ROPE = {"default", "linear", "llama3"}


class FastLlamaDraft(HFCausalLM):
    """``HFCausalLM`` with a direct forward for llama-shaped models (drafts only)."""

    def __init__(self, model: PreTrainedModel) -> None:
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"FastLlamaDraft cannot run {type(model).__name__}: {reason}")
        super().__init__(model)
        self.scaling = self.head_dim**-0.5
        rotary = model.model.rotary_emb
        self._static_rope = getattr(rotary, "rope_type", None) in STATIC_ROPE
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, head_dim]
        self._rope_key: tuple | None = None
        layer_types = getattr(self.config, "layer_types", None)  # None: every layer slides when there is a window
        self._slides = [
            layer_types is None or layer_types[i] == "sliding_attention" for i in range(len(model.model.layers))
        ]

    # --------------------------------------------------------------- rotary table
    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, T, head_dim] for host ``positions`` [N, T]: rows of a table built once per length."""
        rotary = self.model.model.rotary_emb
        on_device = positions.to(x.device)  # [N, T]
        if not self._static_rope:
            return rotary(x, on_device)
        need = int(positions.max()) + 1  # from the host copy: no device synchronisation
        key = (x.dtype, x.device, rotary.inv_freq.data_ptr())
        if self._rope_table is None or self._rope_key != key or need > self._rope_table[0].shape[0]:
            have = 0 if self._rope_table is None or self._rope_key != key else self._rope_table[0].shape[0]
            length = max(need, 2 * have, 256)
            grid = torch.arange(length, device=x.device)[None]  # [1, length]
            cos, sin = rotary(x[:1, :1], grid)  # [1, length, head_dim] each, exactly as per forward
            self._rope_table, self._rope_key = (cos[0], sin[0]), key
        cos, sin = self._rope_table
        return cos[on_device], sin[on_device]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVBatch, num_logits: int) -> torch.Tensor:
        inner = self.model.model
        device = inner.embed_tokens.weight.device  # (HF's ``model.device`` walks the parameters)
        n, t = tokens.shape
        x = inner.embed_tokens(tokens.to(device))  # [N, T, hidden]
        cos, sin = self._cos_sin(x, kv.positions)  # [N, T, head_dim] each
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, T, head_dim]
        mask, narrowed = narrowed_masks(kv, self.attention, x.dtype)  # [N, 1, T, K] additive; sliding layers' by type
        sliding = narrowed.get("sliding_attention")
        mask = None if kv.attention_mask is None else mask.to(device=device, dtype=x.dtype)  # None: sdpa attends to all
        if sliding is not None:
            sliding = sliding.to(device=device, dtype=x.dtype)
        for i, layer in enumerate(inner.layers):
            layer_mask = sliding if sliding is not None and self._slides[i] else mask
            attn = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)  # [N, T, hidden]
            q = attn.q_proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)  # [N, heads, T, head_dim]
            k = attn.k_proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)  # [N, kv_heads, T, head_dim]
            v = attn.v_proj(h).view(n, t, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = kv.update(i, k, v)  # [N, kv_heads, K, head_dim]
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=layer_mask, scale=self.scaling, enable_gqa=keys.shape[1] != q.shape[1]
            )  # [N, heads, T, head_dim]
            x = x + attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
            mlp, h = layer.mlp, _rms_norm(layer.post_attention_layernorm, x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))  # llama's gated MLP (silu: supports())
        x = _rms_norm(inner.norm, x[:, -num_logits:])  # [N, num_logits, hidden]
        self.forward_count += 1
        return self.model.lm_head(x).float().cpu()  # [N, num_logits, vocab] on the host


def draft_causal_lm(model: PreTrainedModel) -> HFCausalLM:
    """The fastest runner for a draft model: :class:`FastLlamaDraft` where it applies, else HF's forward."""
    return FastLlamaDraft(model) if supports(model) is None else HFCausalLM(model)
