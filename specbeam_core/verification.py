"""Verification of draft chains against one target forward, batched over ragged drafts.

Terminology (as in vLLM's rejection sampler):

- **draft tokens**: the ``num_draft[r]`` tokens the drafter proposed for row ``r`` (padded to ``G``).
- **target distribution** ``p``: the target's processed distribution at each draft position, plus
  one more position after the last draft token (``G + 1`` in all).
- **draft distribution** ``q``: what the drafter sampled each draft token from; ``None`` means the
  drafts were chosen deterministically (greedy, beam, tree) and are verified as one-hot.
- **accepted**: the leading draft tokens that verification keeps.
- **recovered**: the token that replaces the first rejected draft token, drawn from the residual
  ``normalise(max(0, p − q))`` (or the target's argmax when greedy).
- **bonus**: the extra token drawn from the target's last distribution when the whole draft is
  accepted.

Every row yields ``accepted + 1`` tokens, so a step never produces fewer tokens than plain
decoding. Greedy: the longest prefix equal to the target's argmax. Sampling: accept draft token
``x`` with probability ``min(1, p(x) / q(x))`` (Leviathan et al. 2023; Chen et al. 2023); the output
then follows ``p`` exactly, whatever ``q`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample


@dataclass
class VerifyResult:
    num_accepted: list[int]  # per row: accepted draft tokens
    output_tokens: list[list[int]]  # per row: accepted draft tokens, then the recovered or bonus token
    bonus: list[bool]  # per row: the last output token is a bonus (whole draft accepted)


def verify_greedy(
    draft_tokens: torch.Tensor,  # [N, G]
    num_draft: list[int],
    target_logits: torch.Tensor,  # [N, G + 1, vocab]
) -> VerifyResult:
    """Longest prefix of each draft that equals the target's argmax, then the target's next token."""
    n_rows, g = draft_tokens.shape
    target_argmax = target_logits[:, : g + 1].argmax(dim=-1)  # [N, G + 1]
    within = torch.arange(g)[None, :] < torch.tensor(num_draft)[:, None]  # [N, G]
    match = (draft_tokens == target_argmax[:, :g]) & within  # [N, G]
    num_accepted = match.int().cumprod(dim=1).sum(dim=1)  # [N]
    next_token = target_argmax.gather(1, num_accepted[:, None]).squeeze(1)  # [N] recovered or bonus
    accepted_l = num_accepted.tolist()
    drafts_l = draft_tokens.tolist()
    next_l = next_token.tolist()
    return VerifyResult(
        num_accepted=accepted_l,
        output_tokens=[drafts_l[r][: accepted_l[r]] + [next_l[r]] for r in range(n_rows)],
        bonus=[accepted_l[r] == num_draft[r] for r in range(n_rows)],
    )


def verify_rejection_sampling(
    draft_tokens: torch.Tensor,  # [N, G]
    num_draft: list[int],
    target_probs: torch.Tensor,  # [N, G + 1, vocab]
    draft_probs: torch.Tensor | None,  # [N, G, vocab], None = drafts verified as one-hot
    generators: list[torch.Generator | None],
) -> VerifyResult:
    """Exact speculative sampling: accept with min(1, p/q), else draw from normalise(max(0, p − q)).

    Every row draws its uniforms and its recovered/bonus token from its own generator, exactly
    ``num_draft[r]`` uniforms then one token, so a seeded row's result does not depend on the batch.
    """
    n_rows, g_max = draft_tokens.shape
    within = torch.arange(g_max)[None, :] < torch.tensor(num_draft)[:, None]  # [N, G]
    p_draft = target_probs[:, :g_max].gather(2, draft_tokens[:, :, None]).squeeze(2)  # [N, G]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)  # [N, G] one-hot drafts
    else:
        q_draft = draft_probs.gather(2, draft_tokens[:, :, None]).squeeze(2)  # [N, G]
    uniform = torch.ones(n_rows, g_max, dtype=target_probs.dtype)  # [N, G] (1 past a row's draft: never accepted)
    for r, g in enumerate(num_draft):
        if g:
            uniform[r, :g] = torch.rand(g, generator=generators[r], dtype=target_probs.dtype)
    accept = (uniform * q_draft < p_draft) & within  # [N, G]
    num_accepted = accept.int().cumprod(dim=1).sum(dim=1).tolist()  # [N]
    rows = torch.arange(n_rows)
    k = torch.tensor(num_accepted)  # [N]
    p_next = target_probs[rows, k]  # [N, vocab] target distribution at the first rejected (or bonus) position
    rejected = k < torch.tensor(num_draft)  # [N]
    if draft_probs is None:
        residual = p_next.clone()
        rej_tokens = (
            draft_tokens[rows, k.clamp(max=max(g_max - 1, 0))] if g_max else torch.zeros(n_rows, dtype=torch.long)
        )
        residual[rows[rejected], rej_tokens[rejected]] = 0.0
    else:
        q_next = draft_probs[rows, k.clamp(max=max(g_max - 1, 0))] if g_max else torch.zeros_like(p_next)
        residual = (p_next - q_next).clamp_(min=0.0)
    dist = torch.where(rejected[:, None], residual, p_next)  # [N, vocab]
    empty = ~(dist.sum(dim=1) > 0)  # p == q up to rounding: the residual is p itself
    dist[empty] = p_next[empty]
    drafts_l = draft_tokens.tolist()
    outputs = [drafts_l[r][: num_accepted[r]] + [int(sample(dist[r : r + 1], generators[r]))] for r in range(n_rows)]
    return VerifyResult(
        num_accepted=num_accepted,
        output_tokens=outputs,
        bonus=[num_accepted[r] == num_draft[r] for r in range(n_rows)],
    )
