"""The distilled draft as a ``save_pretrained`` folder: weights in the dtype the input draft stored them
in (its ``config.json`` dtype kept, so ``from_pretrained`` loads it as it loaded the input), the input
draft's tokenizer files copied (the target's tokenizer when the draft has none)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "vocab.txt", "added_tokens.json", "chat_template.jinja")


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in the folder's first safetensors file, if any."""
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in names:
                return names[entry["dtype"]]
    return None


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def save_draft(model, out: Path, source: Path | None, tokenizer, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` to ``out`` as described above (``dtype`` overrides the stored dtype)."""
    out.mkdir(parents=True, exist_ok=True)
    want = dtype or (stored_dtype(source) if source is not None and source.is_dir() else None) or torch.float32
    config_dtype = json.loads((source / "config.json").read_text()).get("dtype") if source and source.is_dir() else None
    saved = copy.deepcopy(model).to(want)
    saved.save_pretrained(out, safe_serialization=True)
    if config_dtype is not None:
        path = out / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = config_dtype
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source is not None and source.is_dir() and has_tokenizer(source):
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    else:
        tokenizer.save_pretrained(out)
