"""The specbeam proposer inside real vLLM servers: mean time per proposal (from the proposer's own
counters, ``stats_file``) and output tokens/s, for variants of the specbeam options side by side.

Every variant's server is up at once (an idle vLLM server takes no CPU) and the variants take turns
for ``--rounds`` rounds, so a slow spell of the host hits them alike. Prints a table and writes JSON.

    python benchmarks/bench_vllm_proposer.py --out benchmarks/results/vllm_proposer_dtype.json

The default variants compare the draft in float32 with the default (the target's dtype, bfloat16
here): a small draft runs about as fast in either alone, but inside the server the target's forward
evicts it from cache between proposals. A variant whose options are ``null`` is a spec-off server
(tokens/s only). Two keys of a variant's options are the benchmark's, not specbeam's:
``"server_flags"`` (a list of extra vLLM flags for that server) and ``"spec_off": true`` (no
speculative decoding, with those flags). E.g. at 16 concurrent requests:

    python benchmarks/bench_vllm_proposer.py --concurrency 16 --requests 96 \
        --variants '{"spec-off": null, "default": {}, "never drafts": {"full_draft_max_batch": 0, "no_draft_min_batch": 1}}' \
        --out benchmarks/results/vllm_proposer_c16.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile

from specbeam_vllm.proposer import PROPOSE_MS_BUCKETS
from specbeam_vllm.server import Server, specbeam_flags

from bench_vllm import DEMO, run_level

DEFAULT_VARIANTS = {"float32 draft": {"dtype": "float32"}, "default (target's dtype)": {}}


def slowest(before: dict, after: dict) -> tuple[str | None, list[int] | None]:
    """The slowest proposal between two stats snapshots as its histogram bucket (e.g. "8–16 ms"), and
    the stretch's histogram (``PROPOSE_MS_BUCKETS``); ``(None, None)`` without proposals or histogram."""
    if "propose_ms_histogram" not in after:
        return None, None
    hist = [a - b for a, b in zip(after["propose_ms_histogram"],
                                  before.get("propose_ms_histogram", [0] * len(after["propose_ms_histogram"])))]
    top = max((i for i, n in enumerate(hist) if n), default=None)
    if top is None:
        return None, hist
    bounds = (0,) + PROPOSE_MS_BUCKETS
    label = f"{bounds[top]}–{bounds[top + 1]} ms" if top < len(PROPOSE_MS_BUCKETS) else f"≥ {bounds[top]} ms"
    return label, hist


def read_stats(path: str | None) -> dict:
    """The proposer's counters (zeros for a spec-off server)."""
    if path is None:
        return {"proposals": 0, "propose_seconds": 0.0}
    with open(path) as fh:
        return json.load(fh)


def ms_text(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.2f}"


COMMON_FLAGS = ["--max-model-len", "512", "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "16",
                "--seed", "0"]


def add_arguments(ap: argparse.ArgumentParser, variants: dict, concurrency: int, requests: int, rounds: int,
                  out: str) -> None:
    """The options every side-by-side variant benchmark takes (defaults per script)."""
    ap.add_argument("--target", default=os.path.join(DEMO, "target"))
    ap.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    ap.add_argument("--variants", default=json.dumps(variants), help="JSON: name -> specbeam options")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=concurrency)
    ap.add_argument("--requests", type=int, default=requests, help="per variant and round")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--temperature", type=float, default=0.0, help="of every request (0: greedy; seeded per request)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", out))


def start_servers(stack: contextlib.ExitStack, tmp: str, args, variants: dict, stats: bool = True,
                  env=lambda i, name: {}) -> tuple[dict, dict]:
    """Every variant's server, started and warmed up (``null`` options: spec-off; ``"spec_off"`` and
    ``"server_flags"`` are the benchmark's keys): name -> Server, and name -> stats file or None."""
    servers, stats_files = {}, {}
    for i, (name, options) in enumerate(variants.items()):
        options = {"spec_off": True} if options is None else dict(options)
        extra = list(options.pop("server_flags", []))
        spec_off = options.pop("spec_off", False)
        stats_files[name] = None if spec_off or not stats else os.path.join(tmp, f"stats{i}.json")
        if stats_files[name]:
            options["stats_file"] = stats_files[name]
        flags = extra if spec_off else extra + specbeam_flags(os.path.abspath(args.draft), args.gamma, **options)
        servers[name] = stack.enter_context(Server(os.path.abspath(args.target), flags + COMMON_FLAGS,
                                                   log_path=os.path.join(tmp, f"server{i}.log"), env=env(i, name)))
        run_level(servers[name].url, servers[name].model, 1, 2, 16, 0.0)  # warm-up
    return servers, stats_files


def rotation(names: list[str], rounds: int):
    """(round, name) in turns, the order rotating each round so a slow spell hits every variant."""
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            yield r, name


def measured_rounds(servers: dict, names: list[str], args, read):
    """Each turn of :func:`rotation`: ``(round, name, before, level, after)``, ``read(name)`` taken
    before and after the round's ``--requests`` 64-token requests (at ``--temperature``) at ``--concurrency``."""
    for r, name in rotation(names, args.rounds):
        before = read(name)
        level = run_level(servers[name].url, servers[name].model, args.concurrency, args.requests, 64,
                          args.temperature)
        yield r, name, before, level, read(name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, DEFAULT_VARIANTS, concurrency=1, requests=24, rounds=3, out="vllm_proposer_dtype.json")
    args = ap.parse_args(argv)
    variants = json.loads(args.variants)
    names = list(variants)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers, stats = start_servers(stack, tmp, args, variants)
        for r, name, before, level, after in measured_rounds(servers, names, args, lambda n: read_stats(stats[n])):
            proposals = after["proposals"] - before["proposals"]
            ms = 1000 * (after["propose_seconds"] - before["propose_seconds"]) / proposals if proposals else None
            spread = slowest(before, after)
            looked = after.get("lookup_tokens", 0) - before.get("lookup_tokens", 0)
            lookup_acceptance = (after["lookup_accepted"] - before["lookup_accepted"]) / looked if looked else None
            runs[name].append({"tokens_per_s": level["tokens_per_s"], "propose_ms": ms, "proposals": proposals,
                               "propose_ms_histogram": spread[1], "slowest_proposal_ms": spread[0],
                               "lookup_tokens": looked, "lookup_acceptance": lookup_acceptance})
            lookup = f", lookup {looked} tokens, {lookup_acceptance:.0%} accepted" if looked else ""
            print(f"{name:28s} round {r + 1}: {level['tokens_per_s']:7.1f} tok/s, {ms_text(ms)} ms per proposal, "
                  f"slowest {spread[0] or '–'}{lookup}", flush=True)
    print(f"\nconcurrency {args.concurrency}, γ = {args.gamma}, medians over {args.rounds} rounds\n")
    print("| variant | ms per proposal | tokens/s | × first variant, per round |\n|---|---|---|---|")
    summary = {}
    for name in names:
        timed = [r["propose_ms"] for r in runs[name] if r["propose_ms"] is not None]
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs[name], runs[names[0]])]
        summary[name] = {"options": variants[name], "runs": runs[name], "ratio_to_first": ratios,
                         "propose_ms": statistics.median(timed) if timed else None,
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[name])}
        print(f"| {name} | {ms_text(summary[name]['propose_ms'])} | {summary[name]['tokens_per_s']:.1f} | "
              + " / ".join(f"{x:.2f}" for x in ratios) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "variants": summary}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
