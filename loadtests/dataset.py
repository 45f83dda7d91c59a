"""Prompt dataset: a JSONL of ``{"prompt": str, "max_tokens": int, "prompt_tokens": int}``.

The shipped ``prompts.jsonl`` was built from CPython's standard library (the text the demo models
were trained on) by::

    python -m loadtests.dataset --out loadtests/prompts.jsonl --num 200 --seed 0

Prompt lengths (in target tokens) and output lengths are drawn from log-normal distributions
(medians ``--prompt-median`` / ``--output-median``), clipped so that prompt + output fits the
servers' ``--max-model-len 512``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
from pathlib import Path

DEFAULT_DATASET = Path(__file__).with_name("prompts.jsonl")
DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "specbeam_hf/demo_models/target/tokenizer.json"


def load_dataset(path: str | Path = DEFAULT_DATASET, max_tokens_cap: int | None = None) -> list[dict]:
    """Records of the JSONL file; ``max_tokens_cap`` lowers every record's ``max_tokens``."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ValueError(f"{path}:{n}: a record needs a non-empty 'prompt'")
        mt = int(rec.get("max_tokens", 64))
        if mt < 1:
            raise ValueError(f"{path}:{n}: max_tokens must be >= 1")
        if max_tokens_cap is not None:
            mt = min(mt, max_tokens_cap)
        records.append({"prompt": rec["prompt"], "max_tokens": mt,
                        "prompt_tokens": rec.get("prompt_tokens")})
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma)))))


def _source_files(root: Path) -> list[Path]:
    skip = ("test", "tests", "idle_test", "site-packages", "encodings", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.parts)
                  and p.stat().st_size > 2000)


def build(num: int, seed: int, tokenizer_path: Path, prompt_median: int, output_median: int,
          max_total: int) -> list[dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    rng = random.Random(seed)
    files = _source_files(Path(sysconfig.get_paths()["stdlib"]))
    out: list[dict] = []
    while len(out) < num:
        path = rng.choice(files)
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        want = _lognormal_int(rng, prompt_median, 0.7, 8, 320)
        start = rng.randrange(max(1, len(lines) - 20))
        text = ""
        for line in lines[start:]:
            text += line
            if len(tok.encode(text).ids) >= want:
                break
        ids = tok.encode(text).ids[:want]
        prompt = tok.decode(ids)
        n_prompt = len(tok.encode(prompt).ids)
        if n_prompt < 4 or not prompt.strip():
            continue
        max_tokens = _lognormal_int(rng, output_median, 0.5, 8, 256)
        max_tokens = min(max_tokens, max_total - n_prompt - 1)  # -1: the BOS the server adds
        if max_tokens < 8:
            continue
        out.append({"prompt": prompt, "max_tokens": max_tokens, "prompt_tokens": n_prompt,
                    "source": str(path.relative_to(sysconfig.get_paths()["stdlib"]))})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--prompt-median", type=int, default=64, help="median prompt length, tokens")
    ap.add_argument("--output-median", type=int, default=64, help="median max_tokens")
    ap.add_argument("--max-total", type=int, default=480, help="prompt + output cap, tokens")
    args = ap.parse_args(argv)
    recs = build(args.num, args.seed, args.tokenizer, args.prompt_median, args.output_median, args.max_total)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    p = sorted(r["prompt_tokens"] for r in recs)
    o = sorted(r["max_tokens"] for r in recs)
    print(f"wrote {len(recs)} prompts to {args.out}: prompt tokens median {p[len(p) // 2]} "
          f"(min {p[0]}, max {p[-1]}), max_tokens median {o[len(o) // 2]} (min {o[0]}, max {o[-1]})")


if __name__ == "__main__":
    main()
