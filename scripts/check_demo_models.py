#!/usr/bin/env python
"""Check the shipped demo model pair in ``specbeam_hf/demo_models``.

Loads both folders with ``AutoModelForCausalLM.from_pretrained(path,
dtype=torch.float32)`` / ``AutoTokenizer.from_pretrained`` and prints
parameter counts, greedy (argmax) agreement on held-out stdlib positions,
the per-forward decode cost at batch 1 with a KV cache (median) of each
model, and their ratio.  Helpers come from ``train_demo_models.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_models as tdm  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=tdm.DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--agree-positions", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=50, help="timed decode forwards per model")
    p.add_argument("--prompt", default="def main(")
    p.add_argument("--max-new-tokens", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tpath, dpath = args.models_dir / "target", args.models_dir / "draft"
    target = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(dpath, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tpath)
    dtok = AutoTokenizer.from_pretrained(dpath)
    assert tok.get_vocab() == dtok.get_vocab(), "target and draft tokenizers differ"

    print(f"target: {tdm.n_params(target):,} params, {tdm.folder_mb(tpath):.1f} MB ({tpath})")
    print(f"draft:  {tdm.n_params(draft):,} params, {tdm.folder_mb(dpath):.1f} MB ({dpath})")
    print(f"total size: {tdm.folder_mb(tpath) + tdm.folder_mb(dpath):.1f} MB")

    val_ids = tdm.load_val_ids(tok)
    agree, n = tdm.greedy_agreement(target, draft, val_ids, args.agree_positions)
    print(f"held-out loss (nats/token): target {tdm.eval_loss(target, val_ids):.4f}, "
          f"draft {tdm.eval_loss(draft, val_ids):.4f}")
    print(f"greedy agreement on {n:,} held-out positions: {100 * agree:.2f} %")

    t_ms = tdm.decode_cost_ms(target, n_runs=args.runs)
    d_ms = tdm.decode_cost_ms(draft, n_runs=args.runs)
    print(f"decode cost (batch 1, 1 token, KV cache, median of {args.runs}, {args.threads} threads): "
          f"target {t_ms:.2f} ms, draft {d_ms:.2f} ms, ratio {t_ms / d_ms:.1f}x")

    text = tdm.greedy_continuation(target, tok, args.prompt, args.max_new_tokens)
    print(f"target greedy continuation ({args.max_new_tokens} tokens):\n{args.prompt}{text}")
    ok = agree >= 0.60 and t_ms / d_ms >= 10
    print("OK" if ok else "FAIL: need agreement >= 60 % and cost ratio >= 10x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
