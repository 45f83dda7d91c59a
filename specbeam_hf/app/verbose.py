"""What ``specbeam generate`` prints: the ``--verbose`` iteration lines (accepted, recovered, bonus
and rejected tokens), the summary line and table, and the JSON log.

On a terminal the kinds of token are told apart by colour; when stdout is not a terminal (a pipe, a
file) each run of tokens is also bracketed with its kind's symbol, so the distinction survives
without colour: ``[✓ accepted][↻ recovered][+ bonus]  [✗ rejected]``.
"""

from __future__ import annotations

import json
from typing import Any

# kind -> (colour, symbol), in the order an iteration prints them
KINDS = {
    "accepted": ("green", "✓"),
    "recovered": ("bold red", "↻"),
    "bonus": ("bold cyan", "+"),
    "rejected": ("dim strike", "✗"),
}
LEGEND = {
    "accepted": "accepted draft",
    "recovered": "corrected by target",
    "bonus": "bonus (all drafts accepted)",
    "rejected": "rejected draft",
}


def token_text(tokenizer, token: int) -> str:
    """One token as readable text: whitespace made visible, partial UTF-8 shown as bytes."""
    text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" in text:  # a piece of a multi-byte character
        piece = tokenizer.convert_ids_to_tokens(token)
        text = piece if isinstance(piece, str) else text
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def classify(record, row: int = 0) -> dict[str, list[int]]:
    """Split one row of a step into accepted drafts, the recovered or bonus token, and rejected drafts."""
    drafted = record.drafted_tokens[row]
    k = record.num_accepted[row]
    emitted = record.emitted_tokens[row]
    last = emitted[k:]  # the target's own token (absent if a stop condition cut the step short)
    bonus = bool(record.bonus[row])
    return {
        "accepted": emitted[:k],
        "recovered": [] if bonus else last,
        "bonus": last if bonus else [],
        "rejected": drafted[k:],
    }


def legend(symbols: bool):
    from rich.text import Text

    line = Text("legend: ")
    for i, (kind, (style, symbol)) in enumerate(KINDS.items()):
        if i:
            line.append("  ")
        line.append(f"[{symbol} {LEGEND[kind]}]" if symbols else LEGEND[kind], style=style)
    return line


def _append_run(line, text: str, kind: str, symbols: bool) -> None:
    style, symbol = KINDS[kind]
    line.append(f"[{symbol} {text}]" if symbols else text, style=style)


def iteration_line(tokenizer, record, gamma_width: int, symbols: bool = False, step: int | None = None):
    """One iteration: its step number (``step``, else the engine's own count), accepted/drafted, then
    its tokens by kind."""
    from rich.text import Text

    parts = classify(record)
    drafted = len(record.drafted_tokens[0])
    number = record.step if step is None else step
    line = Text(f"{number:>4}  {record.num_accepted[0]:>{gamma_width}}/{drafted:<{gamma_width}}  ", style="dim")
    for kind in ("accepted", "recovered", "bonus"):
        if parts[kind]:
            if symbols:
                _append_run(line, "".join(token_text(tokenizer, t) for t in parts[kind]), kind, True)
            else:
                for token in parts[kind]:
                    line.append(token_text(tokenizer, token), style=KINDS[kind][0])
    if parts["rejected"]:
        line.append("  ")
        _append_run(line, "".join(token_text(tokenizer, t) for t in parts["rejected"]), "rejected", symbols)
    return line


def summary(stats, tokens: int, seconds: float) -> dict[str, Any]:
    out = dict(stats.summary())
    out.update(
        generated_tokens=tokens,
        wall_seconds=seconds,
        # decoding time only (the engine's own step time): printing --verbose lines is not generation
        tokens_per_second=tokens / stats.seconds if stats.seconds > 0 else 0.0,
    )
    return out


def summary_line(summary: dict[str, Any], finish_reason: str | None) -> str:
    return (
        f"{summary['generated_tokens']} tokens in {summary['wall_seconds']:.2f} s "
        f"({summary['tokens_per_second']:.1f} tokens/s, warm) | acceptance rate {summary['acceptance_rate']:.1%} | "
        f"mean accepted length {summary['mean_accepted_length']:.2f} | "
        f"{summary['target_forwards']} target forwards | finish: {finish_reason}"
    )


def summary_table(summary: dict[str, Any], args, finish_reason: str | None, load_seconds: float, warmup_seconds: float):
    from rich.table import Table

    table = Table(title="specbeam generate", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("generated tokens", f"{summary['generated_tokens']}"),
        ("wall time (incl. printing)", f"{summary['wall_seconds']:.3f} s"),
        ("decoding time", f"{summary['seconds']:.3f} s"),
        ("tokens/s (warm)", f"{summary['tokens_per_second']:.1f}"),
        ("acceptance rate", f"{summary['acceptance_rate']:.1%} ({summary['accepted']}/{summary['drafted']} drafts)"),
        ("mean accepted length", f"{summary['mean_accepted_length']:.2f} tokens / target forward"),
        ("iterations (steps)", f"{summary['steps']}"),
        ("target forwards", f"{summary['target_forwards']}"),
        ("draft forwards", f"{summary['draft_forwards']}"),
        ("corrected / bonus tokens", f"{summary['recovered']} / {summary['bonus']}"),
        ("drafter", f"{args.drafter}"),
        ("draft length γ", f"{args.draft_length}"),
        ("mode", args.mode),
        ("finish reason", f"{finish_reason}"),
        ("model load time", f"{load_seconds:.2f} s"),
        ("warm-up (untimed)", f"{warmup_seconds:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def json_log(args, prompt: str, prompt_ids, request, tokenizer, engine, summary: dict[str, Any], text: str,
             version: str) -> dict[str, Any]:
    stats = json.loads(engine.stats.to_json())
    steps = stats["steps"]
    for step, record in zip(steps, engine.stats.records):
        step["drafted_strings"] = [[token_text(tokenizer, t) for t in row] for row in record.drafted_tokens]
        step["emitted_strings"] = [[token_text(tokenizer, t) for t in row] for row in record.emitted_tokens]
        parts = classify(record)
        step["kinds"] = [{kind: [token_text(tokenizer, t) for t in toks] for kind, toks in parts.items()}]
    options = {k: v for k, v in vars(args).items() if k not in ("command", "_handler", "_argv")}
    return {
        "specbeam_version": version,
        "command": "generate",
        "options": options,
        "prompt": prompt,
        "prompt_token_ids": list(prompt_ids),
        "output_text": text,
        "output_token_ids": list(request.output),
        "finish_reason": request.finish_reason,
        "summary": summary,
        "steps": steps,
    }
