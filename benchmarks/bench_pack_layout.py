"""Padded against packed rows for forked beams, one target forward each: what a key read costs.

    python benchmarks/bench_pack_layout.py
    python benchmarks/bench_pack_layout.py --prompt-lengths 32,400 --beams 8
    python benchmarks/bench_pack_layout.py --prompt-lengths 400,800 --pool-blocks 64   # a pool the beams nearly fill

``--beams`` forks of one prompt of P tokens (the demo target, float32), each with 16 tokens of its
own, feed one token each (a plain beam-search step, depth 0). Padded (``build_kv_batch``): every row
reads its whole history, B × (P + 17) keys. Packed (``build_packed_kv_batch``): the shared prompt is
read once, P + B × 17 keys. The linear work is the same and the attention work about equal, so the
difference is the key reads; it is what ``specbeam_core.model.KEY_READ_PAIRS`` stands for. Median of
``--repeats`` forwards per layout (all of one layout, then the other). Prints a table and writes JSON
(``benchmarks/results/pack_layout/bench_pack_layout_pool400.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

import specbeam_hf
from specbeam_core import build_kv_batch, build_packed_kv_batch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf import describe, write_result  # noqa: E402

DEMO = Path(specbeam_hf.__file__).parent / "demo_models"
OWN_TOKENS = 16


def one_step(lm, cache, beams, packed: bool) -> float:
    """Seconds of one forward of one token per beam; the tokens are rolled back afterwards."""
    t0 = time.perf_counter()
    if packed:
        kv, rows = build_packed_kv_batch(cache, beams, [1] * len(beams), [1] * len(beams), cache.dtype)
        lm.forward(rows.tokens([[5]] * len(beams)), kv, len(beams))
    else:
        kv = build_kv_batch(cache, beams, [1] * len(beams), cache.dtype)
        lm.forward(torch.full((len(beams), 1), 5), kv, 1)
    seconds = time.perf_counter() - t0
    for b in beams:
        cache.rollback(b, 1)
    return seconds


def measure(lm, prompt_len: int, num_beams: int, repeats: int, pool_blocks: int) -> dict:
    gen = torch.Generator().manual_seed(prompt_len)
    cache = lm.make_cache(pool_blocks, 16)
    root = cache.new_sequence(end_aligned_at=prompt_len)
    lm.forward(torch.randint(5, 4000, (1, prompt_len), generator=gen), build_kv_batch(cache, [root], [prompt_len], cache.dtype), 1)
    beams = [cache.fork(root) for _ in range(num_beams)]
    cache.free(root)
    for b in beams:
        own = torch.randint(5, 4000, (1, OWN_TOKENS), generator=gen)  # [1, 16]
        lm.forward(own, build_kv_batch(cache, [b], [OWN_TOKENS], cache.dtype), 1)
    times = {"padded": [], "packed": []}
    for layout in times:
        for _ in range(repeats):
            times[layout].append(one_step(lm, cache, beams, layout == "packed"))
    history = prompt_len + OWN_TOKENS + 1
    return {
        "prompt_tokens": prompt_len, "beams": num_beams, "pool_blocks": pool_blocks,
        "keys_read": {"padded": num_beams * history, "packed": prompt_len + num_beams * (OWN_TOKENS + 1)},
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-lengths", default="32,200,400,800")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--pool-blocks", type=int, default=400, help="KV pool size in 16-token blocks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pack_layout")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target", dtype=torch.float32).eval()
    lm = specbeam_hf.HFCausalLM(target)
    rows = [measure(lm, int(n), args.beams, args.repeats, args.pool_blocks) for n in args.prompt_lengths.split(",") if n]
    table = Table(title=f"B = {args.beams} forked beams, one token each, demo target float32, {describe('cpu')}")
    for col in ("prompt tokens", "padded: keys read", "ms", "packed: keys read", "ms ", "saved ms per 1000 keys not read"):
        table.add_column(col, justify="right")
    for r in rows:
        k, ms = r["keys_read"], r["ms"]
        per_1000 = 1e3 * (ms["padded"] - ms["packed"]) / (k["padded"] - k["packed"])
        table.add_row(str(r["prompt_tokens"]), str(k["padded"]), f"{ms['padded']:.1f}", str(k["packed"]),
                      f"{ms['packed']:.1f}", f"{per_1000:.2f}")
    Console(width=160).print(table)
    path = args.out / f"bench_pack_layout_pool{args.pool_blocks}.json"
    write_result(path, "bench_pack_layout.py", argv, {"keys_per_token": lm.keys_per_token, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
