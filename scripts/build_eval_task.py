#!/usr/bin/env python
"""Build the evaluation's reference task from the demo models' held-out stdlib files.

    python scripts/build_eval_task.py      # writes specbeam_hf/app/evaluation/data/heldout_passages.json

The demo pair was trained on CPython's standard library with ~2 % of the files held out (chosen
by a hash of the relative path; ``scripts/train_demo_models.py``). This script takes those same
held-out files (on the Python the models were trained with, 3.11.7; the script refuses another
version, whose stdlib differs), and from each one the first ``--per-file`` functions with a body of
at least ``--min-body-lines`` lines. A passage's prompt is the function's signature plus its first
body line; its reference is the text that follows in the function (at most ``--max-ref-chars``
characters, cut at a line end). The output file is shipped with the package, so the task is the
same on every machine without a stdlib scan; the evaluation cuts each reference to as many
target tokens as it generates.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from train_demo_models import collect_files, split_files  # noqa: E402

OUT = REPO / "specbeam_hf" / "app" / "evaluation" / "data" / "heldout_passages.json"
TRAINED_ON = "3.11.7"


def passages_of(rel: str, text: str, per_file: int, min_body_lines: int, max_ref_chars: int) -> list[dict]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    functions = sorted(
        (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
        key=lambda n: n.lineno,
    )
    out: list[dict] = []
    for fn in functions:
        first = fn.body[0]
        # the body starts on its own line after the signature (skip one-liners such as "def f(): pass")
        if first.lineno <= fn.lineno or fn.end_lineno - first.lineno + 1 < min_body_lines:
            continue
        start = fn.lineno - 1  # the "def" line (decorators left out)
        prompt_end = first.lineno  # signature lines + the first body line
        if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str):
            prompt_end = first.end_lineno  # a docstring goes into the prompt whole
            if fn.end_lineno - prompt_end < min_body_lines // 2:
                continue
        prompt = "".join(lines[start:prompt_end])
        reference = ""
        for line in lines[prompt_end : fn.end_lineno]:
            if len(reference) + len(line) > max_ref_chars:
                break
            reference += line
        if len(reference.strip()) < 80 or len(prompt) > 600:
            continue
        out.append({"id": f"{rel}:{fn.lineno}", "file": rel, "line": fn.lineno, "prompt": prompt, "reference": reference})
        if len(out) == per_file:
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-file", type=int, default=2)
    p.add_argument("--min-body-lines", type=int, default=8)
    p.add_argument("--max-ref-chars", type=int, default=500)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--any-python", action="store_true", help="build even on a Python other than the models' 3.11.7")
    args = p.parse_args(argv)
    version = ".".join(map(str, sys.version_info[:3]))
    if version != TRAINED_ON and not args.any_python:
        p.error(f"the demo models were trained on the stdlib of Python {TRAINED_ON}; this is {version} (--any-python to build anyway)")
    _, held_out = split_files(collect_files())
    passages = []
    for rel, text in held_out:  # sorted by path
        passages.extend(passages_of(rel, text, args.per_file, args.min_body_lines, args.max_ref_chars))
    data = {
        "source": f"held-out validation files of the demo models (CPython {version} standard library, "
                  "the split of scripts/train_demo_models.py); Python Software Foundation License",
        "built_by": "python scripts/build_eval_task.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "held_out_files": [rel for rel, _ in held_out],
        "passages": passages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(passages)} passages from {len({q['file'] for q in passages})} of {len(held_out)} held-out files -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
