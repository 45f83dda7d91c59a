"""Two tensor-parallel ranks on the CPU: every rank runs the proposer and must propose the same
drafts with the same draft probabilities (per-request seeds from the configuration, never from the
process), and greedy output stays the target's."""

from __future__ import annotations

import os

import pytest

from vllm_support import COMMON_FLAGS, completion, read_stats, require_vllm, run_all, token_ids, wait_for

require_vllm()

from specbeam_vllm.server import Server, specbeam_flags  # noqa: E402

from conftest import DEMO_DIR  # noqa: E402

TARGET, DRAFT = str(DEMO_DIR / "target"), str(DEMO_DIR / "draft")
PROMPTS = ["def fibonacci(n):\n", "The old man walked", "import os\n"]

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel ranks need two CPUs")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with Server(TARGET, COMMON_FLAGS, log_path=str(tmp_path_factory.mktemp("tp-off") / "server.log")) as server:
        return {p: token_ids(completion(server.url, p, 32)) for p in PROMPTS}


def test_two_ranks_propose_alike_and_greedy_is_exact(tmp_path, reference):
    stats = str(tmp_path / "stats-rank{rank}.json")
    flags = specbeam_flags(DRAFT, 4, stats_file=stats, full_draft_max_batch=8, no_draft_min_batch=9) + \
        COMMON_FLAGS + ["--tensor-parallel-size", "2"]
    server = Server(TARGET, flags, log_path=str(tmp_path / "server.log"), startup_timeout=300,
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # one core per rank (vLLM asks for NUMA nodes otherwise)
    with server:
        for prompt in PROMPTS:
            assert token_ids(completion(server.url, prompt, 32)) == reference[prompt], prompt
        sampled = run_all(lambda s: token_ids(completion(server.url, PROMPTS[s % 3], 24, 0.8, seed=s, ignore_eos=True)), range(6), 3)
        assert all(len(s) == 24 for s in sampled)

        def both_ranks_idle():
            r0, r1 = read_stats(stats.format(rank=0)), read_stats(stats.format(rank=1))
            return r0 and r1 and r0["states"] == 0 and r1["states"] == 0 and (r0, r1)

        r0, r1 = wait_for(both_ranks_idle, timeout=30)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["sampled_draft_rows"] > 0 and r0["drafted_tokens"] > 0
    assert r0["proposal_digest"] == r1["proposal_digest"]  # same drafts and probabilities on both ranks
    for key in ("drafted_tokens", "draft_rows", "states_created", "sampled_draft_rows"):
        assert r0[key] == r1[key], key
