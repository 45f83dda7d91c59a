"""Beam search state, stepped by log-probabilities supplied from outside.

This reproduces, operation for operation, the vectorised beam search of HuggingFace transformers
(``GenerationMixin._beam_search``, v5): the same top-``K`` candidate selection
(``K = max(2, 1 + num_eos) * num_beams``; with ``do_sample`` the same draw of ``K`` without
replacement), the same handling of finished hypotheses, length penalty, ``early_stopping``
(True / False / "never") heuristics, and the same output cropping. Fed the same
log-probabilities it makes the same choices, so a caller that can produce the target's
log-probabilities for every running beam without a forward per step (token trees, see
:mod:`specbeam_core.beam_search`) gets exactly the target's beam search.

Shapes: ``batch`` prompts, ``B = num_beams`` beams each, sequences padded to ``max_length``.
"""

from __future__ import annotations

from typing import Callable

import torch

NEG = -1.0e9


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor`` ``[batch, beams, ...]`` at beam ``indices`` ``[batch, k]`` → ``[batch, k, ...]``."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


class BeamSearchState:
    def __init__(
        self,
        prompts: torch.Tensor,  # [batch, W] (left-padded prompts, one row per prompt)
        num_beams: int,
        max_length: int,
        *,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        num_eos_tokens: int = 0,
        fill_value: int = -1,
        do_sample: bool = False,
        sample_device: torch.device | str = "cpu",
        draw: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        batch, width = prompts.shape
        if max_length <= width:
            raise ValueError(f"max_length {max_length} leaves no room for new tokens after a {width}-token prompt")
        self.batch, self.num_beams, self.max_length = batch, num_beams, max_length
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.num_return_sequences = num_return_sequences
        # beam sampling: the K continuations drawn without replacement from the softmax of the
        # accumulated scores instead of the top K. ``draw(scores [batch, B * V], K)`` -> (log-probs,
        # flat indices), each [batch, K], makes the draw (a framework's own, where its versions
        # differ); by default the draw of HF 5.2x, with the global generator of ``sample_device``
        self.do_sample, self.sample_device = do_sample, torch.device(sample_device)
        self.draw = draw if draw is not None else self._draw
        self.beams_to_keep = max(2, 1 + num_eos_tokens) * num_beams
        self.top_num_beam_mask = torch.arange(self.beams_to_keep) < num_beams  # [K]
        self.prompt_len = self.cur_len = width

        self.running_sequences = torch.full(
            (batch, num_beams, max_length), fill_value, dtype=torch.long
        )  # [batch, B, max_len]
        self.running_sequences[:, :, :width] = prompts[:, None, :]
        self.sequences = self.running_sequences.clone()  # [batch, B, max_len] finished hypotheses
        self.running_beam_scores = torch.zeros(batch, num_beams)  # [batch, B]
        self.running_beam_scores[:, 1:] = NEG  # only the first (identical) beam expands at the first step
        self.beam_scores = torch.full((batch, num_beams), NEG)  # [batch, B] scores of finished hypotheses
        self.is_sent_finished = torch.zeros(batch, num_beams, dtype=torch.bool)  # [batch, B]
        self.improvement_possible = torch.ones(batch, 1, dtype=torch.bool)  # [batch, 1]
        self.hits_stop = torch.zeros(batch, num_beams, dtype=torch.bool)  # [batch, B]
        self.running_beam_indices = torch.full(
            (batch, num_beams, max_length - width), -1, dtype=torch.int32
        )  # [batch, B, G]
        self.beam_indices = self.running_beam_indices.clone()
        self.done = False

    # ------------------------------------------------------------------ views
    def flat_running_sequences(self) -> torch.Tensor:
        """``[batch * B, cur_len]``: what the logits processors see at this step."""
        return self.running_sequences[:, :, : self.cur_len].reshape(self.batch * self.num_beams, self.cur_len)

    def running_generated(self) -> list[list[tuple[int, ...]]]:
        """Per prompt, per running beam: its generated tokens so far."""
        gen = self.running_sequences[:, :, self.prompt_len : self.cur_len].tolist()
        return [[tuple(beam) for beam in row] for row in gen]

    def _draw(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` of ``scores`` ``[batch, B * V]`` drawn without replacement from their softmax, best first."""
        probs = torch.softmax(scores.to(self.sample_device), dim=-1)  # [batch, B * V]
        indices = torch.multinomial(probs, num_samples=k).cpu()  # [batch, K]
        log_probs, order = torch.gather(scores, 1, indices).sort(dim=-1, descending=True)  # [batch, K]
        return log_probs, indices.gather(-1, order)

    # ------------------------------------------------------------------ one step
    def step(self, log_probs: torch.Tensor, stop) -> None:
        """Advance by one token. ``log_probs`` ``[batch * B, vocab]``: processed target log-probabilities
        of every running beam; ``stop(sequences [batch * K, cur_len + 1]) -> bool [batch * K]``."""
        batch, beams, k, cur = self.batch, self.num_beams, self.beams_to_keep, self.cur_len
        vocab = log_probs.shape[-1]
        scores = log_probs.reshape(batch, beams, vocab) + self.running_beam_scores[:, :, None]  # [batch, B, V]
        scores = scores.reshape(batch, beams * vocab)  # [batch, B * V]

        # top-K continuations over all beams, or K of them drawn (beam sampling)
        if self.do_sample:
            topk_log_probs, topk_indices = self.draw(scores, k)  # [batch, K] each
        else:
            topk_log_probs, topk_indices = torch.topk(scores, k=k)  # [batch, K]
        topk_beam = topk_indices // vocab  # [batch, K]
        topk_running_beam_indices = _gather_beams(self.running_beam_indices, topk_beam)  # [batch, K, G]
        topk_running_sequences = _gather_beams(self.running_sequences, topk_beam)  # [batch, K, max_len]
        topk_running_sequences[:, :, cur] = topk_indices % vocab
        batch_offset = torch.arange(batch).view(-1, 1) * beams
        topk_running_beam_indices[:, :, cur - self.prompt_len] = (topk_beam + batch_offset).to(torch.int32)

        hits = stop(topk_running_sequences[:, :, : cur + 1].reshape(batch * k, cur + 1))
        hits = torch.as_tensor(hits, dtype=torch.bool).reshape(batch, k)  # [batch, K]

        # running beams for the next step: the best B that did not stop
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * NEG
        next_topk = torch.topk(topk_running_log_probs, k=beams)[1]  # [batch, B]
        new_running_sequences = _gather_beams(topk_running_sequences, next_topk)
        new_running_scores = _gather_beams(topk_running_log_probs, next_topk)
        new_running_indices = _gather_beams(topk_running_beam_indices, next_topk)

        # finished hypotheses: merge the ones that just stopped among the top B, keep the best B
        just_finished = hits & self.top_num_beam_mask[None, :]  # [batch, K]
        finished_scores = topk_log_probs / ((cur + 1 - self.prompt_len) ** self.length_penalty)
        full = torch.all(self.is_sent_finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        finished_scores = finished_scores + full.to(torch.float32) * NEG
        finished_scores = finished_scores + (~self.improvement_possible).to(torch.float32) * NEG
        finished_scores = finished_scores + (~just_finished) * NEG
        merged_sequences = torch.cat((self.sequences, topk_running_sequences), dim=1)
        merged_scores = torch.cat((self.beam_scores, finished_scores), dim=1)
        merged_indices = torch.cat((self.beam_indices, topk_running_beam_indices), dim=1)
        merged_finished = torch.cat((self.is_sent_finished, just_finished), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]  # [batch, B]
        self.sequences = _gather_beams(merged_sequences, best)
        self.beam_scores = _gather_beams(merged_scores, best)
        self.beam_indices = _gather_beams(merged_indices, best)
        self.is_sent_finished = _gather_beams(merged_finished, best)

        self.running_sequences, self.running_beam_scores, self.running_beam_indices = (
            new_running_sequences,
            new_running_scores,
            new_running_indices,
        )
        self.hits_stop = hits
        self.cur_len = cur = cur + 1

        # can a running beam still beat the worst finished hypothesis?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = cur - self.prompt_len
        best_running = self.running_beam_scores[:, :1] / (best_length**self.length_penalty)
        worst_finished = torch.where(self.is_sent_finished, torch.min(self.beam_scores, dim=1, keepdim=True)[0], NEG)
        self.improvement_possible = self.improvement_possible & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )

        open_beam = ~(torch.all(self.is_sent_finished) & (self.early_stopping is True))
        valid_continuations = ~torch.all(hits)
        self.done = not bool(torch.any(self.improvement_possible) & open_beam & valid_continuations)

    # ------------------------------------------------------------------ result
    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sequences [batch * R, L], scores [batch * R], beam_indices [batch * R, L - W])`` of the best
        ``R = num_return_sequences`` hypotheses per prompt, cropped as HF crops them."""
        r = self.num_return_sequences
        sequences = self.sequences[:, :r].reshape(self.batch * r, self.max_length)
        scores = self.beam_scores[:, :r].reshape(self.batch * r)
        indices = self.beam_indices[:, :r].reshape(self.batch * r, -1)
        generated = int(((indices + 1).bool()).sum(dim=1).max())
        return sequences[:, : self.prompt_len + generated], scores, indices[:, :generated]
