#!/usr/bin/env python
"""Train a second small target/draft pair on another corpus, apart from each other, to try
``specbeam distill`` on a pair that is not the demo pair.

    python scripts/train_second_pair.py --data DIR [DIR ...] --out-dir /tmp/second_pair

A byte-level BPE tokenizer and both models are trained on the ``.py`` files under ``--data`` (files
held out by the same path hash as ``specbeam distill`` uses, so its figures stay on unseen files).
The target (6 layers, width 256) and the draft (1 layer, width 128) each learn the next token on
their own, for a fixed number of minutes; the draft never sees the target. Weights are saved as
bf16 safetensors whose ``config.json`` says float32, like the demo pair.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_models as tdm  # noqa: E402

from specbeam_hf.distill.data import collect_files, encode, is_held_out  # noqa: E402

VOCAB = 2048
TARGET = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=768)
DRAFT = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=384)


def train(model, ids: torch.Tensor, minutes: float, lr: float, seed: int, batch: int = 8, seq: int = 256) -> int:
    opt = tdm.make_optimizer(model, lr, 0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    started, step = time.monotonic(), 0
    budget = 60 * minutes
    while time.monotonic() - started < budget:
        frac = (time.monotonic() - started) / budget
        for g in opt.param_groups:  # linear warm-up over 5 %, then cosine to 10 %, by elapsed time
            g["lr"] = lr * min(1.0, frac / 0.05) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = tdm.lm_step(model, opt, tdm.sample_batch(ids, batch, seq, gen), amp=False, clip=1.0)
        step += 1
        if step % 50 == 0:
            print(f"  step {step}: loss {loss:.3f}", flush=True)
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--target-minutes", type=float, default=6.0)
    p.add_argument("--draft-minutes", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    files = collect_files(args.data, (".py",))
    train_texts = [f.text for f in files if not is_held_out(f.rel, 0.02)]
    tok = tdm.train_tokenizer(train_texts, VOCAB)
    ids = encode(tok, train_texts, tok.eos_token_id)
    print(f"{len(train_texts)} training files, {ids.numel():,} tokens")
    for name, arch, minutes, lr, seed in (("target", TARGET, args.target_minutes, 1e-3, 1),
                                          ("draft", DRAFT, args.draft_minutes, 2e-3, 2)):
        model = tdm.make_model(arch, seed, vocab_size=VOCAB, max_position_embeddings=512)
        steps = train(model, ids, minutes, lr, seed)
        model.eval()
        tdm.save_model(model, tok, args.out_dir / name)
        print(f"{name}: {tdm.n_params(model):,} parameters, {steps} steps in {minutes} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
