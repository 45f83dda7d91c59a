"""Locust client for OpenAI-compatible LLM servers (vLLM, ``specbeam serve``).

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 --run-time 30s \
        --host http://127.0.0.1:8000 --api completions --samples-out samples.jsonl --csv run

Each request takes the next prompt of ``--dataset`` (JSONL, see ``dataset.py``) and posts it to
``/v1/completions`` or ``/v1/chat/completions`` (``--api``), streamed unless ``--no-stream``.
Besides Locust's own entry for the HTTP request (time to response headers), every request fires:

- ``TTFT``   — time to the first streamed chunk that carries text (ms);
- ``ITL``    — one entry per gap between arrivals of text (ms): an arrival is what one network
  read returns, one SSE chunk or several; a chunk holds several tokens when drafts are accepted,
  so ITL >= TPOT under speculative decoding;
- ``TPOT``   — (e2e - TTFT) / (output tokens - 1) (ms);
- ``e2e``    — request start to last byte (ms);
- ``OUT_TOK/S`` — output tokens/s of the request; its "response time" column holds tokens/s, not
  ms, and its "response length" the output token count.

The same figures go, one JSON line per request, to ``--samples-out`` (the sweep computes exact
percentiles from them). Pacing: closed loop (each user sends its next request when the last one
ends) or, with ``--request-rate R``, Poisson arrivals at R requests/s in total (``pacing.py``).
Faults: ``--disconnect-fraction F`` makes that share of streamed requests close the connection
after a random number of chunks. Bounds: ``--run-time`` (Locust), ``--max-requests`` (all users
together), ``--request-timeout`` (per request, total). Only loopback hosts unless ``--allow-remote``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import threading
import time

import gevent
from locust import HttpUser, events, task
from locust.exception import StopUser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtests.dataset import DEFAULT_DATASET, load_dataset  # noqa: E402
from loadtests.netguard import NonLoopbackError, check_url, parse_replicas  # noqa: E402
from loadtests.pacing import PoissonPacer  # noqa: E402


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    g = parser.add_argument_group("specbeam load test")
    g.add_argument("--api", choices=["completions", "chat"], default="completions")
    g.add_argument("--no-stream", action="store_true", default=False, help="non-streaming requests")
    g.add_argument("--dataset", default=str(DEFAULT_DATASET), help="prompt JSONL")
    g.add_argument("--model", default="", help="model name to send (default: the first of /v1/models)")
    g.add_argument("--max-tokens-cap", type=int, default=0, help="lower every max_tokens to this (0: off)")
    g.add_argument("--ignore-eos", action="store_true", default=False,
                   help="send ignore_eos (vLLM) so outputs have the dataset's lengths")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--request-rate", type=float, default=0.0,
                   help="total Poisson request rate (req/s) over all users; 0: closed loop")
    g.add_argument("--disconnect-fraction", type=float, default=0.0,
                   help="share of streamed requests that disconnect mid-stream")
    g.add_argument("--replica-urls", default="", help="comma-separated base URLs (default: --host)")
    g.add_argument("--allow-remote", action="store_true", default=False,
                   help="allow non-loopback hosts (refused by default)")
    g.add_argument("--samples-out", default="", help="JSONL file for per-request samples")
    g.add_argument("--max-requests", type=int, default=10_000, help="stop after this many requests in total")
    g.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request, total")
    g.add_argument("--seed", type=int, default=0)


class _Shared:
    """State shared by all users of one Locust process (greenlets: a lock is enough)."""

    def __init__(self, opts):
        if not 0.0 <= opts.disconnect_fraction <= 1.0:
            raise ValueError("--disconnect-fraction must be in [0, 1]")
        if not opts.replica_urls and not opts.host:
            raise ValueError("give --host or --replica-urls")
        urls = (parse_replicas(opts.replica_urls, opts.allow_remote) if opts.replica_urls
                else [check_url(opts.host.rstrip("/"), opts.allow_remote)])
        self.urls = urls
        self._url_cycle = itertools.cycle(urls)
        cap = opts.max_tokens_cap or None
        self.records = load_dataset(opts.dataset, cap)
        self.rng = random.Random(opts.seed)
        self._order = itertools.cycle(self.rng.sample(range(len(self.records)), len(self.records)))
        self.lock = threading.Lock()
        self.sent = 0
        self.finished = 0
        self.max_requests = opts.max_requests
        self.models: dict[str, str] = {}
        self.out = open(opts.samples_out, "a", buffering=1) if opts.samples_out else None

    def next_request(self) -> tuple[str, dict] | None:
        with self.lock:
            if self.sent >= self.max_requests:
                return None
            self.sent += 1
            return next(self._url_cycle), self.records[next(self._order)]

    def write(self, sample: dict) -> int:
        """Record one finished request; returns how many have finished."""
        if self.out is not None:
            self.out.write(json.dumps(sample) + "\n")
        self.finished += 1
        return self.finished


SHARED: _Shared | None = None


@events.init.add_listener
def _on_init(environment, **_kw):
    global SHARED
    opts = environment.parsed_options
    if opts is None:
        return
    try:
        SHARED = _Shared(opts)
    except (NonLoopbackError, ValueError, OSError) as e:
        sys.stderr.write(f"loadtests: {e}\n")
        sys.exit(2)


@events.quitting.add_listener
def _on_quit(environment, **_kw):
    if SHARED is not None and SHARED.out is not None:
        SHARED.out.close()


def _fire(env, kind: str, name: str, value: float, length: int = 0) -> None:
    env.events.request.fire(request_type=kind, name=name, response_time=value,
                            response_length=length, exception=None, context={})


def _sse_reads(raw):
    """Complete lines of a streamed body, one list per network read, as soon as they arrive.

    ``requests``' ``iter_lines`` reads fixed-size blocks and would hold a chunk back until the next
    one fills the block, which shifts TTFT/ITL; ``read1`` returns whatever has arrived (chunked
    transfer encoding included). Events that arrive in the same read are one arrival for ITL.
    """
    buf = b""
    while True:
        data = raw.read1(65536)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        lines = [ln.rstrip(b"\r") for ln in lines if ln.strip()]
        if lines:
            yield lines
    if buf.strip():
        yield [buf]


class OpenAIUser(HttpUser):
    """One simulated client; ``host`` comes from ``--host`` (or ``--replica-urls``)."""

    def wait_time(self):
        opts = self.environment.parsed_options
        if opts.request_rate <= 0:
            # closed loop; after a failure back off briefly so a broken server is not spun on
            return 0.1 if getattr(self, "_last_failed", False) else 0.0
        if not hasattr(self, "_pacer"):
            per_user = opts.request_rate / max(1, opts.num_users or 1)
            self._pacer = PoissonPacer(per_user, random.Random(SHARED.rng.getrandbits(64)))
        return self._pacer.next_wait(time.monotonic())

    def _model(self, base: str) -> str:
        opts = self.environment.parsed_options
        if opts.model:
            return opts.model
        if base not in SHARED.models:
            with self.client.get(f"{base}/v1/models", name="/v1/models", catch_response=True,
                                 timeout=(5, 30)) as r:
                try:
                    SHARED.models[base] = r.json()["data"][0]["id"]
                except Exception as e:  # noqa: BLE001 - any bad answer is a failed request
                    r.failure(f"no model in /v1/models: {e}")
                    return ""
        return SHARED.models[base]

    @task
    def generate(self):
        nxt = SHARED.next_request()
        if nxt is None:
            raise StopUser()  # --max-requests sent: the last request to finish stops the run
        base, rec = nxt
        opts = self.environment.parsed_options
        stream = not opts.no_stream
        model = self._model(base)
        body = {"model": model, "max_tokens": rec["max_tokens"], "temperature": opts.temperature,
                "stream": stream}
        if opts.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        if opts.api == "chat":
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": rec["prompt"]}]
        else:
            path, body["prompt"] = "/v1/completions", rec["prompt"]
        cut_after = None
        if stream and SHARED.rng.random() < opts.disconnect_fraction:
            cut_after = SHARED.rng.randint(1, max(1, rec["max_tokens"] // 2))
        name = f"{opts.api}{'' if stream else ' (no stream)'}"
        sample = {"start": time.time(), "end": None, "ok": False, "disconnected": False, "error": None,
                  "ttft": None, "e2e": None, "output_tokens": 0, "itl": [], "tpot": None,
                  "replica": base, "stream": stream}
        t0 = time.perf_counter()
        try:
            with self.client.post(f"{base}{path}", json=body, name=name, stream=stream, catch_response=True,
                                  timeout=(5, opts.request_timeout)) as resp:
                try:
                    self._read(resp, sample, t0, stream, opts, cut_after)
                except Exception as e:  # noqa: BLE001 - a broken stream is a failed request
                    sample["error"] = f"{type(e).__name__}: {e}"
                if sample["error"]:
                    resp.failure(sample["error"])
                else:
                    resp.success()
        except Exception as e:  # noqa: BLE001 - connection refused etc. (Locust already counted it)
            sample["error"] = sample["error"] or f"{type(e).__name__}: {e}"
        sample["end"] = time.time()
        sample["e2e"] = time.perf_counter() - t0
        sample["ok"] = sample["error"] is None
        self._last_failed = not sample["ok"]
        env = self.environment
        if sample["ok"] and not sample["disconnected"]:
            n = sample["output_tokens"]
            if sample["ttft"] is not None:
                _fire(env, "TTFT", name, sample["ttft"] * 1000)
                if n > 1:
                    sample["tpot"] = (sample["e2e"] - sample["ttft"]) / (n - 1)
                    _fire(env, "TPOT", name, sample["tpot"] * 1000)
            for gap in sample["itl"]:
                _fire(env, "ITL", name, gap * 1000)
            _fire(env, "e2e", name, sample["e2e"] * 1000, n)
            if sample["e2e"] > 0:
                _fire(env, "OUT_TOK/S", name, n / sample["e2e"], n)
        if SHARED.write(sample) >= SHARED.max_requests:
            gevent.spawn(self.environment.runner.quit)

    def _read(self, resp, sample, t0, stream, opts, cut_after):
        if resp.status_code == 0:  # no HTTP response at all (refused, reset, timed out)
            sample["error"] = f"connection error: {str(getattr(resp, 'error', ''))[:200]}"
            return
        if resp.status_code != 200:
            sample["error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
            return
        if not stream:
            data = resp.json()
            sample["output_tokens"] = int((data.get("usage") or {}).get("completion_tokens") or 0)
            if not data.get("choices"):
                sample["error"] = "no choices in response"
            return
        chunks = 0
        last = None
        usage_tokens = None
        finished = False
        for lines in _sse_reads(resp.raw):
            if time.perf_counter() - t0 > opts.request_timeout:
                resp.close()
                sample["error"] = f"request exceeded {opts.request_timeout} s"
                return
            text = ""
            for raw in lines:
                if not raw.startswith(b"data:"):
                    continue
                payload = raw[5:].strip()
                if payload == b"[DONE]":
                    finished = True
                    break
                data = json.loads(payload)
                if "error" in data:
                    sample["error"] = f"server error: {str(data['error'])[:200]}"
                    return
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for ch in data.get("choices") or []:
                    text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            if text:
                # one arrival: every event of this read came in together
                now = time.perf_counter()
                if last is None:
                    sample["ttft"] = now - t0
                else:
                    sample["itl"].append(now - last)
                last = now
                chunks += 1
                if cut_after is not None and chunks >= cut_after:
                    resp.close()  # drop the connection mid-stream: the server must abort the request
                    sample["disconnected"] = True
                    sample["output_tokens"] = chunks
                    return
            if finished:
                break
        if not finished:
            sample["error"] = "stream ended without [DONE]"
            return
        # usage (stream_options.include_usage) is exact; without it count text chunks
        sample["output_tokens"] = int(usage_tokens) if usage_tokens is not None else chunks
