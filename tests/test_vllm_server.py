"""specbeam inside a real vLLM server on 127.0.0.1 (started and stopped here), on the demo pair.

Spec-off runs first and records the reference outputs, then stops. The specbeam server
(``"method": "specbeam"``: vLLM's draft-model path with specbeam's drafter and scheduler) must give the
same greedy tokens alone, at 16 concurrent requests of mixed prompt lengths, next to sampled
requests and while streaming clients disconnect; its draft length must move (each length is
measured, and the policy here re-measures often); vLLM's KV cache must come back to its idle level.
"""

from __future__ import annotations

import json

import pytest

from vllm_support import (COMMON_FLAGS, completion, require_vllm, run_all, served_name,
                          stream_and_maybe_disconnect, token_ids, wait_for)

require_vllm()

from specbeam_vllm.server import (Server, draft_length_steps, kv_idle, metric_sum, read_metrics,  # noqa: E402
                                  spec_metrics, specbeam_flags)

from conftest import DEMO_DIR  # noqa: E402

TARGET, DRAFT = str(DEMO_DIR / "target"), str(DEMO_DIR / "draft")
PROMPTS = ["def fibonacci(n):\n", "The old man walked", "import os\nimport sys\n", "Once upon a time",
           "class Stack:\n    def __init__(self):\n", "In the morning the", "She said that", "for i in range("]
LONG_PROMPTS = ["\n".join(PROMPTS[i:i + 4]) for i in range(4)]  # 25-35 tokens
MAX_TOKENS = 40
FLAGS16 = [("16" if prev == "--max-num-seqs" else f) for prev, f in zip([None] + COMMON_FLAGS, COMMON_FLAGS)]
# every length tried at once, re-measured every second choice, held 2 steps: lengths 0..4 all occur
POLICY = {"hold_steps": 2, "settle_steps": 0, "trials": 1, "explore_every": 1, "local_search": False}


pytestmark = pytest.mark.slow  # starts vLLM servers: not in the quick tier (-m "not slow")


def greedy_ids(url: str, prompt: str) -> list[int]:
    return token_ids(completion(url, prompt, MAX_TOKENS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Spec-off greedy outputs of every prompt (the server is stopped afterwards)."""
    log = str(tmp_path_factory.mktemp("spec-off") / "server.log")
    with Server(TARGET, FLAGS16, log_path=log) as server:
        return {p: greedy_ids(server.url, p) for p in PROMPTS + LONG_PROMPTS}


@pytest.fixture(scope="module")
def specbeam_server(tmp_path_factory, reference):
    folder = tmp_path_factory.mktemp("specbeam")
    server = Server(TARGET, specbeam_flags(DRAFT, 4, **POLICY) + FLAGS16, log_path=str(folder / "server.log"))
    with server:
        server.idle_usage = metric_sum(read_metrics(server.url), "vllm:kv_cache_usage_perc")
        yield server
        before_shutdown = server.log_tail(10_000_000).split("[shutdown]")[0]
    assert "Traceback" not in before_shutdown, before_shutdown[-4000:]


def test_the_engine_runs_vllms_draft_model_path_with_specbeams_scheduler(specbeam_server):
    log = specbeam_server.log_tail(10_000_000)
    assert "method='draft_model'" in log, log[-3000:]
    assert "specbeam_vllm.scheduler" in log, log[-3000:]
    assert specbeam_server.idle_usage == 0.0


def test_greedy_equals_spec_off_one_at_a_time(specbeam_server, reference):
    for prompt in PROMPTS:
        assert greedy_ids(specbeam_server.url, prompt) == reference[prompt], prompt


def test_greedy_equals_spec_off_at_concurrency_16_with_mixed_prompt_lengths(specbeam_server, reference):
    prompts = PROMPTS + LONG_PROMPTS + PROMPTS[::-1] + LONG_PROMPTS[::-1]  # 24 requests, 16 at a time
    outputs = run_all(lambda p: greedy_ids(specbeam_server.url, p), prompts, concurrency=16)
    for prompt, ids in zip(prompts, outputs):
        assert ids == reference[prompt], prompt


def test_mixed_greedy_and_sampled_batch(specbeam_server, reference):
    """Sampled requests (temperature, top-k, top-p) in the same batch do not change greedy rows."""
    sampled = [dict(temperature=0.8, seed=11), dict(temperature=1.0, top_k=20, seed=12),
               dict(temperature=0.7, top_p=0.8, seed=13), dict(temperature=0.9, top_k=5, top_p=0.9, seed=14)]
    jobs = [j for pair in zip([(p, None) for p in PROMPTS[:4]], [(p, s) for p, s in zip(PROMPTS[4:], sampled)])
            for j in pair]

    def run(job):
        prompt, params = job
        if params is None:
            return greedy_ids(specbeam_server.url, prompt)
        params = dict(params)
        return token_ids(completion(specbeam_server.url, prompt, MAX_TOKENS, params.pop("temperature"), **params))

    outputs = run_all(run, jobs, concurrency=8)
    for (prompt, params), ids in zip(jobs, outputs):
        if params is None:
            assert ids == reference[prompt], prompt
        else:
            assert 0 < len(ids) <= MAX_TOKENS


def test_counters_and_draft_lengths_on_metrics(specbeam_server):
    run_all(lambda p: greedy_ids(specbeam_server.url, p), PROMPTS, concurrency=4)
    counters = spec_metrics(specbeam_server.url)
    assert counters["drafts"] > 0 and 0 < counters["accepted_tokens"] < counters["draft_tokens"], counters
    steps = draft_length_steps(specbeam_server.url)
    assert len([k for k, n in steps.items() if n > 0]) >= 3, steps  # the policy moved the length
    assert 0 in steps and max(steps) == 4, steps
    assert "vllm:specbeam_draft_length" in " ".join(read_metrics(specbeam_server.url))


def test_streaming_clients_disconnect_and_kv_blocks_come_back(specbeam_server, reference):
    model = served_name(specbeam_server.url)
    cuts = [2, None, 5, None, 1, None, 8, None] * 2  # half the clients go away mid-stream
    chunks = run_all(lambda c: stream_and_maybe_disconnect(specbeam_server.port, model, PROMPTS[0], 120, c),
                     cuts, concurrency=16)
    for cut, (n, done) in zip(cuts, chunks):
        if cut is None:
            assert done and n > 0
        else:
            assert n == cut and not done
    assert greedy_ids(specbeam_server.url, PROMPTS[1]) == reference[PROMPTS[1]]  # the server lives on
    assert wait_for(lambda: kv_idle(specbeam_server.url), timeout=30), read_metrics(specbeam_server.url)


@pytest.mark.parametrize("spec, message", [
    ({"model": "specbeam", "num_speculative_tokens": 4}, '"method": "specbeam", "model": "/drafts/d"'),
    ({"method": "specbeam", "model": DRAFT, "num_speculative_tokens": 4, "hold_stepz": 3}, "hold_stepz"),
    ({"method": "specbeam", "model": DRAFT, "num_speculative_tokens": 4,
      "num_speculative_tokens_per_batch_size": [[1, 8, 4]]}, "num_speculative_tokens_per_batch_size"),
])
def test_vllm_server_refuses_a_bad_specbeam_config_in_one_line(tmp_path, spec, message):
    """Through vLLM's own flags: the server exits at once with one line naming the problem and the fix."""
    flags = ["--speculative-config", json.dumps(spec),
             "--additional-config", json.dumps({"specbeam": {"draft": "/drafts/d"}} if spec.get("model") == "specbeam"
                                               else {})] + COMMON_FLAGS
    server = Server(TARGET, flags, log_path=str(tmp_path / "server.log"), startup_timeout=120)
    with pytest.raises(RuntimeError, match="exited with status 2"):
        server.start()
    log = server.log_tail(200_000)
    errors = [line for line in log.splitlines() if line.startswith("specbeam: error:")]
    assert len(errors) == 1 and message in errors[0], log
    assert "Traceback" not in log, log
