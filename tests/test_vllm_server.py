"""specbeam inside a real vLLM server on 127.0.0.1 (started and stopped here), on the demo pair.

Spec-off runs first and records the reference outputs, then stops; the specbeam server must give
the same greedy tokens, alone, under concurrency, and next to sampled requests; streaming clients
that disconnect must not crash it, and its draft KV blocks must come back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_support import (COMMON_FLAGS, completion, read_stats, require_vllm, run_all, served_name,
                          stream_and_maybe_disconnect, token_ids, wait_for)

require_vllm()

from specbeam_vllm.server import Server, spec_metrics, specbeam_flags  # noqa: E402

from conftest import DEMO_DIR  # noqa: E402

TARGET, DRAFT = str(DEMO_DIR / "target"), str(DEMO_DIR / "draft")
PROMPTS = ["def fibonacci(n):\n", "The old man walked", "import os\nimport sys\n", "Once upon a time",
           "class Stack:\n    def __init__(self):\n", "In the morning the", "She said that", "for i in range("]
LONG_PROMPTS = ["\n".join(PROMPTS[i:i + 4]) for i in range(4)]  # 25-35 tokens: rows that join with them catch up
MAX_TOKENS = 40
MIXED_SAMPLED = [(p, 1000 + i) for i, p in enumerate(PROMPTS[:4])]  # (prompt, seed) at T = 0.8


def greedy_ids(url: str, prompt: str) -> list[int]:
    return token_ids(completion(url, prompt, MAX_TOKENS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Spec-off greedy outputs of every prompt (the server is stopped afterwards)."""
    log = str(tmp_path_factory.mktemp("spec-off") / "server.log")
    with Server(TARGET, COMMON_FLAGS, log_path=log) as server:
        return {p: greedy_ids(server.url, p) for p in PROMPTS + LONG_PROMPTS}


@pytest.fixture(scope="module")
def specbeam_server(tmp_path_factory, reference):
    folder = tmp_path_factory.mktemp("specbeam")
    stats = str(folder / "stats.json")
    # full drafting at every batch size, so rows join, leave and reorder while drafts run; the draft
    # catches rows up 16 padded token slots a step, so rows joining together with long prompts wait
    flags = specbeam_flags(DRAFT, 4, stats_file=stats, full_draft_max_batch=8, no_draft_min_batch=9,
                           max_catch_up_tokens=16)
    server = Server(TARGET, flags + COMMON_FLAGS, log_path=str(folder / "server.log"))
    server.stats_file = stats
    with server:
        yield server
        before_shutdown = server.log_tail(10_000_000).split("[shutdown]")[0]
    assert "Traceback" not in before_shutdown, before_shutdown[-4000:]


def test_greedy_equals_spec_off_one_at_a_time(specbeam_server, reference):
    for prompt in PROMPTS:
        assert greedy_ids(specbeam_server.url, prompt) == reference[prompt], prompt


def test_greedy_equals_spec_off_under_concurrency(specbeam_server, reference):
    prompts = PROMPTS + PROMPTS[::-1]  # 16 requests, 8 at a time: rows join, leave and reorder
    outputs = run_all(lambda p: greedy_ids(specbeam_server.url, p), prompts, concurrency=8)
    for prompt, ids in zip(prompts, outputs):
        assert ids == reference[prompt], prompt


def test_rows_joining_with_long_prompts_wait_for_their_catch_up(specbeam_server, reference):
    """Requests that join together with prompts longer than the catch-up bound: the draft catches
    them up over several steps (rows waiting draft nothing), greedy outputs stay spec-off's and the
    draft blocks come back."""
    before = read_stats(specbeam_server.stats_file)["rows_waiting_for_catch_up"]
    prompts = LONG_PROMPTS + LONG_PROMPTS[::-1]
    outputs = run_all(lambda p: greedy_ids(specbeam_server.url, p), prompts, concurrency=8)
    for prompt, ids in zip(prompts, outputs):
        assert ids == reference[prompt], prompt

    def back_to_baseline():
        s = read_stats(specbeam_server.stats_file)
        return s and s["states"] == 0 and s["free_blocks"] == s["baseline_free_blocks"] and s

    stats = wait_for(back_to_baseline, timeout=30)
    assert stats, read_stats(specbeam_server.stats_file)
    assert stats["rows_waiting_for_catch_up"] > before, stats  # the bound was reached in the server


def test_mixed_greedy_and_sampled_batch(specbeam_server, reference):
    """Sampled requests in the same batch must not change greedy rows (upstream #55005 on CPU)."""
    jobs = [("greedy", p, None) for p in PROMPTS[:4]] + [("sampled", p, s) for p, s in MIXED_SAMPLED]
    jobs = [j for pair in zip(jobs[:4], jobs[4:]) for j in pair]  # interleave

    def run(job):
        kind, prompt, seed = job
        return token_ids(completion(specbeam_server.url, prompt, MAX_TOKENS, 0.8 if seed else 0.0, seed=seed))

    outputs = run_all(run, jobs, concurrency=8)
    for (kind, prompt, _), ids in zip(jobs, outputs):
        if kind == "greedy":
            assert ids == reference[prompt], prompt
        else:
            assert len(ids) > 0


def test_acceptance_counters_in_metrics(specbeam_server):
    greedy_ids(specbeam_server.url, PROMPTS[0])
    metrics = spec_metrics(specbeam_server.url)
    assert metrics["drafts"] > 0 and metrics["draft_tokens"] > 0
    assert metrics["accepted_tokens"] > 0, metrics


def test_streaming_clients_disconnect_and_blocks_come_back(specbeam_server, reference):
    model = served_name(specbeam_server.url)
    cuts = [2, None, 5, None, 1, None, 8, None]  # half the clients go away mid-stream
    chunks = run_all(lambda c: stream_and_maybe_disconnect(specbeam_server.port, model, PROMPTS[0], 120, c),
                     cuts, concurrency=8)
    for cut, (n, done) in zip(cuts, chunks):
        if cut is None:
            assert done and n > 0
        else:
            assert n == cut and not done
    # the server lives on, the aborted requests' draft states are freed, the pool is back to baseline
    assert greedy_ids(specbeam_server.url, PROMPTS[1]) == reference[PROMPTS[1]]

    def back_to_baseline():
        s = read_stats(specbeam_server.stats_file)
        return s and s["states"] == 0 and s["free_blocks"] == s["baseline_free_blocks"] and s

    stats = wait_for(back_to_baseline, timeout=30)
    assert stats, read_stats(specbeam_server.stats_file)
    assert stats["states_created"] >= 8 and stats["drafted_tokens"] > 0


@pytest.mark.parametrize("lookup", [0, 2], ids=["no_lookup", "lookup"])
def test_greedy_equals_spec_off_when_most_steps_have_no_drafts(tmp_path, reference, lookup):
    """The default policy's regime under load: from 3 decoding rows on the draft model drafts
    nothing; without prompt lookup such steps run as spec-off steps (inputs without spec-decode
    metadata, the plain sampler), with it rows whose last tokens repeat get lookup drafts. Drafting
    resumes whenever the batch thins out. Greedy tokens stay spec-off's through every kind of step
    and the switches between them, and the draft blocks come back."""
    stats = str(tmp_path / "stats.json")
    flags = specbeam_flags(DRAFT, 4, stats_file=stats, full_draft_max_batch=1, no_draft_min_batch=3,
                           lookup_draft_tokens=lookup)
    with Server(TARGET, flags + COMMON_FLAGS, log_path=str(tmp_path / "server.log")) as server:
        prompts = PROMPTS + PROMPTS[::-1]
        outputs = run_all(lambda p: greedy_ids(server.url, p), prompts, concurrency=8)
        for prompt, ids in zip(prompts, outputs):
            assert ids == reference[prompt], prompt
        assert greedy_ids(server.url, PROMPTS[2]) == reference[PROMPTS[2]]  # alone: drafts
        metrics = spec_metrics(server.url)

        def back_to_baseline():
            s = read_stats(stats)
            return s and s["states"] == 0 and s["free_blocks"] == s["baseline_free_blocks"] and s

        final = wait_for(back_to_baseline, timeout=30)
        log = server.log_tail(10_000_000).split("[shutdown]")[0]
    assert final, read_stats(stats)
    assert metrics["drafts"] > 0 and metrics["accepted_tokens"] > 0, metrics
    assert (final["lookup_tokens"] > 0 and final["lookup_accepted"] > 0) == bool(lookup), final
    assert "Traceback" not in log, log[-4000:]


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specbeam_hf.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--target", TARGET, "--draft", "/nonexistent/draft"], "--draft '/nonexistent/draft' is not a model folder"),
    (["--target", TARGET, "--draft", DRAFT, "--specbeam-options", '{"draft_kv_tokenz": 10}'], "draft_kv_tokenz"),
    (["--target", TARGET, "--draft", DRAFT, "--specbeam-options", '{"block_size": 0}'], "block_size"),
    (["--target", TARGET, "--draft", DRAFT, "--num-speculative-tokens", "0"], "--num-speculative-tokens"),
])
def test_specbeam_serve_refuses_bad_setup(args, message):
    result = _serve(*args, "--port", "1")
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr


def test_specbeam_serve_refuses_a_draft_with_another_vocabulary(tmp_path):
    from model_folders import small_vocab_pair

    _, other_draft = small_vocab_pair(tmp_path)
    result = _serve("--target", TARGET, "--draft", other_draft, "--port", "1")
    assert result.returncode == 2 and "different vocabulary" in result.stderr, result.stderr


@pytest.mark.parametrize("options, message", [
    ({"draft": DRAFT, "sample_drafts": "sometimes"}, "sample_drafts"),
    ({"draft": "SMALL_VOCAB_DRAFT"}, "vocabulary"),
])
def test_vllm_server_refuses_to_start_on_bad_setup(tmp_path, options, message):
    """Through vLLM's own flags (no specbeam serve checks): the server exits with a message naming it."""
    if options["draft"] == "SMALL_VOCAB_DRAFT":
        from model_folders import small_vocab_pair

        options = {**options, "draft": small_vocab_pair(tmp_path)[1]}
    flags = ["--speculative-config", json.dumps({"model": "specbeam", "num_speculative_tokens": 4}),
             "--additional-config", json.dumps({"specbeam": options})] + COMMON_FLAGS
    server = Server(TARGET, flags, log_path=str(tmp_path / "server.log"), startup_timeout=180)
    with pytest.raises(RuntimeError, match="exited"):
        server.start()
    assert message in server.log_tail(200_000), server.log_tail()
    assert server.process.returncode != 0
    assert os.path.exists(tmp_path / "server.log")
