"""Input checks made before anything is trained; each failure is one line naming the problem and its fix."""

from __future__ import annotations

from pathlib import Path

from .errors import DistillInputError
from .rollouts import MIXES

CHECKPOINTS = "checkpoints"


def check_options(objective: str, steps: int | None, minutes: float | None, num_beams: int, rank_top_k: int) -> None:
    if objective not in MIXES:
        raise DistillInputError(f"unknown objective {objective!r}; use one of {', '.join(MIXES)}")
    if steps is not None and minutes is not None:
        raise DistillInputError("give --steps or --minutes, not both")
    if steps is not None and steps < 1:
        raise DistillInputError(f"--steps must be at least 1, got {steps}")
    if minutes is not None and not minutes > 0:
        raise DistillInputError(f"--minutes must be more than 0, got {minutes}")
    if num_beams < 2:
        raise DistillInputError(f"--num-beams must be at least 2, got {num_beams}")
    if rank_top_k < 1:
        raise DistillInputError(f"--rank-top-k must be at least 1, got {rank_top_k}")


def check_out(out: Path, draft: str, target: str, resume: bool) -> None:
    """``out`` must not be (or hold) the input draft or target; a non-empty ``out`` is only resumed."""
    where = out.expanduser().resolve()
    for role, name in (("draft", draft), ("target", target)):
        model = Path(name).expanduser()
        if not model.exists():
            continue
        model = model.resolve()
        if where == model or where in model.parents:
            raise DistillInputError(
                f"--out {out} would overwrite the input {role} model ({name}); choose another folder for the "
                "distilled draft"
            )
    if where.exists() and not where.is_dir():
        raise DistillInputError(f"--out {out} is a file; pass a folder for the distilled draft")
    if resume:
        if not latest_checkpoint(where):
            raise DistillInputError(f"--resume: {out} holds no checkpoint to resume; run without --resume first")
    elif where.exists() and any(where.iterdir()):
        raise DistillInputError(
            f"--out {out} is not empty; pass --resume to continue the run saved there, or choose an empty folder"
        )


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def check_vocab(target_tokenizer, draft_tokenizer, target_rows: int | None = None, draft_rows: int | None = None,
                draft_name: str = "draft") -> None:
    """The draft must share the target's tokenizer (its embedding may be padded to another size)."""
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise DistillInputError(
            f"the draft's vocabulary ({len(draft_tokenizer)} tokens) differs from the target's "
            f"({len(target_tokenizer)}); distillation needs a draft built on the target's tokenizer"
        )
    if draft_tokenizer is None and None not in (target_rows, draft_rows) and target_rows != draft_rows:
        raise DistillInputError(
            f"the draft's vocabulary ({draft_rows} tokens) differs from the target's ({target_rows}); "
            f"distillation needs a draft built on the target's tokenizer ({draft_name} has no tokenizer files "
            "to show it shares one)"
        )
