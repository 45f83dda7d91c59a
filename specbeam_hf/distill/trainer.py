"""The training loop: transformers' ``Trainer`` with specbeam's rollouts and losses in ``compute_loss``
(optimizer, schedule, progress bar, logging and resumable checkpoints are the Trainer's)."""

from __future__ import annotations

import time

import torch
from transformers import Trainer, TrainerCallback

from .losses import argmax_ce, beam_rank_loss, tv_loss
from .rollouts import MIXES, make_rows, pick_source

# loss terms of each objective: TV and argmax cross-entropy for chains, the ranking hinge for beams
TERMS = {"chain": ("tv", "argmax"), "beam": ("tv", "rank"), "both": ("tv", "argmax", "rank")}


class DistillTrainer(Trainer):
    """Trains the draft (the Trainer's model) towards a frozen target.

    Each step draws a source (on-policy draft samples, or the target's greedy, sampled or beam
    continuations; :data:`specbeam_hf.distill.rollouts.MIXES`), continues the batch's prompts with it,
    runs both models over the rows and applies the objective's losses at every trained position."""

    def __init__(self, *args, target=None, objective: str = "both", eos: int = 0, new_tokens: int = 32,
                 num_beams: int = 4, rank_top_k: int = 6, rank_margin: float = 1.0, argmax_weight: float = 1.0,
                 rank_weight: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target = target
        self.objective = objective
        self.eos, self.new_tokens, self.num_beams = eos, new_tokens, num_beams
        self.rank_top_k, self.rank_margin = rank_top_k, rank_margin
        self.weights = {"tv": 1.0, "argmax": argmax_weight, "rank": rank_weight}
        self._sums: dict[str, float] = {}
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompts = inputs["input_ids"]  # [n, prompt_length]
        draft = self.accelerator.unwrap_model(model)
        rows = make_rows(pick_source(MIXES[self.objective]), prompts, draft, self.target, self.eos,
                         self.new_tokens, self.num_beams)
        with torch.no_grad():
            target_logits = self.target(input_ids=rows.input_ids).logits  # [rows, seq, vocab]
        draft_logits = model(input_ids=rows.input_ids).logits  # [rows, seq, vocab]
        vocab = min(target_logits.shape[-1], draft_logits.shape[-1])  # a draft embedding padded past the target's
        target_logits, draft_logits = target_logits[..., :vocab], draft_logits[..., :vocab]
        terms = {}
        if "tv" in TERMS[self.objective]:
            terms["tv"] = tv_loss(target_logits, draft_logits, rows.mask)
        if "argmax" in TERMS[self.objective]:
            terms["argmax"] = argmax_ce(target_logits, draft_logits, rows.mask)
        if "rank" in TERMS[self.objective] and rows.kept is not None:
            terms["rank"] = beam_rank_loss(draft_logits, rows.kept, self.rank_top_k, self.rank_margin)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        with torch.no_grad():
            agree = (target_logits.argmax(-1) == draft_logits.argmax(-1)) & rows.mask  # [rows, seq]
            terms["agreement"] = agree.sum() / rows.mask.sum().clamp(min=1)
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self._count += 1
        return (loss, draft_logits) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._count and "loss" in logs:  # the mean of each term since the last log
            logs.update({name: round(total / self._count, 4) for name, total in self._sums.items()})
            self._sums, self._count = {}, 0
        super().log(logs, start_time)


class TimeLimit(TrainerCallback):
    """Stops training (with a checkpoint) once ``minutes`` have passed since the run started; with
    ``progress``, a bar of those minutes takes the place of the Trainer's bar of steps."""

    def __init__(self, minutes: float, progress: bool = False) -> None:
        self.seconds = 60.0 * minutes
        self.started = time.monotonic()
        self.progress, self.bar = progress, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(self.seconds), unit="s", desc="distilling")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.monotonic() - self.started
        if self.bar is not None:
            self.bar.n = min(round(elapsed), self.bar.total)
            self.bar.set_postfix(step=state.global_step, refresh=True)
        if elapsed >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.write(str({k: (round(v, 4) if isinstance(v, float) else v) for k, v in logs.items()}))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
        return control
