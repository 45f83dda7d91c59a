"""A decoder-only transformer in plain torch that implements ``specbeam_core.CausalLM``.

No transformers, no vLLM: the pattern a framework or a hand-written inference server follows to run
its own model through the core. The whole contract is in :meth:`PlainTorchLM.forward`: embed the
new tokens at ``kv.positions``, let every attention layer write its new keys/values with
``kv.update(layer, keys, values)`` (which returns the sequence's keys/values read back from the
paged pool), add ``kv.attention_mask`` to the attention scores, and return float32 logits of the
last ``num_logits`` columns. :meth:`full_logits` is the same network run the plain way (whole
sequences, a causal mask, no cache): the reference the tests compare the engine with.

Pre-norm blocks, rotary positions, grouped-query attention (4 query heads over 2 KV heads).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from specbeam_core import KVBatch, PagedKVCache


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[N, heads, T, dim]`` at ``positions`` ``[N, T]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32) / half)  # [dim / 2]
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # [N, 1, T, dim / 2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # [N, heads, T, dim]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``q`` ``[N, H, T, d]`` over ``keys``/``values`` ``[N, H_kv, K, d]`` with an additive ``mask``
    ``[N, 1, T, K]`` (None: every key visible) → ``[N, H, T, d]``."""
    groups = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)  # [N, H, K, d]
    values = values.repeat_interleave(groups, dim=1)  # [N, H, K, d]
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [N, H, T, K]
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ values  # [N, H, T, d]


class PlainTorchLM(nn.Module):
    """A tiny randomly initialised LM; ``vocab_size`` and ``max_positions`` as ``CausalLM`` asks."""

    def __init__(self, vocab_size: int = 48, dim: int = 32, num_heads: int = 4, num_kv_heads: int = 2,
                 num_layers: int = 2, max_positions: int = 256, seed: int = 0, init: float = 0.3) -> None:
        super().__init__()
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.num_heads, self.num_kv_heads, self.num_layers = num_heads, num_kv_heads, num_layers
        self.head_dim = dim // num_heads
        gen = torch.Generator().manual_seed(seed)

        def weight(*shape: int) -> nn.Parameter:
            return nn.Parameter(init * torch.randn(*shape, generator=gen))

        kv_dim = num_kv_heads * self.head_dim
        self.embed = weight(vocab_size, dim)  # [V, dim], tied with the output head
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            layer = nn.Module()
            layer.norm1, layer.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            layer.wq, layer.wk, layer.wv, layer.wo = weight(dim, dim), weight(dim, kv_dim), weight(dim, kv_dim), weight(dim, dim)
            layer.w1, layer.w2 = weight(dim, 4 * dim), weight(4 * dim, dim)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(dim)

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.num_layers, self.num_kv_heads, self.head_dim, num_blocks, block_size, dtype=torch.float32)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        """The blocks over ``tokens`` ``[N, T]``; ``attention(layer, q, k, v)`` mixes the tokens."""
        n, t = tokens.shape
        x = self.embed[tokens]  # [N, T, dim]
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            q = (h @ layer.wq).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # [N, H, T, d]
            k = (h @ layer.wk).view(n, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [N, H_kv, T, d]
            v = (h @ layer.wv).view(n, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [N, H_kv, T, d]
            mixed = attention(i, rotate(q, positions), rotate(k, positions), v)  # [N, H, T, d]
            x = x + mixed.transpose(1, 2).reshape(n, t, -1) @ layer.wo
            x = x + torch.relu(layer.norm2(x) @ layer.w1) @ layer.w2
        return x  # [N, T, dim]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self.norm(x) @ self.embed.T).float()  # [N, T, V]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVBatch, num_logits: int) -> torch.Tensor:
        """``specbeam_core.CausalLM.forward``: new ``tokens`` ``[N, T]`` on the paged cache → ``[N, num_logits, V]``."""

        def paged(layer: int, q, k, v):
            keys, values = kv.update(layer, k, v)  # [N, H_kv, K, d]: the sequence so far, read from the pool
            return attend(q, keys, values, kv.attention_mask)

        return self._logits(self._run(tokens, kv.positions, paged)[:, -num_logits:])

    @torch.inference_mode()
    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Whole sequences ``[N, L]`` the plain way (causal mask, no cache) → logits ``[N, L, V]``."""
        length = ids.shape[1]
        positions = torch.arange(length).expand(ids.shape[0], length)  # [N, L]
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]  # [1, 1, L, L]
        return self._logits(self._run(ids, positions, lambda layer, q, k, v: attend(q, k, v, causal)))

    def perturbed(self, noise: float, seed: int) -> "PlainTorchLM":
        """A copy with N(0, noise²) added to every weight: a draft that often agrees with this model."""
        other = copy.deepcopy(self)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
        return other
