"""The reference task: prompts and reference continuations from the demo models' held-out files.

``data/heldout_passages.json`` is built by ``scripts/build_eval_task.py`` from the stdlib files the
demo pair never saw in training (the split of ``scripts/train_demo_models.py``) and shipped with the
package, so the task is the same everywhere. Passages are taken round-robin over the files (the
first passage of every file, then the second ...), so a small ``num_prompts`` still spans many files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PASSAGES = Path(__file__).parent / "data" / "heldout_passages.json"


@dataclass(frozen=True)
class Passage:
    id: str
    prompt: str
    reference: str  # the text that follows the prompt in the held-out file


def load_passages(num_prompts: int | None = None, path: Path = PASSAGES) -> list[Passage]:
    """The first ``num_prompts`` passages in round-robin file order (all of them if None)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    by_file: dict[str, list[dict]] = {}
    for p in data["passages"]:
        by_file.setdefault(p["file"], []).append(p)
    ordered: list[dict] = []
    rank = 0
    while len(ordered) < len(data["passages"]):
        ordered.extend(ps[rank] for ps in by_file.values() if rank < len(ps))
        rank += 1
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        ordered = ordered[:num_prompts]
    return [Passage(p["id"], p["prompt"], p["reference"]) for p in ordered]


def reference_text(tokenizer, passage: Passage, num_tokens: int) -> str:
    """The reference cut to its first ``num_tokens`` tokens (the length each mode generates)."""
    ids = tokenizer(passage.reference, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:num_tokens], skip_special_tokens=True)
