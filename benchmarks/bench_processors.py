"""Greedy decoding with HF logits processors that the core does not model (repetition penalty,
no-repeat n-grams): HF ``generate`` against specbeam, which applies the processors position by
position. Batches 1 and 8 of the code prompts, EOS off (``min_new_tokens``, itself a processor); specbeam at a
fixed γ, with a confidence threshold (a row's draft stops after a token the draft is unsure of), and
with ``adaptive_draft`` (the length 0..γ measured cheapest; each assistant is reused across the
warm-up and the rounds, so this is its steady state after exploring); in each of ``--repeats`` rounds every method
takes its turn on the batch, and a method's time is its fastest round.

    python benchmarks/bench_processors.py --repeats 3

    python benchmarks/bench_processors.py --random-vocab 128000 --batches 16 --max-new-tokens 24 \\
        --settings repetition_penalty --repeats 2 --name bench_processors_vocab128k

Prints a table and writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_hf import PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"
RESULTS = Path(__file__).parent / "results"
SETTINGS = {"repetition_penalty": dict(repetition_penalty=1.2),
            "no_repeat_ngram": dict(no_repeat_ngram_size=3),
            "both": dict(repetition_penalty=1.2, no_repeat_ngram_size=3)}


def random_pair(vocab: int):
    """A 2-layer, 64-wide random Llama with a ``vocab``-token vocabulary (where a processor call on a
    row of scores costs the most) and, as its draft, a copy with noise added; left-padded random prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, pad_token_id=0)
    target = LlamaForCausalLM(config).eval()
    draft = LlamaForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(0.01 * torch.randn_like(param))

    def encode(batch):
        ids = torch.randint(3, vocab, (batch, 12), generator=torch.Generator().manual_seed(0))  # [batch, 12]
        mask = torch.ones_like(ids)
        ids[::2, :3], mask[::2, :3] = 0, 0  # every other row left-padded by 3
        return dict(input_ids=ids, attention_mask=mask), 0

    return target, draft, encode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--confidence", type=float, default=0.5, help="confidence_threshold of the second specbeam row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help="which of: " + ", ".join(SETTINGS))
    p.add_argument("--random-vocab", type=int, default=0,
                   help="instead of the demo pair, a random 2-layer Llama with this vocabulary and a noisy copy as its draft")
    p.add_argument("--name", default="bench_processors", help="JSON file name under --out")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.random_vocab:
        target, draft, encode = random_pair(args.random_vocab)
    else:
        tok = AutoTokenizer.from_pretrained(DEMO / "target", padding_side="left")
        target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft", dtype=torch.float32).eval()

        def encode(batch):
            return dict(tok((PROMPTS * batch)[:batch], return_tensors="pt", padding=True)), tok.pad_token_id
    settings = {name: SETTINGS[name] for name in args.settings.split(",")}
    rows = []
    print("| batch | processors | method | HF tokens/s | tokens/s | speed-up | acceptance | tokens per step | same as HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        enc, pad_id = encode(batch)
        for name, extra in settings.items():
            kwargs = dict(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
                          pad_token_id=pad_id, **extra)
            assistants = {f"specbeam γ={args.gamma}": specbeam_hf.SpecBeam(draft, num_draft_tokens=args.gamma),
                          f"specbeam γ={args.gamma}, confidence {args.confidence}": specbeam_hf.SpecBeam(
                              draft, num_draft_tokens=args.gamma, confidence_threshold=args.confidence),
                          f"specbeam γ=0..{args.gamma} adaptive": specbeam_hf.SpecBeam(
                              draft, num_draft_tokens=args.gamma, adaptive_draft=True)}
            runs = {"hf": lambda: target.generate(**kwargs)}
            for method, assistant in assistants.items():
                runs[method] = lambda a=assistant: target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=a)
            outputs = {m: run() for m, run in runs.items()}  # warm-up, and the outputs compared
            best = {m: float("inf") for m in runs}
            for _ in range(args.repeats):
                for method, run in runs.items():
                    start = time.perf_counter()
                    run()
                    best[method] = min(best[method], time.perf_counter() - start)
            tokens = batch * args.max_new_tokens
            for method, assistant in assistants.items():
                stats = assistant.last_stats.summary()
                rows.append(dict(batch=batch, setting=name, method=method, hf_tokens_per_s=tokens / best["hf"],
                                 tokens_per_s=tokens / best[method], speed_up=best["hf"] / best[method],
                                 acceptance_rate=stats["acceptance_rate"], tokens_per_step=stats["mean_accepted_length"],
                                 same_as_hf=bool(torch.equal(outputs["hf"], outputs[method]))))
                r = rows[-1]
                print(f"| {batch} | {name} | {method} | {r['hf_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
                      f"{r['speed_up']:.2f}× | {r['acceptance_rate']:.2f} | {r['tokens_per_step']:.2f} | "
                      f"{'yes' if r['same_as_hf'] else 'no'} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=f"random llama, vocab {args.random_vocab}" if args.random_vocab else "demo pair", max_new_tokens=args.max_new_tokens, gamma=args.gamma, confidence=args.confidence, repeats=args.repeats, threads=args.threads,
                torch=torch.__version__, dtype="float32")
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
