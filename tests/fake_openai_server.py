"""A tiny OpenAI-compatible server for the load-test tests (stdlib only, 127.0.0.1 only).

    python tests/fake_openai_server.py --port 8123 [--token-delay 0.002] [--tokens-per-chunk 2]
        [--accept 2] [--die-after 5] [--fail-start] [--startup-delay 0.5]

Serves ``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (streamed as
SSE or not) and ``/metrics`` with vLLM's spec-decode counters: every ``--tokens-per-chunk`` output
tokens form one "draft step" that proposed 4 tokens and accepted ``tokens_per_chunk - 1`` of them,
so the acceptance a scraper computes is known in advance. ``fake:aborted_total`` counts streams the
client dropped. ``--die-after N`` exits the process when the N-th generation request arrives (a
server crash mid-run); ``--fail-start`` exits before listening.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NUM_SPEC = 4


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.requests = 0
        self.counters = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "generation": 0, "aborted": 0}

    def count_tokens(self, n: int) -> None:
        k = self.args.tokens_per_chunk
        steps = -(-n // k)
        with self.lock:
            self.counters["generation"] += n
            self.counters["drafts"] += steps
            self.counters["draft_tokens"] += NUM_SPEC * steps
            self.counters["accepted"] += n - steps


def make_handler(state: State):
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _json(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            elif self.path == "/metrics":
                c = state.counters
                text = (
                    "# HELP vllm:spec_decode_num_drafts_total drafts\n"
                    "# TYPE vllm:spec_decode_num_drafts_total counter\n"
                    f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="fake-model"}} {c["drafts"]}.0\n'
                    f'vllm:spec_decode_num_draft_tokens_total{{engine="0",model_name="fake-model"}} {c["draft_tokens"]}.0\n'
                    f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="fake-model"}} {c["accepted"]}.0\n'
                    f'vllm:generation_tokens_total{{engine="0",model_name="fake-model"}} {c["generation"]}.0\n'
                    f"fake:aborted_total {c['aborted']}.0\n"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self):
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._json(404, {"error": "not found"})
                return
            with state.lock:
                state.requests += 1
                n_req = state.requests
            if args.die_after and n_req >= args.die_after:
                os._exit(3)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            chat = self.path.endswith("chat/completions")
            if chat and not body.get("messages"):
                self._json(400, {"error": {"message": "messages required"}})
                return
            if not chat and not body.get("prompt"):
                self._json(400, {"error": {"message": "prompt required"}})
                return
            n = int(body.get("max_tokens", 16))
            k = args.tokens_per_chunk
            if not body.get("stream"):
                time.sleep(n * args.token_delay)
                state.count_tokens(n)
                text = "tok " * n
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                          else {"index": 0, "text": text})
                self._json(200, {"id": "x", "choices": [choice],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": n}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
            sent = 0
            try:
                if chat:
                    self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                while sent < n:
                    m = min(k, n - sent)
                    time.sleep(args.token_delay * m)
                    text = "tok " * m
                    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                    self._event({"choices": [choice]})
                    sent += m
                if body.get("stream_options", {}).get("include_usage"):
                    self._event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                with state.lock:
                    state.counters["aborted"] += 1
            state.count_tokens(sent)

        def _event(self, obj) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-delay", type=float, default=0.002, help="seconds per output token")
    ap.add_argument("--tokens-per-chunk", type=int, default=1)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--fail-start", action="store_true")
    ap.add_argument("--startup-delay", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("fake server: loopback only")
    if args.fail_start:
        print("fake server: failing on purpose", file=sys.stderr)
        sys.exit(1)
    time.sleep(args.startup_delay)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(State(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
