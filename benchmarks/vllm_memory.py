"""Host memory of a vLLM server after start-up: spec-off, vLLM's draft_model (with its default greedy
draft sampling and with ``draft_sample_method: probabilistic``, the path specbeam runs on) and specbeam.

    python benchmarks/vllm_memory.py --max-num-seqs 256 --max-model-len 4096 --repeats 2

Each server starts alone, waits for ``/health``, answers one request, and then the resident memory
(RSS) of every process in its group (API server, engine core, workers) is summed. specbeam's draft
runs on vLLM's draft-model path, with its KV blocks inside vLLM's profiled KV budget
(``VLLM_CPU_KVCACHE_SPACE`` on the CPU, the same for every server), so it should hold no more than
spec-off plus the draft's weights. Prints a table and writes JSON.

On Linux the RSS of each process is also split by mapping, from ``/proc/PID/smaps``: the C heap,
other anonymous memory, shared-library code, and other files; a second table gives each server's
split minus spec-off's, for the worker and the engine core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import psutil

from specbeam_vllm.server import Server, draft_model_flags, post_json, specbeam_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "specbeam_hf", "demo_models")


def rss_by_mapping(pid: int) -> dict[str, int]:
    """RSS (bytes) of one process by kind of mapping, read from ``/proc/PID/smaps`` (empty where there is none)."""
    kinds = {"heap": 0, "anonymous": 0, "libraries": 0, "other files": 0}
    kind = "anonymous"
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                fields = line.split()
                if fields and fields[0] == "Rss:":
                    kinds[kind] += int(fields[1]) * 1024
                elif len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header
                    path = fields[5] if len(fields) > 5 else ""
                    kind = ("heap" if path == "[heap]" else "anonymous" if not path or path.startswith("[")
                            else "libraries" if ".so" in path else "other files")
    except OSError:
        return {}
    return kinds


def group_rss(pid: int) -> dict[str, int]:
    """RSS (bytes) of a process and each of its descendants, by process name (API server, engine core, worker)."""
    root = psutil.Process(pid)
    out: dict[str, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = "api_server" if proc.pid == pid else proc.name()
            out[name] = out.get(name, 0) + proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def weights_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def print_mapping_split(configs: dict) -> None:
    """Each server's RSS by kind of mapping minus spec-off's (medians over start-ups): kept in its entry under
    ``mapping_over_spec_off_bytes`` and printed as a table (MiB)."""
    def median_split(entry, proc):
        starts = [m.get(proc, {}) for m in entry.get("mappings", [])]
        kinds = sorted({k for split in starts for k in split})
        return {k: statistics.median(split.get(k, 0) for split in starts) for k in kinds}

    off = configs["spec-off"]
    if not any(off.get("mappings", [{}])[0].values()):
        return  # no /proc/PID/smaps here
    print("\n| server | process | heap | anonymous | libraries | other files |\n|---|---|---|---|---|---|")
    for name, entry in configs.items():
        if name == "spec-off":
            continue
        for proc in ("VLLM::Worker", "VLLM::EngineCore"):
            split, base = median_split(entry, proc), median_split(off, proc)
            entry.setdefault("mapping_over_spec_off_bytes", {})[proc] = {k: split[k] - base.get(k, 0) for k in split}
            cells = " | ".join(f"{(split.get(k, 0) - base.get(k, 0)) / 2**20:+.1f}"
                               for k in ("heap", "anonymous", "libraries", "other files"))
            print(f"| {name} | {proc} | {cells} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.path.join(DEMO, "target"))
    ap.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--settle-s", type=float, default=5.0, help="wait after the request before reading RSS")
    ap.add_argument("--repeats", type=int, default=1, help="start-ups of each server (configurations in turns)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vllm_memory.json"))
    ap.add_argument("--log-dir", default="bench-vllm-logs")
    args = ap.parse_args(argv)
    os.makedirs(args.log_dir, exist_ok=True)
    draft = os.path.abspath(args.draft)
    common = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--enforce-eager",
              "--dtype", "bfloat16", "--seed", "0"]
    configs = {"spec-off": [], "vllm-draft_model": draft_model_flags(draft, 4),
               "vllm-draft_model-probabilistic": draft_model_flags(draft, 4, draft_sample_method="probabilistic"),
               "specbeam": specbeam_flags(draft, 4)}
    results = {"args": vars(args), "draft_weights_bytes": weights_bytes(draft),
               "configs": {name: {"starts": []} for name in configs}}
    for _ in range(args.repeats):
        for name, flags in configs.items():
            # the demo models handle 1024 positions; a longer --max-model-len only sizes vLLM's tables
            with Server(os.path.abspath(args.target), flags + common, env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
                        log_path=os.path.join(args.log_dir, f"memory-{name}.log")) as server:
                post_json(server.url + "/v1/completions", {"model": server.model, "prompt": "def fibonacci(n):",
                                                           "max_tokens": 16, "temperature": 0.0})
                time.sleep(args.settle_s)
                rss = group_rss(server.process.pid)
                mappings = {proc.name(): rss_by_mapping(proc.pid)
                            for proc in psutil.Process(server.process.pid).children(recursive=True)
                            if proc.name() in ("VLLM::Worker", "VLLM::EngineCore")}
            results["configs"][name]["starts"].append(rss)
            results["configs"][name].setdefault("mappings", []).append(mappings)
            parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(rss.items()))
            print(f"{name:32s} RSS {sum(rss.values()) / 2**20:9.1f} MiB ({parts})", flush=True)
    for entry in results["configs"].values():
        entry["rss_bytes"] = statistics.median(sum(start.values()) for start in entry["starts"])
    off = results["configs"]["spec-off"]["rss_bytes"]
    print("\n| server | RSS after start-up (MiB), median | minus spec-off (MiB) | starts (MiB) |\n|---|---|---|---|")
    for name, entry in results["configs"].items():
        entry["over_spec_off_bytes"] = entry["rss_bytes"] - off
        starts = ", ".join(f"{sum(s.values()) / 2**20:.1f}" for s in entry["starts"])
        print(f"| {name} | {entry['rss_bytes'] / 2**20:.1f} | {entry['over_spec_off_bytes'] / 2**20:+.1f} | {starts} |")
    print(f"draft weights: {results['draft_weights_bytes'] / 2**20:.1f} MiB")
    print_mapping_split(results["configs"])
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
