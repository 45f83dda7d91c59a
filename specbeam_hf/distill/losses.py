"""Losses that match verification.

* Chains: exact speculative sampling accepts a drafted token with probability ``1 - TV(p, q)`` (``p``
  the target's next-token distribution, ``q`` the draft's), so :func:`tv_loss` is one minus the
  acceptance rate. Greedy chains accept when the two argmaxes agree: :func:`argmax_ce` pulls the
  draft's top token to the target's.
* Beams: a drafted beam tree is verified once per pass; a level is kept when the target's kept
  beams are among the draft's ``top_k`` candidates there. :func:`beam_rank_loss` is a hinge that is
  zero exactly when every kept token beats, by ``margin`` in log-probability, all but ``top_k - m``
  of the other tokens (``m`` tokens kept at that prefix), i.e. when the kept tokens sit in the
  draft's top ``top_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [rows, seq] over the positions where ``mask`` [rows, seq] is true (0 if none)."""
    weights = mask.to(values.dtype)  # [rows, seq]
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def tv_loss(target_logits: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance ``0.5 * sum |p - q|`` between the two next-token distributions.

    ``target_logits`` and ``draft_logits``: [rows, seq, vocab]; ``mask``: [rows, seq]."""
    p = F.softmax(target_logits.float(), dim=-1)  # [rows, seq, vocab]
    q = F.softmax(draft_logits.float(), dim=-1)  # [rows, seq, vocab]
    tv = 0.5 * (p - q).abs().sum(-1)  # [rows, seq]
    return masked_mean(tv, mask)


def argmax_ce(target_logits: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the draft towards the target's argmax token (greedy chains accept on it)."""
    wanted = target_logits.argmax(-1)  # [rows, seq]
    logq = F.log_softmax(draft_logits.float(), dim=-1)  # [rows, seq, vocab]
    nll = -logq.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)  # [rows, seq]
    return masked_mean(nll, mask)


def beam_rank_loss(draft_logits: torch.Tensor, kept: torch.Tensor, top_k: int, margin: float = 1.0) -> torch.Tensor:
    """Hinge loss that puts the tokens the target kept in the draft's top ``top_k`` candidates.

    ``draft_logits``: [rows, seq, vocab]; ``kept``: [rows, seq, K] token ids the target's beam search
    kept after each prefix, padded with -1 (a position with none kept adds nothing). Each kept token
    with draft log-probability ``l`` costs ``relu(margin + t - l)``, ``t`` the draft's log-probability
    of the ``(top_k - m + 1)``-th best token that was not kept; the mean is over positions (each
    position's kept tokens averaged)."""
    logq = F.log_softmax(draft_logits.float(), dim=-1)  # [rows, seq, vocab]
    valid = kept >= 0  # [rows, seq, K]
    index = kept.clamp(min=0)  # [rows, seq, K]
    kept_logq = logq.gather(-1, index)  # [rows, seq, K]
    hits = torch.zeros(logq.shape, dtype=torch.int32, device=logq.device)  # [rows, seq, vocab]
    is_kept = hits.scatter_add_(-1, index, valid.to(torch.int32)) > 0  # [rows, seq, vocab]
    others = logq.masked_fill(is_kept, float("-inf"))  # [rows, seq, vocab]
    best_others = others.topk(min(top_k, others.shape[-1]), dim=-1).values  # [rows, seq, top_k]
    m = valid.sum(-1)  # [rows, seq]
    j = (best_others.shape[-1] - m).clamp(0, best_others.shape[-1] - 1)  # [rows, seq]
    threshold = best_others.gather(-1, j.unsqueeze(-1))  # [rows, seq, 1]
    hinge = F.relu(margin + threshold - kept_logq) * valid  # [rows, seq, K]
    per_position = hinge.sum(-1) / m.clamp(min=1)  # [rows, seq]
    return masked_mean(per_position, m > 0)
