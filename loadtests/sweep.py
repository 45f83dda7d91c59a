"""Load sweep: spec-off vs vLLM ``draft_model`` vs specbeam, one server configuration at a time.

    python -m loadtests.sweep --quick --out runs/load-quick
    python -m loadtests.sweep --servers spec-off,specbeam --concurrency 1,2,4,8 --run-time 60 --out DIR
    python -m loadtests.sweep --request-rates 0.5,1,2 --max-users 16 --out DIR          # Poisson load
    python -m loadtests.sweep --num-replicas 2 --out DIR                                # 2 servers, 2 ports
    python -m loadtests.sweep --replicas 127.0.0.1:8001,127.0.0.1:8002 --out DIR        # running servers
    python -m loadtests.sweep --tensor-parallel-size 4 --server-args "--gpu-memory-utilization 0.8" ...

For every configuration (``servers.CONFIGS`` or ``--server NAME=COMMAND``) the sweep starts the
server(s) on free 127.0.0.1 ports, waits for ``/health``, and at each load level scrapes
``/metrics``, runs headless Locust (``locustfile.py``) and scrapes again. A server that fails to
start, or dies during a level, is recorded as a failure for the levels it misses; the sweep goes
on. Output in ``--out``: ``summary.json``, ``results.csv``, ``throughput.png``, ``latency.png``,
``summary.md`` (``report.render_table``), per-level Locust CSVs, samples and server logs.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from loadtests import plots, report
from loadtests.dataset import DEFAULT_DATASET
from loadtests.netguard import check_host, parse_replicas
from loadtests.promscrape import acceptance, scrape_many
from loadtests.servers import (
    CHAT_TEMPLATE,
    CONFIGS,
    DEMO_DRAFT,
    DEMO_TARGET,
    CommonFlags,
    Ctx,
    ServerProcess,
    ServerSpec,
    build_command,
    free_port,
    has_chat_template,
    parse_custom,
)
from loadtests.stats import read_samples, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
QUICK = {"concurrency": "1,4", "run_time": 20, "max_tokens_cap": 64, "startup_timeout": 240}


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtests.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--quick", action="store_true",
                    help=f"short sweep (< 10 min here): {QUICK}; explicit flags still win")
    ap.add_argument("--servers", default=",".join(CONFIGS),
                    help=f"comma-separated configuration names from {list(CONFIGS)} and --server")
    ap.add_argument("--server", action="append", default=[], metavar="NAME=COMMAND",
                    help="extra configuration: a command with {host} {port} {target} {draft} {k} {python}")
    ap.add_argument("--target", default=str(DEMO_TARGET))
    ap.add_argument("--draft", default=str(DEMO_DRAFT))
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    # load
    ap.add_argument("--concurrency", default=None, help="closed-loop user counts, e.g. 1,2,4,8")
    ap.add_argument("--request-rates", default=None, help="Poisson request rates (req/s), e.g. 0.5,1,2")
    ap.add_argument("--max-users", type=int, default=16, help="users for --request-rates levels")
    ap.add_argument("--run-time", type=int, default=None, help="seconds per load level (default 60)")
    ap.add_argument("--max-requests", type=int, default=2000, help="request bound per level")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--api", choices=["completions", "chat"], default="completions")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--dataset", default=str(DEFAULT_DATASET))
    ap.add_argument("--max-tokens-cap", type=int, default=None)
    ap.add_argument("--no-ignore-eos", action="store_true",
                    help="let requests stop at EOS (default: ignore_eos, so lengths follow the dataset)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--disconnect-fraction", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-replica-after", type=float, default=None, metavar="S",
                    help="fault injection: kill replica 0 S seconds into the first level of each configuration")
    ap.add_argument("--warmup-requests", type=int, default=2, help="short requests per server before measuring")
    # servers
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--allow-remote", action="store_true", help="allow non-loopback hosts/replicas")
    ap.add_argument("--replicas", default=None,
                    help="already-running servers host:port,...: load spread over them, nothing started")
    ap.add_argument("--num-replicas", type=int, default=1, help="servers started per configuration")
    ap.add_argument("--bind-replica-cpus", action="store_true",
                    help="CPU vLLM: pin replica i to core i (VLLM_CPU_OMP_THREADS_BIND)")
    ap.add_argument("--gpus-per-replica", type=int, default=0,
                    help="GPU node: replica i gets CUDA_VISIBLE_DEVICES i*N..i*N+N-1 (0: leave it alone)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-enforce-eager", action="store_true")
    ap.add_argument("--server-args", default="", help="more flags for every builtin vLLM server")
    ap.add_argument("--startup-timeout", type=float, default=None, help="seconds to wait for /health (300)")
    ap.add_argument("--pythonpath", default=None,
                    help="prepended to PYTHONPATH of started servers (e.g. a checkout holding specbeam_vllm)")
    ap.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE for started servers")
    return ap


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults (quick or full), check hosts and load levels."""
    defaults = QUICK if args.quick else {"concurrency": "1,2,4,8", "run_time": 60, "max_tokens_cap": None,
                                          "startup_timeout": 300}
    for key, val in defaults.items():
        if getattr(args, key, None) is None and not (key == "concurrency" and args.request_rates):
            setattr(args, key, val)
    check_host(args.host, args.allow_remote)
    if args.replicas:
        args.replica_urls = parse_replicas(args.replicas, args.allow_remote)
    if args.num_replicas < 1:
        raise ValueError("--num-replicas must be >= 1")
    if not 0.0 <= args.disconnect_fraction <= 1.0:
        raise ValueError("--disconnect-fraction must be in [0, 1]")
    if args.run_time <= 0 or args.max_requests <= 0:
        raise ValueError("--run-time and --max-requests must be > 0")
    levels = []
    if args.request_rates:
        levels += [{"mode": "rate", "rate": r, "users": args.max_users} for r in _floats(args.request_rates)]
    if args.concurrency:
        levels += [{"mode": "concurrency", "users": u, "rate": None} for u in _ints(args.concurrency)]
    if not levels or any(lv["users"] < 1 or (lv["rate"] is not None and lv["rate"] <= 0) for lv in levels):
        raise ValueError("need load levels with users >= 1 and rates > 0")
    args.levels = levels
    specs: dict[str, ServerSpec] = {n: ServerSpec(n, builtin=f) for n, f in CONFIGS.items()}
    for s in args.server:
        c = parse_custom(s)
        specs[c.name] = c
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    for s in args.server:  # a --server is run even when --servers does not name it
        if parse_custom(s).name not in names:
            names.append(parse_custom(s).name)
    if args.replicas:
        names = ["external"]
        specs["external"] = ServerSpec("external")
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown server configuration(s) {unknown}; known: {sorted(specs)}")
    args.specs = [specs[n] for n in names]
    return args


def level_label(level: dict) -> str:
    return f"{level['rate']:g} req/s" if level["mode"] == "rate" else f"{level['users']} users"


def run_locust(args, urls: list[str], level: dict, prefix: Path) -> tuple[int, str]:
    """Headless Locust for one level; returns (exit code, stderr tail). Bounded by a hard timeout."""
    samples = prefix.with_name(prefix.name + "_samples.jsonl")
    if samples.exists():
        samples.unlink()
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(level["users"]), "-r", str(level["users"]), "--run-time", f"{args.run_time}s",
           "--stop-timeout", "10", "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
           "--host", urls[0], "--replica-urls", ",".join(urls), "--samples-out", str(samples),
           "--api", args.api, "--dataset", str(args.dataset), "--temperature", str(args.temperature),
           "--disconnect-fraction", str(args.disconnect_fraction), "--max-requests", str(args.max_requests),
           "--request-timeout", str(args.request_timeout), "--seed", str(args.seed)]
    if args.max_tokens_cap:
        cmd += ["--max-tokens-cap", str(args.max_tokens_cap)]
    if not args.no_ignore_eos:
        cmd.append("--ignore-eos")
    if args.no_stream:
        cmd.append("--no-stream")
    if level["rate"] is not None:
        cmd += ["--request-rate", str(level["rate"])]
    if args.allow_remote:
        cmd.append("--allow-remote")
    hard = args.run_time + 10 + args.request_timeout + 30
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=hard, cwd=Path(__file__).parent.parent)
        return p.returncode, (p.stderr or "")[-800:]
    except subprocess.TimeoutExpired:
        return -9, f"locust killed after {hard:.0f} s"


def warmup(urls: list[str], n: int, timeout: float = 60.0) -> str:
    """``n`` short greedy completions per server before measuring (first-request costs); "" or an error."""
    for url in urls:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
                model = json.load(r)["data"][0]["id"]
            for _ in range(n):
                body = json.dumps({"model": model, "prompt": "def main(", "max_tokens": 8, "temperature": 0}).encode()
                req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    r.read()
        except (OSError, ValueError, KeyError, IndexError) as e:
            return f"warm-up against {url} failed: {type(e).__name__}: {e}"
    return ""


def replica_env(args, i: int) -> dict[str, str]:
    """Environment of started server ``i``: offline, no usage stats, its CPU core or GPUs, PYTHONPATH."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if args.bind_replica_cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % (os.cpu_count() or 1))
    if args.gpus_per_replica:
        n = args.gpus_per_replica
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * n, (i + 1) * n))
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath] + (
            [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return env


def _failed_row(server: str, replicas: int, level: dict, status: str, reason: str) -> dict:
    return {"server": server, "replicas": replicas, "level": level_label(level), "users": level["users"],
            "rate": level["rate"], "status": status, "reason": reason, **summarize([], 0.0),
            **acceptance(None, None)}


def sweep_config(args, spec: ServerSpec, out: Path, log=print) -> list[dict]:
    """All levels of one configuration; never raises for server trouble."""
    rows: list[dict] = []
    servers: list[ServerProcess] = []
    n_rep = len(args.replica_urls) if args.replicas else args.num_replicas
    try:
        if args.replicas:
            urls = list(args.replica_urls)
        else:
            ctx = Ctx(target=args.target, draft=args.draft, k=args.num_speculative_tokens)
            common = CommonFlags(max_model_len=args.max_model_len, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                 enforce_eager=not args.no_enforce_eager,
                                 tensor_parallel_size=args.tensor_parallel_size,
                                 chat_template=None if has_chat_template(args.target) else str(CHAT_TEMPLATE),
                                 extra=shlex.split(args.server_args))
            for i in range(args.num_replicas):
                port = free_port(args.host)
                argv = build_command(spec, ctx, args.host, port, common)
                env = replica_env(args, i)
                log(f"[{spec.name}] starting replica {i} on port {port}: {shlex.join(argv)}")
                try:
                    servers.append(ServerProcess(argv, args.host, port, out / "logs" / f"{spec.name}_{i}.log", env))
                except OSError as e:  # e.g. the executable does not exist
                    return [_failed_row(spec.name, n_rep, lv, "failed_to_start", f"{type(e).__name__}: {e}")
                            for lv in args.levels]
            t0 = time.monotonic()
            for s in servers:
                ok, why = s.wait_healthy(max(1.0, args.startup_timeout - (time.monotonic() - t0)))
                if not ok:
                    reason = f"replica on port {s.port} {why}: {s.log_tail()}"
                    log(f"[{spec.name}] FAILED to start: {reason}")
                    return [_failed_row(spec.name, n_rep, lv, "failed_to_start", reason) for lv in args.levels]
            log(f"[{spec.name}] healthy after {time.monotonic() - t0:.1f} s")
            urls = [s.url for s in servers]
        if args.warmup_requests:
            why = warmup(urls, args.warmup_requests)
            if why:
                log(f"[{spec.name}] {why} (measuring anyway)")
        for level in args.levels:
            dead = [s for s in servers if not s.alive()]
            if dead:
                reason = f"server on port {dead[0].port} {dead[0].exit_reason()} before this level"
                rows.append(_failed_row(spec.name, n_rep, level, "server_died", reason))
                continue
            tag = f"{spec.name}_{level['mode']}_{level['rate'] if level['rate'] else level['users']}"
            prefix = out / "locust" / tag
            prefix.parent.mkdir(parents=True, exist_ok=True)
            before = scrape_many(urls)
            killer = None
            if args.kill_replica_after is not None and servers and level is args.levels[0]:
                # fault injection: replica 0 is SIGKILLed (its whole process group) mid-level
                killer = threading.Timer(args.kill_replica_after, servers[0].kill)
                killer.start()
            t0 = time.monotonic()
            try:
                rc, err = run_locust(args, urls, level, prefix)
            finally:
                if killer is not None:
                    killer.cancel()
            wall = time.monotonic() - t0
            after = scrape_many(urls) if all(s.alive() for s in servers) else None
            samples = read_samples(prefix.with_name(prefix.name + "_samples.jsonl"))
            summ = summarize(samples)
            row = {"server": spec.name, "replicas": n_rep, "level": level_label(level), "users": level["users"],
                   "rate": level["rate"], "locust_rc": rc, "wall_s": wall, **summ, **acceptance(before, after)}
            died = [s for s in servers if not s.alive()]
            if died:
                row["status"] = "server_died"
                row["reason"] = f"server on port {died[0].port} {died[0].exit_reason()} during this level"
            elif summ["completed"] == 0:
                row["status"] = "failed"
                row["reason"] = f"no completed requests (locust rc {rc}): {'; '.join(summ['errors']) or err[-300:]}"
            else:
                row["status"] = "ok"
                row["reason"] = ""
            log(f"[{spec.name}] {level_label(level)}: {row['status']} completed={summ['completed']} "
                f"failed={summ['failed']} disconnected={summ['disconnected']} "
                f"tok/s={summ['output_tokens_per_s'] or 0:.1f} acc={row['acceptance_rate']}")
            rows.append(row)
        return rows
    finally:
        for s in servers:
            s.stop()


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("; ".join(v) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else v)
                        for k, v in r.items()})


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args = resolve(args)
    except ValueError as e:
        ap.error(str(e))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    for spec in args.specs:
        rows += sweep_config(args, spec, out)
    meta = {
        "command": "python -m loadtests.sweep " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - t_start, 1),
        # other jobs on a shared machine move the figures: 1-minute load average at start and end
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "servers": [s.name for s in args.specs],
        "levels": args.levels,
        "run_time_s": args.run_time,
        "api": args.api,
        "stream": not args.no_stream,
        "max_tokens_cap": args.max_tokens_cap,
        "ignore_eos": not args.no_ignore_eos,
        "temperature": args.temperature,
        "disconnect_fraction": args.disconnect_fraction,
        "num_speculative_tokens": args.num_speculative_tokens,
        "replicas": args.replicas or args.num_replicas,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    summary = {"meta": meta, "results": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_csv(rows, out / "results.csv")
    (out / "summary.md").write_text(report.render_table(summary) + "\n")
    try:
        plots.plot_all(summary, out)
    except ImportError as e:
        print(f"plots skipped: {e}", file=sys.stderr)
    print(report.render_table(summary))
    print(f"wrote {out / 'summary.json'} ({meta['duration_s']} s)")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
