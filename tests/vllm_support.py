"""Shared pieces of the tests that start real vLLM servers on 127.0.0.1."""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


def require_vllm():
    """Skip without vLLM, except in CI, where the vLLM tests must run (kernels that do not load fail them too)."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or torchvision's RuntimeError
        if os.environ.get("CI") and not os.environ.get("SPECBEAM_QUICK_TIER"):  # the quick tier runs without vLLM
            raise RuntimeError(f"vLLM must be importable in CI: {err}") from err
        pytest.skip(f"vLLM not importable ({type(err).__name__}: {err}); install with python -m specbeam_vllm.install",
                    allow_module_level=True)
    reason = vllm_kernels_fail()
    if reason:
        if os.environ.get("CI"):
            raise RuntimeError(f"vLLM's kernels must load in CI: {reason}")
        pytest.skip(reason, allow_module_level=True)


@functools.lru_cache(maxsize=None)
def vllm_kernels_fail() -> str | None:
    """None when vLLM's compiled kernels load here the way its CPU worker loads them (the wheel's
    AVX-512 or AVX2 build, by what the CPU has), else why not. Tried in a child process: a build
    the CPU cannot run kills the process with an illegal instruction."""
    from specbeam_vllm.install import KERNEL_CHECK

    child = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, timeout=600)
    if child.returncode == 0:
        return None
    killed = {-signal.SIGILL: "illegal instruction", -signal.SIGABRT: "aborted"}.get(child.returncode, f"exit {child.returncode}")
    said = child.stderr.strip()[-300:]
    return f"vLLM's compiled kernels do not load on this machine ({killed})" + (f": {said}" if said else "")


COMMON_FLAGS = ["--max-model-len", "512", "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "8",
                "--seed", "0"]


def completion(url: str, prompt, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
               timeout: float = 120.0, **extra) -> dict:
    from specbeam_vllm.server import post_json

    body = {"model": served_name(url), "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "return_token_ids": True, **extra}
    if seed is not None:
        body["seed"] = seed
    return post_json(url + "/v1/completions", body, timeout=timeout)["choices"][0]


@functools.lru_cache(maxsize=None)
def served_name(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        return json.load(resp)["data"][0]["id"]


def token_ids(choice: dict) -> list[int]:
    ids = choice.get("token_ids")
    assert ids is not None, f"server did not return token ids: {choice}"
    return list(ids)


def run_all(fn, items, concurrency: int):
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(fn, items))


def stream_and_maybe_disconnect(port: int, model: str, prompt: str, max_tokens: int, disconnect_after: int | None,
                                timeout: float = 120.0) -> tuple[int, bool]:
    """Stream a completion; close the connection after ``disconnect_after`` chunks (None: read to the end).

    Returns the number of data chunks read (a chunk may carry several tokens under speculation) and
    whether the stream ended with ``data: [DONE]``.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:500]
    chunks, done = 0, False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = resp.readline()
        if not line:
            break
        if line.strip() == b"data: [DONE]":
            done = True
            break
        if line.startswith(b"data: "):
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                conn.sock.close()  # the client goes away mid-stream
                break
    conn.close()
    return chunks, done


def wait_for(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def read_stats(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}
