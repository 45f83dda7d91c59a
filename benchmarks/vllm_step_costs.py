"""Where an engine step's time goes: a spec-off vLLM server against a specbeam server held at draft
length 0, both under the same load. Prints a table (ms per engine step) and writes JSON.

    python benchmarks/vllm_step_costs.py --requests 128 --rounds 1 --repeats 3
    python benchmarks/vllm_step_costs.py --target specbeam_hf/demo_models/draft --rounds 2 --repeats 3

At draft length 0 specbeam decodes plainly. Whatever its steps cost over spec-off's is the price of
serving with a speculative config while speculation is off: vLLM's own speculative path (its
scheduler, sampler and messages) and specbeam's (its draft-length hooks, the record of what the
draft skipped). Throughput alone cannot show a difference of a few percent on a noisy machine; the
timers here can.

The specbeam server is held at length 0 by a plugin of the ``specbeam_draft_length`` hook that
answers 0, found through the ``specbeam`` entry-point group like any plugin. Both servers run
``vllm_step_probe.py`` as their ``sitecustomize``: wall-clock timers around the engine core's step,
the scheduler's two calls, the worker's ``execute_model`` and ``sample_tokens`` (and parts of them).
The servers start together and take turns, one level of load each per round; the timers count from
the end of the warm-up. The pair starts afresh ``--repeats`` times: how fast one server runs the same
forward moves by several percent from one start-up to the next, so one start-up says little. Python's garbage collections are timed too, by process.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import psutil

from specbeam_vllm.server import Server, specbeam_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_vllm import DEMO, run_level  # noqa: E402

ZERO_PLUGIN = '''from specbeam_core.hookspecs import hookimpl


@hookimpl
def specbeam_draft_length(requests, default):
    return 0  # plain decoding at every step
'''

# (row of the table, timer); "rest" is computed
ROWS = [
    ("engine step", "engine_core.step"),
    ("scheduler: schedule", "scheduler.schedule"),
    ("scheduler: schedule, specbeam's draft-length choice", "specbeam._choose_draft_length"),
    ("scheduler: update_from_output", "scheduler.update_from_output"),
    ("scheduler: update_from_output, specbeam's step record", "specbeam._record"),
    ("worker: execute_model", "runner.execute_model"),
    ("worker: execute_model, target forward", "runner._model_forward"),
    ("worker: execute_model, LM head", "lm_head.forward"),
    ("worker: execute_model, prepare inputs", "runner._prepare_inputs"),
    ("worker: sample_tokens", "runner.sample_tokens"),
    ("worker: sample_tokens, sampling", "runner._sample"),
    ("worker: sample_tokens, bookkeeping", "runner._bookkeeping_sync"),
    ("worker: sample_tokens, specbeam's record of skipped draft tokens", "specbeam_lag.record"),
    ("rest: messages between processes, the engine's loop", "rest"),
    ("Python garbage collection, all processes (some inside the rows above)", "gc"),
]


def write_helpers(root: str) -> tuple[str, str]:
    """The probe folder (``sitecustomize``) and the length-0 plugin folder (a module and its entry point)."""
    probe, plugin = os.path.join(root, "probe"), os.path.join(root, "length_zero")
    os.makedirs(probe)
    shutil.copy(os.path.join(HERE, "vllm_step_probe.py"), os.path.join(probe, "sitecustomize.py"))
    info = os.path.join(plugin, "specbeam_length_zero-0.dist-info")
    os.makedirs(info)
    with open(os.path.join(plugin, "specbeam_length_zero.py"), "w") as fh:
        fh.write(ZERO_PLUGIN)
    with open(os.path.join(info, "METADATA"), "w") as fh:
        fh.write("Metadata-Version: 2.1\nName: specbeam-length-zero\nVersion: 0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as fh:
        fh.write("[specbeam]\nlength_zero = specbeam_length_zero\n")
    return probe, plugin


def signal_all(server: Server, signum: int) -> dict[int, str]:
    """Send ``signum`` to every process of the server; their names by pid."""
    root = psutil.Process(server.process.pid)
    names = {}
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            names[proc.pid] = "api_server" if proc.pid == root.pid else proc.name()
            proc.send_signal(signum)
    return names


def collect(server: Server, out_dir: str) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Every timer of the server's processes, summed and by process: ask each to write its totals, then read them."""
    names = signal_all(server, signal.SIGUSR1)
    time.sleep(2.0)
    totals: dict[str, list[float]] = {}
    by_process: dict[str, dict[str, list[float]]] = {}
    for path in glob.glob(os.path.join(out_dir, "probe-*.json")):
        pid = int(os.path.basename(path)[len("probe-"):-len(".json")])
        with open(path) as fh:
            timers = json.load(fh)
        name = names.get(pid, "process")
        by_process[name if name not in by_process else f"{name} {pid}"] = timers  # several workers: one entry each
        for timer, (calls, seconds) in timers.items():
            entry = totals.setdefault(timer, [0, 0.0])
            entry[0] += calls
            entry[1] += seconds
    return totals, by_process


def per_step(totals: dict[str, list[float]]) -> dict[str, float]:
    """Milliseconds per engine step of each timer, and the rest of the step (messages, the engine's loop)."""
    steps = totals.get("engine_core.step", [0, 0.0])[0]
    if not steps:
        return {}
    ms = {name: 1000.0 * seconds / steps for name, (_, seconds) in totals.items()}
    ms["rest"] = ms["engine_core.step"] - sum(ms.get(k, 0.0) for k in (
        "scheduler.schedule", "scheduler.update_from_output", "runner.execute_model", "runner.sample_tokens"))
    ms["steps"] = steps
    return ms


def measure_pair(args, configs: dict, root: str, repeat: int) -> dict:
    """One fresh pair of servers: warm up, clear the timers, run the rounds, read the timers."""
    common = ["--max-model-len", "512", "--enforce-eager", "--dtype", args.dtype, "--max-num-seqs",
              str(args.concurrency), "--seed", "0"]
    path = os.environ.get("PYTHONPATH", "")
    out: dict = {"configs": {}}
    with contextlib.ExitStack() as stack:
        servers, dirs = {}, {}
        for name, (flags, paths) in configs.items():
            dirs[name] = os.path.join(root, f"timers-{repeat}-{len(dirs)}")
            os.makedirs(dirs[name])
            env = {"PYTHONPATH": os.pathsep.join(paths + ([path] if path else [])), "STEP_PROBE_DIR": dirs[name]}
            servers[name] = stack.enter_context(Server(os.path.abspath(args.target), flags + common, env=env))
            run_level(servers[name].url, servers[name].model, 2, 4, 16, 0.0)  # warm-up
        time.sleep(1.0)
        for name in servers:
            signal_all(servers[name], signal.SIGUSR2)  # the timers count from here
        time.sleep(1.0)
        names = list(configs)
        rates: dict[str, list[float]] = {n: [] for n in names}
        texts: dict[str, list[str]] = {}
        for r in range(args.rounds):
            for name in names[r % 2:] + names[: r % 2]:
                level = run_level(servers[name].url, servers[name].model, args.concurrency, args.requests,
                                  args.max_tokens, 0.0)
                rates[name].append(level["tokens_per_s"])
                texts.setdefault(name, level["texts"])
                print(f"start-up {repeat + 1}, {name:22s} round {r + 1}: {level['tokens_per_s']:8.1f} tok/s", flush=True)
        for name in names:
            totals, by_process = collect(servers[name], dirs[name])
            out["configs"][name] = {"tokens_per_s": rates[name], "totals": totals, "by_process": by_process,
                                    "ms_per_step": per_step(totals)}
        out["greedy_identical"] = texts[names[0]] == texts[names[1]]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=os.path.join(DEMO, "target"))
    ap.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="requests per round and server")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="turns of each server per start-up")
    ap.add_argument("--repeats", type=int, default=1, help="fresh start-ups of the pair of servers")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vllm_step_costs.json"))
    args = ap.parse_args(argv)

    root = tempfile.mkdtemp(prefix="specbeam-step-costs-")
    probe, plugin = write_helpers(root)
    configs = {"spec-off": ([], [probe]),
               "specbeam at length 0": (specbeam_flags(os.path.abspath(args.draft), args.gamma), [probe, plugin])}
    try:
        repeats = [measure_pair(args, configs, root, i) for i in range(args.repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    off_name, zero_name = configs

    def cells(key: str) -> tuple[list[float], list[float], list[float]]:
        offs = [r["configs"][off_name]["ms_per_step"].get(key) for r in repeats]
        zeros = [r["configs"][zero_name]["ms_per_step"].get(key) for r in repeats]
        diffs = [(b or 0.0) - (a or 0.0) for a, b in zip(offs, zeros)]
        return [a for a in offs if a is not None], [b for b in zeros if b is not None], diffs

    def fmt(values: list[float], signed: bool = False) -> str:
        if not values:
            return "–"
        text = f"{statistics.median(values):+.3f}" if signed else f"{statistics.median(values):.3f}"
        if len(values) > 1:
            text += f" ({min(values):+.3f} to {max(values):+.3f})" if signed else f" ({min(values):.3f}–{max(values):.3f})"
        return text

    summary = {}
    print(f"\nms per engine step at c = {args.concurrency}: median over {args.repeats} start-up(s) (range)\n")
    print("| part of the step | spec-off | specbeam at length 0 | difference |")
    print("|---|---|---|---|")
    for label, key in ROWS:
        offs, zeros, diffs = cells(key)
        if not offs and not zeros:
            continue
        summary[key] = {"spec_off": offs, "length_0": zeros, "difference": diffs}
        print(f"| {label} | {fmt(offs)} | {fmt(zeros)} | {fmt(diffs, signed=True)} |")
    step_ratios = [r["configs"][zero_name]["ms_per_step"]["engine_core.step"]
                   / r["configs"][off_name]["ms_per_step"]["engine_core.step"] for r in repeats]
    rate_ratios = [statistics.median(z / o for z, o in zip(r["configs"][zero_name]["tokens_per_s"],
                                                           r["configs"][off_name]["tokens_per_s"])) for r in repeats]
    identical = all(r["greedy_identical"] for r in repeats)
    print(f"\nengine step, specbeam at length 0 over spec-off, by start-up: {', '.join(f'{x:.3f}×' for x in step_ratios)}; "
          f"tokens/s ratio: {', '.join(f'{x:.3f}' for x in rate_ratios)}; greedy outputs identical: {identical}")
    results = {"args": vars(args), "repeats": repeats, "summary": summary, "step_ratios": step_ratios,
               "tokens_per_s_ratios": rate_ratios, "greedy_identical": identical}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
