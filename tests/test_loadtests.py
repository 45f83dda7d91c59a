"""Load-test tooling (issue #5) without a real vLLM server.

Pure parts (percentiles, summaries, Prometheus parsing, acceptance, loopback guard, Poisson pacing,
the markdown table) are checked directly; the Locust client runs headless against the stdlib fake
server in ``fake_openai_server.py`` (started on 127.0.0.1 in this process, so its counters can be
read), and the sweep runs against fake-server commands that start, fail to start, or die mid-run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sstats

from loadtests import netguard, pacing, promscrape, report, stats
from loadtests.dataset import DEFAULT_DATASET, load_dataset

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
FAKE = Path(__file__).with_name("fake_openai_server.py")

HAS_LOCUST = importlib.util.find_spec("locust") is not None
if not HAS_LOCUST and os.environ.get("CI"):
    raise RuntimeError("locust is not installed; CI installs it through the test extra")
needs_locust = pytest.mark.skipif(not HAS_LOCUST, reason="locust not installed (pip install -e '.[loadtest]')")


# ---------------------------------------------------------------- percentiles and summaries


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def _sample(start, e2e, n, ttft=0.1, ok=True, disconnected=False, itl=None, error=None):
    return {"start": start, "end": start + e2e, "ok": ok, "disconnected": disconnected, "error": error,
            "ttft": ttft, "e2e": e2e, "output_tokens": n, "itl": itl or [],
            "tpot": (e2e - ttft) / (n - 1) if ok and n > 1 and ttft is not None else None}


def test_summarize_counts_throughput_and_excludes_disconnects():
    samples = [
        _sample(0.0, 1.0, 11, itl=[0.09] * 10),
        _sample(0.5, 1.5, 21, itl=[0.07] * 20),
        _sample(1.0, 0.2, 3, disconnected=True),  # partial output: not throughput
        _sample(1.0, 0.1, 0, ok=False, ttft=None, error="HTTP 500: boom"),
    ]
    s = stats.summarize(samples)
    assert (s["requests"], s["completed"], s["failed"], s["disconnected"]) == (4, 2, 1, 1)
    assert s["window_s"] == pytest.approx(2.0)  # 0.0 .. 2.0
    assert s["output_tokens"] == 32
    assert s["output_tokens_per_s"] == pytest.approx(16.0)
    assert s["ttft_p50_ms"] == pytest.approx(100.0)
    assert s["tpot_p50_ms"] == pytest.approx(((0.09 + 0.07) / 2) * 1000)
    assert s["itl_p99_ms"] == pytest.approx(90.0)
    assert s["errors"] == ["HTTP 500: boom"]
    empty = stats.summarize([])
    assert empty["completed"] == 0 and empty["output_tokens_per_s"] is None and empty["ttft_p50_ms"] is None


def test_read_samples_skips_truncated_lines(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(_sample(0, 1, 2)) + "\n" + '{"start": 1, "en')
    assert len(stats.read_samples(p)) == 1
    assert stats.read_samples(tmp_path / "missing.jsonl") == []


# ---------------------------------------------------------------- Prometheus and acceptance

VLLM_METRICS = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="/m/target"} 13.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="/m/target"} 7.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="/m/target"} 1.7954486345476818e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="/m/target"} 52.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="/m/target"} 28.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="/m/target"} 18.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="/m {odd} \\"name\\""} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="0"} 7.0
vllm:generation_tokens_total{engine="0",model_name="/m/target"} 32.0
vllm:num_requests_running{engine="0"} NaN
process_cpu_seconds_total 12.5 1795448634000
"""


def test_parse_prometheus_sums_label_sets():
    m = promscrape.parse_prometheus(VLLM_METRICS)
    assert m[promscrape.DRAFTS] == 20.0
    assert m[promscrape.DRAFT_TOKENS] == 80.0
    assert m[promscrape.ACCEPTED] == 20.0  # a label value with braces, spaces and quotes
    assert m["vllm:spec_decode_num_drafts_created"] > 1e9  # not mixed into the _total counter
    assert m["process_cpu_seconds_total"] == 12.5  # timestamp ignored
    assert "vllm:num_requests_running" not in m  # NaN dropped


def test_acceptance_from_deltas():
    before = {promscrape.DRAFTS: 10.0, promscrape.DRAFT_TOKENS: 40.0, promscrape.ACCEPTED: 5.0}
    after = {promscrape.DRAFTS: 30.0, promscrape.DRAFT_TOKENS: 120.0, promscrape.ACCEPTED: 45.0}
    a = promscrape.acceptance(before, after)
    assert a["acceptance_rate"] == pytest.approx(40 / 80)
    assert a["mean_acceptance_length"] == pytest.approx(1 + 40 / 20)
    assert a["drafts"] == 20 and a["draft_tokens"] == 80
    # spec decoding off: no counters -> None, not zero
    assert promscrape.acceptance({}, {})["acceptance_rate"] is None
    # a failed scrape, or a counter that went backwards (server restarted): no figure
    assert promscrape.acceptance(None, after)["acceptance_rate"] is None
    assert promscrape.acceptance(after, before)["acceptance_rate"] is None


# ---------------------------------------------------------------- loopback guard


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"])
def test_loopback_hosts_pass(host):
    assert netguard.check_host(host) == host


@pytest.mark.parametrize("host", ["10.0.0.1", "8.8.8.8", "0.0.0.0", "192.168.1.2", "example.invalid", ""])
def test_non_loopback_hosts_refused(host):
    with pytest.raises(netguard.NonLoopbackError):
        netguard.check_host(host)


def test_allow_remote_and_replica_parsing():
    assert netguard.check_host("10.0.0.1", allow_remote=True) == "10.0.0.1"
    assert netguard.parse_replicas("127.0.0.1:8001, 127.0.0.1:8002") == [
        "http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    with pytest.raises(netguard.NonLoopbackError):
        netguard.parse_replicas("127.0.0.1:8001,10.1.1.1:8002")
    with pytest.raises(ValueError):
        netguard.parse_replicas("127.0.0.1")  # no port
    with pytest.raises(ValueError):
        netguard.check_url("ftp://127.0.0.1/")


# ---------------------------------------------------------------- Poisson pacing


def test_poisson_pacer_gaps_are_exponential():
    rate = 4.0
    pacer = pacing.PoissonPacer(rate, random.Random(1))
    now, starts = 0.0, []
    for _ in range(4000):  # instant responses: the user starts exactly when told
        now += pacer.next_wait(now)
        starts.append(now)
    gaps = np.diff(starts)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    assert sstats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01
    # counts in 1 s windows are Poisson: mean == variance
    counts = np.bincount(np.floor(starts).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.15)


def test_poisson_pacer_is_open_loop_but_never_bursts():
    pacer = pacing.PoissonPacer(1.0, random.Random(0))
    first = pacer.next_wait(0.0)
    # a response that took far longer than the gaps: start at once, re-anchored at "now"
    assert pacer.next_wait(first + 100.0) == 0.0
    assert pacer.next_start == first + 100.0
    # a short response: the wait is measured from the scheduled start, not from the response end
    sched = pacer.next_start
    w = pacer.next_wait(sched + 0.01)
    assert w == pytest.approx(pacer.next_start - sched - 0.01)
    with pytest.raises(ValueError):
        pacing.PoissonPacer(0.0)


def test_poisson_throughput_wait_time_per_user():
    wt = pacing.poisson_throughput(1000.0, seed=3)
    u1, u2 = Namespace(), Namespace()
    waits = [wt(u1) for _ in range(50)]
    assert all(0 <= w < 1.0 for w in waits)
    wt(u2)
    assert u1._poisson_pacer is not u2._poisson_pacer


# ---------------------------------------------------------------- dataset and report


def test_shipped_dataset_has_length_distributions():
    recs = load_dataset(DEFAULT_DATASET)
    assert len(recs) >= 100
    prompt_lens = {r["prompt_tokens"] for r in recs}
    out_lens = {r["max_tokens"] for r in recs}
    assert len(prompt_lens) > 20 and len(out_lens) > 20  # distributions, not one fixed length
    assert all(r["prompt_tokens"] + r["max_tokens"] < 512 for r in recs)  # fits --max-model-len 512
    assert max(r["max_tokens"] for r in load_dataset(DEFAULT_DATASET, max_tokens_cap=16)) == 16


def test_render_table_from_summary():
    ok = {"server": "spec-off", "replicas": 2, "level": "4 users", "users": 4, "rate": None, "status": "ok",
          "reason": "", **stats.summarize([_sample(0, 1, 11)]), **promscrape.acceptance(None, None)}
    bad = {"server": "specbeam", "replicas": 1, "level": "4 users", "users": 4, "rate": None,
           "status": "failed_to_start", "reason": "ModuleNotFoundError: specbeam_vllm | x",
           **stats.summarize([]), **promscrape.acceptance(None, None)}
    table = report.render_table({"meta": {}, "results": [ok, bad]})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(report.COLUMNS) + 1
    assert "4 users × 2 replicas" in lines[2] and "| 11.0 |" in lines[2]
    assert "failed_to_start: ModuleNotFoundError: specbeam_vllm / x" in lines[3]  # no stray column
    assert all(line.count("|") == lines[0].count("|") for line in lines)


# ---------------------------------------------------------------- Locust client vs the fake server


@pytest.fixture()
def fake_server():
    sys.path.insert(0, str(FAKE.parent))
    import fake_openai_server as fos
    from http.server import ThreadingHTTPServer

    state = fos.State(Namespace(token_delay=0.002, tokens_per_chunk=2, die_after=0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), fos.make_handler(state))
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def _locust(host, tmp_path, *extra, users=2, run_time=3, timeout=60):
    samples = tmp_path / "samples.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r",
           str(users), "--run-time", f"{run_time}s", "--stop-timeout", "5", "--only-summary",
           "--host", host, "--samples-out", str(samples), "--csv", str(tmp_path / "run"), *extra]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return p, stats.read_samples(samples), time.monotonic() - t0


@needs_locust
def test_locust_streaming_metrics_and_disconnects(fake_server, tmp_path):
    url, state = fake_server
    p, samples, _ = _locust(url, tmp_path, "--max-tokens-cap", "12", "--disconnect-fraction", "0.5",
                            "--ignore-eos", "--seed", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    done = [s for s in samples if s["ok"] and not s["disconnected"]]
    cut = [s for s in samples if s["disconnected"]]
    assert done and cut and not [s for s in samples if not s["ok"]]
    recs = load_dataset(DEFAULT_DATASET, 12)
    for s in done:
        assert s["output_tokens"] in {r["max_tokens"] for r in recs}  # from the usage chunk
        assert s["ttft"] is not None and 0 < s["ttft"] <= s["e2e"]
        # 2 tokens per chunk; chunks that arrive in one read are one arrival (possible under load)
        assert len(s["itl"]) <= math.ceil(s["output_tokens"] / 2) - 1
        assert sum(s["itl"]) <= s["e2e"] - s["ttft"]
        assert s["tpot"] == pytest.approx((s["e2e"] - s["ttft"]) / (s["output_tokens"] - 1))
    assert sum(len(s["itl"]) for s in done) >= len(done)  # arrivals are mostly apart at 4 ms per chunk
    # the server saw the dropped connections (it notices at its next write)
    deadline = time.monotonic() + 5
    while state.counters["aborted"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.counters["aborted"] >= 1
    rows = (tmp_path / "run_stats.csv").read_text()
    for kind in ("TTFT", "ITL", "TPOT", "e2e", "OUT_TOK/S"):
        assert f"{kind},completions" in rows


@needs_locust
def test_locust_chat_non_stream_bounded_by_max_requests(fake_server, tmp_path):
    url, _ = fake_server
    p, samples, elapsed = _locust(url, tmp_path, "--api", "chat", "--no-stream", "--max-requests", "5",
                                  "--max-tokens-cap", "4", run_time=30)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(samples) == 5 and all(s["ok"] and s["ttft"] is None and s["output_tokens"] <= 4 for s in samples)
    assert elapsed < 20  # stopped by --max-requests, not by the 30 s run time


@needs_locust
def test_locust_poisson_rate_and_loopback_refusal(fake_server, tmp_path):
    url, _ = fake_server
    p, samples, _ = _locust(url, tmp_path, "--request-rate", "8", "--max-tokens-cap", "2", users=4, run_time=3)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 8 <= len(samples) <= 48  # ~24 expected at 8 req/s for 3 s; closed loop would send hundreds
    p, samples, _ = _locust("http://10.11.12.13:8000", tmp_path / "x", run_time=2)
    assert p.returncode == 2 and "non-loopback" in p.stderr and samples == []


# ---------------------------------------------------------------- the sweep against fake servers


@needs_locust
def test_sweep_reports_failures_without_crashing(tmp_path):
    from loadtests import sweep

    fake = f"{sys.executable} {FAKE} --port {{port}}"
    out = tmp_path / "sweep"
    rc = sweep.main([
        "--quick", "--out", str(out), "--concurrency", "1,2", "--run-time", "2", "--servers", "good,nostart,dies",
        "--server", f"good={fake} --tokens-per-chunk 3 --token-delay 0.001",
        "--server", f"nostart={fake} --fail-start",
        "--server", f"dies={fake} --die-after 3 --token-delay 0.01",
        "--disconnect-fraction", "0.2", "--startup-timeout", "20",
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["server"], r["users"]): r for r in summary["results"]}
    assert len(rows) == 6
    for users in (1, 2):
        good = rows[("good", users)]
        assert good["status"] == "ok" and good["completed"] > 0 and good["failed"] == 0
        assert good["output_tokens_per_s"] > 0 and good["ttft_p50_ms"] > 0
        # 3 tokens per step of 4 drafts: 2 accepted (fewer on a last, partial step)
        assert 0.4 < good["acceptance_rate"] <= 0.5
        assert 2.6 < good["mean_acceptance_length"] <= 3.0
        assert rows[("nostart", users)]["status"] == "failed_to_start"
        assert "failing on purpose" in rows[("nostart", users)]["reason"]
    assert rows[("dies", 1)]["status"] == "server_died"  # died during the first level
    assert rows[("dies", 2)]["status"] == "server_died" and "before this level" in rows[("dies", 2)]["reason"]
    assert summary["meta"]["max_tokens_cap"] == sweep.QUICK["max_tokens_cap"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7
    assert (out / "summary.md").read_text().strip() == report.render_table(summary)
    if importlib.util.find_spec("matplotlib"):
        assert (out / "throughput.png").stat().st_size > 1000 and (out / "latency.png").exists()


def test_sweep_refuses_remote_hosts_and_bad_levels(tmp_path, capsys):
    from loadtests import sweep

    for argv in (["--host", "10.0.0.5"], ["--replicas", "127.0.0.1:1,192.168.0.9:2"], ["--concurrency", "0"],
                 ["--servers", "nope"], ["--disconnect-fraction", "1.5"]):
        with pytest.raises(SystemExit) as e:
            sweep.main(["--out", str(tmp_path), *argv])
        assert e.value.code == 2
    args = sweep.resolve(sweep.build_parser().parse_args(["--quick", "--out", "x", "--run-time", "5"]))
    assert args.run_time == 5 and [lv["users"] for lv in args.levels] == [1, 4]
    assert [s.name for s in args.specs] == ["spec-off", "draft_model", "specbeam"]


@needs_locust
def test_sweep_two_replicas_one_killed_mid_level(tmp_path):
    from loadtests import sweep

    fake = f"{sys.executable} {FAKE} --port {{port}} --token-delay 0.005"
    out = tmp_path / "rep"
    rc = sweep.main(["--out", str(out), "--servers", "fake", "--server", f"fake={fake}", "--num-replicas", "2",
                     "--concurrency", "4", "--run-time", "3", "--kill-replica-after", "1", "--warmup-requests", "1",
                     "--startup-timeout", "20"])
    assert rc == 1  # no level ran clean
    (row,) = json.loads((out / "summary.json").read_text())["results"]
    assert row["replicas"] == 2 and row["status"] == "server_died" and "killed by SIGKILL" in row["reason"]
    per = row["completed_per_replica"]
    assert len(per) == 2  # requests went to both replicas
    assert row["completed"] > 0 and max(per.values()) > 0  # the survivor kept serving
    assert row["failed"] > 0  # requests to the killed replica failed, and were counted
    assert row["acceptance_rate"] is None  # no valid after-scrape from a dead replica


def test_report_updates_markdown_between_markers(tmp_path):
    row = {"server": "spec-off", "replicas": 1, "level": "1 users", "users": 1, "rate": None, "status": "ok",
           "reason": "", **stats.summarize([_sample(0, 1, 11)]), **promscrape.acceptance(None, None)}
    meta = {"command": "python -m loadtests.sweep --quick --out d", "date": "2026-01-01", "machine": "m",
            "run_time_s": 20, "api": "completions", "stream": True, "max_tokens_cap": 64, "ignore_eos": True,
            "temperature": 0.0, "num_speculative_tokens": 4, "duration_s": 1.0, "loadavg_1min": [1.0, 2.0]}
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps({"meta": meta, "results": [row]}))
    md = tmp_path / "README.md"
    md.write_text("intro\n<!-- t:start -->\nold table\n<!-- t:end -->\nafter\n")
    report.main([str(summary_path), "--update", str(md), "--marker", "t"])
    text = md.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("<!-- t:end -->\nafter\n")
    assert "`python -m loadtests.sweep --quick --out d`" in text and "| spec-off | 1 users |" in text
    with pytest.raises(ValueError):
        report.replace_between_markers("no markers", "t", "x")


def test_replica_env_splits_gpus_and_cores():
    from loadtests import sweep

    args = sweep.resolve(sweep.build_parser().parse_args(
        ["--out", "x", "--num-replicas", "2", "--gpus-per-replica", "2", "--tensor-parallel-size", "2",
         "--bind-replica-cpus", "--pythonpath", "/opt/sb"]))
    e0, e1 = sweep.replica_env(args, 0), sweep.replica_env(args, 1)
    assert (e0["CUDA_VISIBLE_DEVICES"], e1["CUDA_VISIBLE_DEVICES"]) == ("0,1", "2,3")
    assert e0["VLLM_CPU_OMP_THREADS_BIND"] != e1["VLLM_CPU_OMP_THREADS_BIND"] or (os.cpu_count() or 1) == 1
    assert e0["PYTHONPATH"].split(os.pathsep)[0] == "/opt/sb" and e0["VLLM_NO_USAGE_STATS"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in sweep.replica_env(
        sweep.resolve(sweep.build_parser().parse_args(["--out", "x"])), 1)
    from loadtests.servers import CONFIGS, CommonFlags, Ctx, ServerSpec, build_command
    argv = build_command(ServerSpec("specbeam", builtin=CONFIGS["specbeam"]), Ctx("T", "D", 4), "127.0.0.1", 9,
                         CommonFlags(tensor_parallel_size=2, extra=["--seed", "1"]))
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and argv[-2:] == ["--seed", "1"]
    assert argv[argv.index("serve") - 1] == "specbeam_hf.app.cli"  # specbeam serve, which sets the speculative config
    assert argv[argv.index("--num-speculative-tokens") + 1] == "4"
    assert argv[argv.index("--port") + 1] == "9"
