"""``specbeam generate --num-beams B``: exact speculative beam search (``--mode sample``: beam
sampling, seeded by ``--seed``) from the command line.

Runs ``target.generate(num_beams=B, custom_generate=specbeam_hf.generate, assistant=...)`` on one
prompt, prints the returned hypotheses best first with their ``sequences_scores``, and the beam
statistics (beam steps, target passes, steps per pass, the depth each pass drafted). ``--compare-hf``
also runs HF's own ``target.generate(num_beams=B)`` with the same settings (after an untimed short
warm-up of both; without it specbeam's path alone is warmed up, unless ``--no-warmup``) and reports
whether the two returned the same sequences, the largest score difference and the speed-up; the exit
status is 1 if they differ.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from specbeam_hf.assistant import SpecBeam
from specbeam_hf.generate import generate as specbeam_generate

from .errors import UsageError, one_line


def _early_stopping(text: str) -> bool | str:
    return {"true": True, "false": False, "never": "never"}[text]


def _sampling(args) -> dict[str, Any]:
    """``--mode sample``: beam sampling with the CLI's sampling options (top-k off unless given, where
    HF's default would be 50)."""
    if args.mode != "sample":
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=1.0 if args.temperature is None else args.temperature,
                top_k=0 if args.top_k is None else args.top_k, top_p=1.0 if args.top_p is None else args.top_p)


def _seeded(args) -> None:
    """Beam sampling draws from torch's global generator, as HF's loop does: ``--seed`` seeds it
    before each timed run, so ``--compare-hf`` compares the same draws."""
    if args.mode == "sample" and args.seed is not None:
        torch.manual_seed(args.seed)


def beam_kwargs(args, tokenizer, eos_ids: list[int]) -> dict[str, Any]:
    """The HF ``generate`` settings of a beam run (also what ``--compare-hf`` gives HF)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return dict(
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        length_penalty=args.length_penalty,
        early_stopping=_early_stopping(args.early_stopping),
        max_new_tokens=args.max_new_tokens,
        **_sampling(args),
        eos_token_id=eos_ids or None,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_scores=True,
    )


def run_beams(args, tokenizer, target, assistant: SpecBeam, prompt_ids: list[int], eos_ids: list[int],
              load_seconds: float) -> int:
    from rich.console import Console
    from rich.table import Table

    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)  # [1, prompt_len]
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))  # [1, prompt_len] each
    kwargs = beam_kwargs(args, tokenizer, eos_ids)
    warm = dict(kwargs, max_new_tokens=min(8, args.max_new_tokens))
    if args.compare_hf:  # untimed warm-up of both paths, so neither timing pays first-call costs
        target.generate(**inputs, **warm)
    if args.compare_hf or args.warmup:
        try:
            target.generate(**inputs, **warm, custom_generate=specbeam_generate, assistant=assistant)
        except ValueError as exc:  # e.g. prompt + new tokens past the models' positions
            raise UsageError(one_line(exc)) from None
    _seeded(args)
    started = time.perf_counter()
    try:
        result = target.generate(**inputs, **kwargs, custom_generate=specbeam_generate, assistant=assistant)
    except ValueError as exc:  # e.g. prompt + new tokens past the models' positions
        raise UsageError(one_line(exc)) from None
    seconds = time.perf_counter() - started
    stats = assistant.last_beam_stats
    width = input_ids.shape[1]
    hypotheses = [
        {
            "rank": i + 1,
            "score": float(score),
            "token_ids": [int(t) for t in seq[width:] if int(t) != kwargs["pad_token_id"]],
            "text": tokenizer.decode(seq[width:], skip_special_tokens=True),
        }
        for i, (seq, score) in enumerate(zip(result.sequences, result.sequences_scores))
    ]
    summary = dict(
        stats.summary(),
        seconds=seconds,
        beam_steps_per_second=stats.steps / seconds if seconds > 0 else 0.0,
        depths=[r["depth"] for r in stats.records],
    )

    comparison = None
    if args.compare_hf:
        _seeded(args)
        started = time.perf_counter()
        ref = target.generate(**inputs, **kwargs)
        hf_seconds = time.perf_counter() - started
        same = ref.sequences.shape == result.sequences.shape and torch.equal(ref.sequences, result.sequences)
        comparison = {
            "same_sequences": bool(same),
            "max_score_difference": float((ref.sequences_scores - result.sequences_scores).abs().max())
            if same
            else None,
            "hf_seconds": hf_seconds,
            "speedup": hf_seconds / seconds if seconds > 0 else None,
        }

    for h in hypotheses:
        out.rule(f"hypothesis {h['rank']}  score {h['score']:.4f}")
        out.print(args.prompt + h["text"], markup=False)
    out.rule()
    if args.verbose:
        table = Table(title=f"specbeam generate — beam search, B = {args.num_beams}", header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in (
            ("beam steps", f"{stats.steps}"),
            ("target passes", f"{stats.target_forwards}"),
            ("beam steps per target pass", f"{stats.steps_per_target_forward:.2f}"),
            ("draft forwards", f"{stats.draft_forwards}"),
            ("depth drafted per pass", " ".join(str(d) for d in summary["depths"])),
            ("decoding time", f"{seconds:.3f} s"),
            ("model load time", f"{load_seconds:.2f} s"),
        ):
            table.add_row(name, value)
        out.print(table)
    line = (
        f"B = {args.num_beams}: {stats.steps} beam steps in {stats.target_forwards} target passes "
        f"({stats.steps_per_target_forward:.2f} per pass), {seconds:.2f} s"
    )
    if comparison is not None:
        verdict = "same sequences as" if comparison["same_sequences"] else "DIFFERENT sequences from"
        line += (
            f" | {verdict} HF's beam search ({comparison['hf_seconds']:.2f} s, speed-up {comparison['speedup']:.2f}×)"
        )
    err.print(line, style="dim", soft_wrap=True)

    if args.json_log is not None:
        options = {k: v for k, v in vars(args).items() if k not in ("command", "_handler", "_argv")}
        log = {
            "command": "generate",
            "options": options,
            "prompt": args.prompt,
            "prompt_token_ids": list(prompt_ids),
            "hypotheses": hypotheses,
            "summary": summary,
            "records": stats.records,
            "compare_hf": comparison,
        }
        try:
            Path(args.json_log).expanduser().write_text(
                json.dumps(log, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        except OSError as exc:
            raise UsageError(f"cannot write --json-log {args.json_log}: {exc.strerror or exc}") from None
    return 1 if comparison is not None and not comparison["same_sequences"] else 0
