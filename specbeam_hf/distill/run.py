"""``distill``: fine-tune a draft on what its target does, and measure it before and after."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checks import CHECKPOINTS, check_options, check_out, check_vocab, latest_checkpoint
from .data import DEFAULT_SUFFIXES, PromptWindows, eval_prompts, load_data
from .errors import DistillInputError
from .evaluate import measure
from .report import DistillReport
from .saving import has_tokenizer, save_draft

BEFORE_FILE = "before.json"


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(text, file=sys.stderr, flush=True)


def distill(target: str, draft: str, data: str | list[str], out: str | Path, *, objective: str = "both",
            steps: int | None = None, minutes: float | None = None, device: str = "cpu", dtype: str = "float32",
            batch_size: int = 4, prompt_length: int = 64, new_tokens: int = 32, num_beams: int = 4,
            rank_top_k: int = 6, rank_margin: float = 1.0, argmax_weight: float = 1.0, rank_weight: float = 1.0,
            learning_rate: float = 1e-4, warmup_steps: int = 20, save_steps: int = 100, seed: int = 0,
            held_out: float = 0.02, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES, exclude: tuple[str, ...] = (),
            eval_prompts_count: int = 8, eval_new_tokens: int = 32, eval_positions: int = 8192, gamma: int = 4,
            eval_beams: int = 4, beam_depth: int = 3, save_dtype: str | None = None, resume: bool = False,
            threads: int | None = None, progress: bool = True) -> DistillReport:
    """Distill ``draft`` towards ``target`` on text from ``data`` and save it to ``out``.

    ``target``/``draft``: model folders (or cached hub names); ``data``: text files or folders;
    ``objective``: ``"chain"`` (TV + argmax cross-entropy), ``"beam"`` (TV + ranking of the target's kept
    beams) or ``"both"``; ``steps`` or ``minutes`` bound the training (default 200 steps). Returns a
    :class:`DistillReport` (also written to ``out/distill_report.json``). Bad input raises
    :class:`DistillInputError`."""
    from transformers import TrainingArguments

    from specbeam_hf.app.models import (
        check_device,
        check_model_location,
        load_model,
        load_tokenizer,
        quiet_transformers,
    )

    from .trainer import DistillTrainer, TimeLimit

    paths = [data] if isinstance(data, (str, Path)) else list(data)
    paths = [str(p) for p in paths]
    if not paths:
        raise DistillInputError("no --data given; pass text files or a folder of them")
    out = Path(out).expanduser()
    if steps is None and minutes is None:
        steps = 200
    check_options(objective, steps, minutes, num_beams, rank_top_k)
    if dtype not in ("float32", "bfloat16"):
        raise DistillInputError(f"unknown --dtype {dtype!r}; use float32 or bfloat16")
    check_device(device)
    check_model_location(target, "target")
    check_model_location(draft, "draft")
    check_out(out, draft, target, resume)
    if threads:
        torch.set_num_threads(threads)

    tokenizer = load_tokenizer(target)
    draft_path = Path(draft).expanduser()
    draft_tokenizer = load_tokenizer(draft) if not draft_path.is_dir() or has_tokenizer(draft_path) else None
    check_vocab(tokenizer, draft_tokenizer, draft_name=draft)
    with quiet_transformers():  # long files pass the tokenizer's model length: they are cut into prompts
        corpus = load_data(paths, tokenizer, prompt_length, held_out, tuple(suffixes), tuple(exclude))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    target_model = load_model(target, "target", dtype, device)
    draft_model = load_model(draft, "draft", "float32", device)
    check_vocab(tokenizer, None, target_model.get_output_embeddings().weight.shape[0],
                draft_model.get_output_embeddings().weight.shape[0], draft)
    limit = min(getattr(target_model.config, "max_position_embeddings", 1 << 30),
                getattr(draft_model.config, "max_position_embeddings", 1 << 30))
    if prompt_length + max(new_tokens, eval_new_tokens) > limit:
        raise DistillInputError(
            f"--prompt-length {prompt_length} + new tokens {max(new_tokens, eval_new_tokens)} pass the models' "
            f"{limit} positions; lower --prompt-length or --new-tokens"
        )
    for p in target_model.parameters():
        p.requires_grad_(False)

    prompts = eval_prompts(corpus.eval_ids, prompt_length, eval_prompts_count)  # [n, prompt_length]
    settings = dict(objective=objective, steps=steps, minutes=minutes, device=device, dtype=dtype,
                    batch_size=batch_size, prompt_length=prompt_length, new_tokens=new_tokens, num_beams=num_beams,
                    rank_top_k=rank_top_k, rank_margin=rank_margin, argmax_weight=argmax_weight,
                    rank_weight=rank_weight, learning_rate=learning_rate, warmup_steps=warmup_steps, seed=seed,
                    gamma=gamma, eval_beams=eval_beams, beam_depth=beam_depth,
                    eval_prompts=int(prompts.shape[0]), eval_new_tokens=eval_new_tokens,
                    eval_positions=eval_positions, target=target, draft=draft, data=paths)

    def figures(model) -> dict:
        return measure(target_model, model, corpus.eval_ids, prompts, eos, positions=eval_positions,
                       new_tokens=eval_new_tokens, gamma=gamma, num_beams=eval_beams, beam_depth=beam_depth)

    import json

    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / BEFORE_FILE).is_file():
        before = json.loads((out / BEFORE_FILE).read_text())
    else:
        _say(progress, "measuring the draft before distillation ...")
        before = figures(draft_model)
        (out / BEFORE_FILE).write_text(json.dumps(before, indent=2) + "\n")

    timed = minutes is not None
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=steps if not timed else 10**9,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup" if timed else "cosine_with_min_lr",
        lr_scheduler_kwargs={} if timed else {"min_lr_rate": 0.1},
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=max(1, min(25, (steps or 100) // 4)),
        save_steps=save_steps,
        save_total_limit=2,
        report_to=[],
        use_cpu=torch.device(device).type == "cpu",
        bf16=dtype == "bfloat16",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        log_level="warning",
    )
    trainer = DistillTrainer(
        model=draft_model, args=args, train_dataset=PromptWindows(corpus.train_ids, prompt_length),
        target=target_model, objective=objective, eos=eos, new_tokens=new_tokens, num_beams=num_beams,
        rank_top_k=rank_top_k, rank_margin=rank_margin, argmax_weight=argmax_weight, rank_weight=rank_weight,
        callbacks=[TimeLimit(minutes, progress)] if timed else None,
    )
    if timed and progress:  # the time limit's bar of minutes replaces the bar of (unbounded) steps
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
    started = time.perf_counter()
    checkpoint = latest_checkpoint(out) if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started

    with quiet_transformers():
        save_draft(draft_model, out, draft_path if draft_path.is_dir() else None, tokenizer,
                   getattr(torch, save_dtype) if save_dtype else None)
    _say(progress, "measuring the draft after distillation ...")
    after = figures(draft_model)
    report = DistillReport(
        out=str(out), steps=int(trainer.state.global_step), train_seconds=round(train_seconds, 1), before=before,
        after=after, settings=settings,
        data=dict(train_tokens=int(corpus.train_ids.numel()), eval_tokens=int(corpus.eval_ids.numel()),
                  train_files=corpus.train_files, eval_files=corpus.eval_files, split=corpus.split),
    )
    report.write(out)
    return report
