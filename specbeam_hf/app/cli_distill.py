"""``specbeam distill``: fine-tune a draft on what its target does (:func:`specbeam_hf.distill.distill`),
print the before/after table and write the draft, checkpoints and ``distill_report.json`` to ``--out``."""

from __future__ import annotations

import argparse

from .errors import UsageError
from .models import DEMO_DRAFT, DEMO_TARGET, DTYPES
from .options import HelpFormatter, non_negative_int, positive_int

OBJECTIVES = ("chain", "beam", "both")


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="fine-tune a draft on what its target does, so speculation accepts more",
        description="Fine-tune --draft towards --target on prompts cut out of --data: continuations sampled by the "
                    "draft (on-policy) and the target's greedy, sampled and beam continuations, all scored by the "
                    "target. Losses: total variation between the two next-token distributions (1 - acceptance of "
                    "speculative sampling) and cross-entropy to the target's argmax for chains; a ranking hinge "
                    "that puts the target's kept beams in the draft's top candidates for beams. Writes the draft "
                    "(save_pretrained, tokenizer copied), checkpoints and distill_report.json to --out, and prints "
                    "greedy agreement, mean accepted length and beam steps per target pass on held-out prompts, "
                    "before and after.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", default=str(DEMO_TARGET), help="target model folder or model-hub name "
                                                             "(default: the shipped demo target)")
    p.add_argument("--draft", default=str(DEMO_DRAFT), help="draft model folder or model-hub name "
                                                           "(default: the shipped demo draft)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILES_OR_DIR",
                   help="text files, or folders searched for --suffixes files; a hash of each file's path holds "
                        "--held-out of them out for the before/after figures")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the distilled draft (empty, or with "
                                                                "--resume the folder of an earlier run)")
    p.add_argument("--objective", choices=OBJECTIVES, default="both",
                   help="chain: speculative chains; beam: speculative beam search; both")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="optimizer steps in all, a resumed run's included (default 200 when --minutes is "
                             "not given)")
    budget.add_argument("--minutes", type=_minutes, default=None, metavar="M",
                        help="train for this long instead, from now, a resumed run too (constant learning rate "
                             "after warm-up)")
    p.add_argument("--device", default="cpu", help="where both models run: cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the target's dtype, and bfloat16 autocast for the draft when bfloat16")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="prompts per step")
    p.add_argument("--prompt-length", type=positive_int, default=64, metavar="N", help="tokens per prompt")
    p.add_argument("--new-tokens", type=positive_int, default=32, metavar="N", help="tokens generated per prompt")
    p.add_argument("--num-beams", type=positive_int, default=4, metavar="B", help="beams of the target's beam search")
    p.add_argument("--rank-top-k", type=positive_int, default=6, metavar="K",
                   help="draft candidates the kept beams must be among (speculative beam search drafts B + 2)")
    p.add_argument("--argmax-weight", type=float, default=1.0, metavar="W",
                   help="weight of the cross-entropy to the target's argmax")
    p.add_argument("--rank-weight", type=float, default=1.0, metavar="W", help="weight of the beam ranking loss")
    p.add_argument("--learning-rate", type=float, default=1e-4, metavar="LR", help="AdamW peak learning rate")
    p.add_argument("--warmup-steps", type=non_negative_int, default=20, metavar="N", help="learning-rate warm-up")
    p.add_argument("--save-steps", type=positive_int, default=100, metavar="N", help="checkpoint every N steps")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the prompts and samples")
    p.add_argument("--held-out", type=_fraction, default=0.02, metavar="F",
                   help="fraction of the files held out for the figures")
    p.add_argument("--suffixes", default=".txt,.md,.rst,.py", metavar="LIST",
                   help="file endings read from --data folders, comma-separated")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out files whose relative path, or a folder on it, matches (repeatable)")
    p.add_argument("--eval-prompts", type=positive_int, default=8, metavar="N", help="held-out prompts measured")
    p.add_argument("--eval-new-tokens", type=positive_int, default=32, metavar="N", help="tokens per held-out prompt")
    p.add_argument("--eval-positions", type=positive_int, default=8192, metavar="N",
                   help="held-out positions of the greedy agreement")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the saved weights (default: the input draft's)")
    p.add_argument("--threads", type=non_negative_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (default: on)")
    return p


def run(args) -> int:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise UsageError("specbeam distill needs accelerate: pip install 'specbeam[distill]'") from None
    from rich.console import Console
    from rich.table import Table

    from specbeam_hf.distill import distill

    suffixes = tuple(s.strip() if s.strip().startswith(".") else f".{s.strip()}"
                     for s in args.suffixes.split(",") if s.strip())
    report = distill(
        args.target, args.draft, args.data, args.out, objective=args.objective, steps=args.steps,
        minutes=args.minutes, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        prompt_length=args.prompt_length, new_tokens=args.new_tokens, num_beams=args.num_beams,
        rank_top_k=args.rank_top_k, argmax_weight=args.argmax_weight, rank_weight=args.rank_weight,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, save_steps=args.save_steps,
        seed=args.seed, held_out=args.held_out, suffixes=suffixes, exclude=tuple(args.exclude),
        eval_prompts_count=args.eval_prompts, eval_new_tokens=args.eval_new_tokens,
        eval_positions=args.eval_positions, save_dtype=args.save_dtype, resume=args.resume,
        threads=args.threads or None, progress=args.progress,
    )
    console = Console(highlight=False)
    table = Table(title=f"specbeam distill — {report.steps} steps, {report.train_seconds / 60:.1f} min, "
                        f"{report.settings['eval_prompts']} held-out prompts", header_style="bold")
    table.add_column("figure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote the distilled draft and distill_report.json to {report.out}", style="dim")
    if report.improved() is False:
        console.print(f"the distilled draft measures worse than {args.draft} on every held-out figure: keep the input "
                      "draft, or try a lower --learning-rate or a longer run", style="yellow")
    return 0
