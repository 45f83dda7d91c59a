"""A draft that shares the target's tokenizer but not its embedding size.

Model families pad their embedding matrices to a multiple that depends on how each size was trained:
Qwen2.5 0.5B–7B have 151,936 rows, 14B and up 152,064, for one tokenizer of 151,665 tokens. The ids
are the same; only the unused rows at the end differ. :class:`VocabResizedDraft` lets such a draft
serve such a target:

- its logits are resized to the target's vocabulary: a smaller draft gets ``-inf`` columns (it never
  proposes those ids and gives them probability 0, so exact rejection sampling draws them, should the
  target ever want them, from the residual), a larger one loses its last columns (it never proposes an
  id the target lacks);
- an id past the draft's own embedding, which only the target can emit, is fed to the draft as
  ``fallback_token``: the draft guesses worse after it, the outputs stay the target's.

Outputs are the target's in every case, as with any draft; what a wrong pairing (another tokenizer)
costs is acceptance, which is why this is opt-in (wrap the draft in :class:`VocabResizedDraft`; the
adapters have an option that does it) and an unexplained vocabulary mismatch stays an error.
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_int
from .kv_cache import PagedKVCache
from .model import CausalLM, KVBatch


def fit_ids(tokens: torch.Tensor, own_vocab: int, fallback_token: int = 0) -> torch.Tensor:
    """``tokens`` with every id past a draft's ``own_vocab`` rows replaced by ``fallback_token``."""
    return tokens.masked_fill(tokens >= own_vocab, fallback_token)


def fit_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Draft ``logits`` ``[..., own]`` as ``[..., vocab]``: the last columns cut, or ``-inf`` ones added."""
    own = logits.shape[-1]
    if own > vocab:
        return logits[..., :vocab].contiguous()  # [..., vocab]
    if own < vocab:
        missing = logits.new_full((*logits.shape[:-1], vocab - own), float("-inf"))  # [..., vocab - own]
        return torch.cat([logits, missing], dim=-1)  # [..., vocab]
    return logits


class VocabResizedDraft:
    """``model`` (a :class:`~specbeam_core.model.CausalLM`) seen through a vocabulary of ``vocab_size`` ids."""

    def __init__(self, model: CausalLM, vocab_size: int, fallback_token: int = 0) -> None:
        check_int(vocab_size, "vocab_size")
        own = int(model.vocab_size)
        if not 0 <= fallback_token < min(own, vocab_size):
            raise ValueError(
                "fallback_token must be an id both vocabularies have "
                f"(< {min(own, vocab_size)}), got {fallback_token!r}"
            )
        self.model = model
        self.vocab_size = vocab_size
        self.own_vocab_size = own
        self.fallback_token = fallback_token
        self.max_positions = model.max_positions

    def make_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return self.model.make_cache(num_blocks, block_size)

    def forward(self, tokens: torch.Tensor, kv: KVBatch, num_logits: int) -> torch.Tensor:
        tokens = fit_ids(tokens, self.own_vocab_size, self.fallback_token)  # [N, T] ids the draft can embed
        logits = self.model.forward(tokens, kv, num_logits)  # [N, num_logits, own]
        return fit_logits(logits, self.vocab_size)  # [N, num_logits, vocab]

    def __getattr__(self, name: str) -> Any:  # keys_per_token, device, dtype, ...: the draft's own
        if name == "model":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)
