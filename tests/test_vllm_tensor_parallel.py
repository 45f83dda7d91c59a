"""Two tensor-parallel ranks on the CPU: vLLM shards the draft like the target (its draft-model
path requires the same tensor-parallel size), greedy output stays the target's, and sampled requests
run on both ranks."""

from __future__ import annotations

import os

import pytest

from vllm_support import COMMON_FLAGS, completion, require_vllm, run_all, token_ids, wait_for

require_vllm()

from specbeam_vllm.server import Server, kv_idle, spec_metrics, specbeam_flags  # noqa: E402

from conftest import DEMO_DIR  # noqa: E402

TARGET, DRAFT = str(DEMO_DIR / "target"), str(DEMO_DIR / "draft")
PROMPTS = ["def fibonacci(n):\n", "The old man walked", "import os\n"]

pytestmark = [
    pytest.mark.slow,  # starts vLLM servers: not in the quick tier (-m "not slow")
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel ranks need two CPUs"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with Server(TARGET, COMMON_FLAGS, log_path=str(tmp_path_factory.mktemp("tp-off") / "server.log")) as server:
        return {p: token_ids(completion(server.url, p, 32)) for p in PROMPTS}


def test_two_ranks_greedy_is_exact_and_sampling_runs(tmp_path, reference):
    flags = specbeam_flags(DRAFT, 4) + COMMON_FLAGS + ["--tensor-parallel-size", "2"]
    server = Server(TARGET, flags, log_path=str(tmp_path / "server.log"), startup_timeout=300,
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # one core per rank (vLLM asks for NUMA nodes otherwise)
    with server:
        for prompt in PROMPTS:
            assert token_ids(completion(server.url, prompt, 32)) == reference[prompt], prompt
        sampled = run_all(lambda s: token_ids(completion(server.url, PROMPTS[s % 3], 24, 0.8, seed=s, top_k=20,
                                                         ignore_eos=True)), range(6), 3)
        assert all(len(s) == 24 for s in sampled)
        metrics = spec_metrics(server.url)
        assert wait_for(lambda: kv_idle(server.url), timeout=30)
        log = server.log_tail(10_000_000).split("[shutdown]")[0]
    assert metrics["draft_tokens"] > 0 and metrics["accepted_tokens"] > 0, metrics
    assert "Traceback" not in log, log[-4000:]
