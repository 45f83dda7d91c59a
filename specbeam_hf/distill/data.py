"""Text for distillation: files from the ``--data`` paths, a held-out split by file, and prompts cut
out of the token stream.

A file is held out when a hash of its path (relative to the folder given) falls in the held-out
fraction: the same rule and hash as ``scripts/train_demo_models.py``, so the demo models' held-out
files stay held out. Documents are joined as ``EOS doc EOS doc ...``. With no file in the held-out
fraction (a small data set), the last tenth of the token stream is held out instead.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DistillInputError

DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py")


@dataclass
class TextFile:
    rel: str  # path relative to the folder it was found in (the file's name when given directly)
    text: str


@dataclass
class DistillData:
    """The training and held-out token streams, and how they were made."""

    train_ids: torch.Tensor  # [train_tokens]
    eval_ids: torch.Tensor  # [eval_tokens]
    train_files: int
    eval_files: int
    split: str  # "files" (held out by path hash) or "tail" (last tenth of the stream)


def is_held_out(rel: str, fraction: float) -> bool:
    """The demo models' split: the first 8 bytes of sha1(relative path), modulo 10,000."""
    h = int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < int(round(fraction * 10_000))


def _excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts[:-1]) for p in patterns)


def collect_files(paths: list[str], suffixes: tuple[str, ...] = DEFAULT_SUFFIXES,
                  exclude: tuple[str, ...] = ()) -> list[TextFile]:
    """The readable, non-empty text files under ``paths`` (folders searched recursively for ``suffixes``;
    files taken as they are), sorted by relative path within each path. ``exclude``: glob patterns
    matched against the relative path and against each folder name on it."""
    files: list[TextFile] = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.exists():
            raise DistillInputError(f"--data {name}: no such file or folder; pass text files or a folder of them")
        if path.is_file():
            found = [(path.name, path)]
        else:
            found = sorted(
                (p.relative_to(path).as_posix(), p)
                for p in path.rglob("*")
                if p.is_file() and p.suffix in suffixes
            )
        for rel, p in found:
            if _excluded(rel, exclude):
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                files.append(TextFile(rel, text))
    if not files:
        wanted = ", ".join(suffixes)
        raise DistillInputError(
            f"--data {' '.join(paths)}: no readable text files ({wanted}) found; pass UTF-8 text files or a "
            "folder holding them (--suffixes sets which endings count)"
        )
    return files


def encode(tokenizer, texts: list[str], separator: int) -> torch.Tensor:
    """``separator doc separator doc ...`` as one stream of token ids."""
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids.append(separator)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)  # [tokens]


def load_data(paths: list[str], tokenizer, prompt_length: int, held_out: float = 0.02,
              suffixes: tuple[str, ...] = DEFAULT_SUFFIXES, exclude: tuple[str, ...] = ()) -> DistillData:
    """Read, split and tokenize; raise :class:`DistillInputError` when no prompt can be cut."""
    files = collect_files(paths, suffixes, exclude)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    train = [f.text for f in files if not is_held_out(f.rel, held_out)]
    evals = [f.text for f in files if is_held_out(f.rel, held_out)]
    split = "files"
    if not train or not evals:
        stream = encode(tokenizer, [f.text for f in files], separator)  # [tokens]
        cut = stream.numel() - max(1, stream.numel() // 10)
        train_ids, eval_ids, split = stream[:cut], stream[cut:], "tail"
    else:
        train_ids, eval_ids = encode(tokenizer, train, separator), encode(tokenizer, evals, separator)
    need = 2 * prompt_length + 1
    if train_ids.numel() < need or eval_ids.numel() < prompt_length + 1:
        total = train_ids.numel() + eval_ids.numel()
        raise DistillInputError(
            f"--data has too little text: {total} tokens ({train_ids.numel()} to train on, {eval_ids.numel()} "
            f"held out); cutting {prompt_length}-token prompts needs at least {need} to train on and "
            f"{prompt_length + 1} held out: add text or lower --prompt-length"
        )
    train_files = len(train) if split == "files" else len(files)
    return DistillData(train_ids, eval_ids, train_files, len(evals) if split == "files" else 0, split)


class PromptWindows(torch.utils.data.Dataset):
    """Every ``length``-token window of a token stream, one per start offset (the trainer's sampler
    shuffles them, seeded, so a resumed run draws the same prompts)."""

    def __init__(self, ids: torch.Tensor, length: int) -> None:
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return self.ids.numel() - self.length

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i : i + self.length]}  # [length]


def eval_prompts(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` prompts of ``length`` tokens spread evenly over the held-out stream (fewer if it is short)."""
    room = ids.numel() - length
    count = max(1, min(count, room))
    starts = [round(i * room / count) for i in range(count)]
    return torch.stack([ids[s : s + length] for s in starts])  # [count, length]
