"""Output tokens/s of vLLM servers at several concurrencies: spec-off, vLLM's draft_model and ngram
proposers, and specbeam, on the demo pair. Prints a table and writes JSON.

    python benchmarks/bench_vllm.py --concurrency 1,4,8,16 --requests-per-level 48 --min-waves 16 --rounds 3

The last column says, per level, whether specbeam's median is at least the best other median
(``win``), short of it by less than that level's round-to-round spread (``tie``), or short by more
(``loss``); and whether it is at least spec-off's. ``--target`` the draft itself gives a target as
cheap as its draft, where speculation cannot pay.

Each configuration gets its own server on 127.0.0.1 (started, warmed up, measured, stopped); every
request asks for ``--max-tokens`` tokens with ``ignore_eos`` so all configurations produce the
same number of tokens; greedy outputs are compared with spec-off's.

``--rounds R`` (R > 1) starts every configuration's server at once (an idle vLLM server takes no
CPU) and measures each level R times, the configurations taking turns in a rotating order, so a
slow spell of the host hits all of them alike. Each cell is then the median over rounds, and its
ratio to spec-off the median of the per-round ratios (with their range in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from specbeam_vllm.server import Server, post_json, spec_metrics, specbeam_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "specbeam_hf", "demo_models")
PROMPTS = [
    "The old man walked", "Once upon a time", "In the morning the", "She said that", "The history of the city",
    "def parse_args(argv):", "The river flows", "He opened the door and", "import numpy as np", "The results show that",
    "After the war the", "class Config:", "The first chapter", "It was late when", "The function returns", "We found that",
]


def configs(draft: str, gamma: int, specbeam_options: dict) -> dict[str, list[str]]:
    return {
        "spec-off": [],
        "vllm-draft_model": ["--speculative-config", json.dumps(
            {"method": "draft_model", "model": draft, "num_speculative_tokens": gamma})],
        "vllm-ngram": ["--speculative-config", json.dumps(
            {"method": "ngram", "num_speculative_tokens": gamma, "prompt_lookup_max": 4, "prompt_lookup_min": 2})],
        "specbeam": specbeam_flags(draft, gamma, **specbeam_options),
    }


def run_level(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int, temperature: float):
    def one(i: int):
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": temperature, "ignore_eos": True, "seed": i}
        res = post_json(url + "/v1/completions", body)
        return res["choices"][0]["text"], res["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(num_requests)))
    seconds = time.perf_counter() - started
    tokens = sum(n for _, n in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "texts": [t for t, _ in results]}


def level_requests(c: int, args) -> int:
    """Requests at concurrency ``c``: ``--requests-per-level``, and at least ``--min-waves`` waves of ``c``
    (requests of one length started together finish together: with only a few waves a level times
    their ramps up and down, not serving at ``c``)."""
    return max(c, args.requests_per_level, c * args.min_waves)


def measure(server: Server, c: int, args) -> dict:
    before = spec_metrics(server.url)
    level = run_level(server.url, server.model, c, level_requests(c, args), args.max_tokens, args.temperature)
    after = spec_metrics(server.url)
    level["delta"] = {k: after[k] - before[k] for k in after}
    return level


def acceptance(level: dict, delta: dict) -> dict:
    level["acceptance_rate"] = delta["accepted_tokens"] / delta["draft_tokens"] if delta["draft_tokens"] else None
    level["mean_acceptance_length"] = 1 + delta["accepted_tokens"] / delta["drafts"] if delta["drafts"] else None
    return level


def one_at_a_time(args, table: dict, common: list[str], levels: list[int], results: dict) -> None:
    """Each configuration's server started, warmed up, measured at every level and stopped in turn."""
    for name in args.configs.split(","):
        log = os.path.join(args.log_dir, f"bench-vllm-{name}.log")
        entry: dict = {"flags": table[name], "levels": {}}
        results["configs"][name] = entry
        try:
            with Server(os.path.abspath(args.target), table[name] + common, log_path=log) as server:
                run_level(server.url, server.model, 2, 4, 16, args.temperature)  # warm-up
                for c in levels:
                    level = measure(server, c, args)
                    entry["levels"][c] = acceptance(level, level.pop("delta"))
                    print(f"{name:18s} c={c:3d} {level['tokens_per_s']:8.1f} tok/s  acc={level['acceptance_rate']}", flush=True)
        except (RuntimeError, TimeoutError) as err:
            entry["error"] = str(err).splitlines()[0]
            print(f"{name:18s} failed: {entry['error']}", flush=True)


def interleaved(args, table: dict, common: list[str], levels: list[int], results: dict) -> None:
    """Every server up at once; each level measured ``args.rounds`` times, configurations in turns."""
    names = args.configs.split(",")
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in names:
            results["configs"][name] = {"flags": table[name], "levels": {}}
            log = os.path.join(args.log_dir, f"bench-vllm-{name}.log")
            try:
                servers[name] = stack.enter_context(Server(os.path.abspath(args.target), table[name] + common, log_path=log))
                run_level(servers[name].url, servers[name].model, 2, 4, 16, args.temperature)  # warm-up
            except (RuntimeError, TimeoutError) as err:
                results["configs"][name]["error"] = str(err).splitlines()[0]
                print(f"{name:18s} failed: {results['configs'][name]['error']}", flush=True)
        up = [n for n in names if n in servers]
        for c in levels:
            runs: dict[str, list[dict]] = {n: [] for n in up}
            for r in range(args.rounds):
                for name in up[r % len(up):] + up[: r % len(up)]:  # a rotating order
                    runs[name].append(measure(servers[name], c, args))
                    print(f"{name:18s} c={c:3d} round {r + 1}: {runs[name][-1]['tokens_per_s']:8.1f} tok/s", flush=True)
            for name in up:
                delta = {k: sum(run["delta"][k] for run in runs[name]) for k in runs[name][0]["delta"]}
                rounds = [run["tokens_per_s"] for run in runs[name]]
                level = {"rounds": rounds, "tokens_per_s": statistics.median(rounds), "texts": runs[name][0]["texts"],
                         "texts_same_every_round": all(run["texts"] == runs[name][0]["texts"] for run in runs[name])}
                results["configs"][name]["levels"][c] = acceptance(level, delta)
                print(f"{name:18s} c={c:3d} median {level['tokens_per_s']:8.1f} tok/s  acc={level['acceptance_rate']}", flush=True)


def verdict(configs: dict, c: int) -> str:
    """specbeam against the best other configuration at level ``c`` (see the module docstring)."""
    ours = configs["specbeam"]["levels"].get(c)
    others = {n: e["levels"][c] for n, e in configs.items() if n != "specbeam" and c in e.get("levels", {})}
    if ours is None or not others:
        return "n/a"
    best_name, best = max(others.items(), key=lambda kv: kv[1]["tokens_per_s"])
    rounds = [r for lv in (ours, best) for r in lv.get("rounds", [lv["tokens_per_s"]])]
    spread = (max(rounds) - min(rounds)) / 2
    gap = ours["tokens_per_s"] - best["tokens_per_s"]
    word = "win" if gap >= 0 else ("tie" if -gap <= spread else "loss")
    off = configs.get("spec-off", {}).get("levels", {}).get(c)
    vs_off = "" if off is None else f"; {ours['tokens_per_s'] / off['tokens_per_s']:.2f}x spec-off"
    return (f"{word} against {best_name} ({ours['tokens_per_s']:.1f} vs {best['tokens_per_s']:.1f} tok/s, "
            f"round spread ±{spread:.1f}{vs_off})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.path.join(DEMO, "target"))
    ap.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-level", type=int, default=16, help="at least the concurrency")
    ap.add_argument("--min-waves", type=int, default=1,
                    help="at least this many requests per concurrent slot (e.g. 16: 256 requests at c = 16)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--configs", default="spec-off,vllm-draft_model,vllm-ngram,specbeam")
    ap.add_argument("--specbeam-options", default="{}", help="JSON object of specbeam options for the specbeam server")
    ap.add_argument("--extra-flags", default="[]",
                    help='JSON list of more vLLM flags for every server, e.g. \'["--no-async-scheduling"]\'')
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                    help="--enforce-eager for every server (default: on without CUDA, off with it: CUDA graphs)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="> 1: all servers up at once, each level measured this many times in turns (see above)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vllm.json"))
    ap.add_argument("--log-dir", default="bench-vllm-logs", help="server logs (created if missing)")
    args = ap.parse_args(argv)
    os.makedirs(args.log_dir, exist_ok=True)
    if args.eager is None:
        import torch

        args.eager = not torch.cuda.is_available()
    levels = [int(c) for c in args.concurrency.split(",")]
    table = configs(os.path.abspath(args.draft), args.gamma, json.loads(args.specbeam_options))
    eager = ["--enforce-eager"] if args.eager else []  # the CPU has no CUDA graphs to capture
    common = ["--max-model-len", str(args.max_model_len), *eager, "--dtype", args.dtype, "--max-num-seqs",
              str(max(levels)), "--seed", "0", *json.loads(args.extra_flags)]
    results: dict = {"args": vars(args), "configs": {}}
    if args.rounds > 1:
        interleaved(args, table, common, levels, results)
    else:
        one_at_a_time(args, table, common, levels, results)
    base = results["configs"].get("spec-off", {}).get("levels", {})
    for entry in results["configs"].values():
        for c, level in entry["levels"].items():
            if c in base and "rounds" in level:
                ratios = [t / b for t, b in zip(level["rounds"], base[c]["rounds"])]
                level["speedup_vs_spec_off"] = statistics.median(ratios)
                level["speedup_range"] = [min(ratios), max(ratios)]
                if args.temperature == 0.0:
                    level["greedy_identical_to_spec_off"] = level["texts"] == base[c]["texts"]
            elif c in base:
                level["speedup_vs_spec_off"] = level["tokens_per_s"] / base[c]["tokens_per_s"]
                if args.temperature == 0.0:
                    level["greedy_identical_to_spec_off"] = level["texts"] == base[c]["texts"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print("\n| configuration | " + " | ".join(f"c={c} tok/s (× spec-off)" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name, entry in results["configs"].items():
        cells = []
        for c in levels:
            lv = entry["levels"].get(c)
            spread = "; {:.2f}–{:.2f}".format(*lv["speedup_range"]) if lv and "speedup_range" in lv else ""
            cells.append("failed" if lv is None else f"{lv['tokens_per_s']:.1f} ({lv.get('speedup_vs_spec_off', 1):.2f}×{spread})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "specbeam" in results["configs"]:
        print()
        for c in levels:
            print(f"c={c}: {verdict(results['configs'], c)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
