"""Sampled output of a specbeam vLLM server follows the target's distribution (small vocabulary).

One batch mixes three kinds of sampled requests — temperature alone, temperature with top-k,
temperature with top-p — interleaved, so every step verifies rows of all three. Spec-off and specbeam
servers each answer the same ``N`` requests of each kind; at every output position the two samples'
token distributions are compared with a chi-square test of homogeneity (categories with fewer than
10 samples in both together are pooled). Each of the 12 comparisons must have p > 1e-3, so together
they raise a false alarm about 1.2 % of the time; the seeds are fixed, so a given build passes or
fails the same way each run. specbeam samples each row's drafts at that row's parameters and hands
vLLM's rejection sampler their probabilities: the path that must stay exact.
"""

from __future__ import annotations

from collections import Counter

import pytest
from scipy.stats import chi2_contingency

from vllm_support import COMMON_FLAGS, completion, require_vllm, run_all, token_ids, wait_for

require_vllm()

from specbeam_vllm.server import Server, kv_idle, spec_metrics, specbeam_flags  # noqa: E402

from model_folders import small_vocab_pair  # noqa: E402

N = 200
PROMPT = [1, 5, 9, 13, 4]
OUT_LEN = 4
KINDS = {"temperature": dict(temperature=0.8), "top_k": dict(temperature=1.0, top_k=6),
         "top_p": dict(temperature=0.9, top_p=0.85)}
P_MIN = 1e-3
FLAGS = [("256" if prev == "--max-model-len" else f) for prev, f in zip([None] + COMMON_FLAGS, COMMON_FLAGS)]


pytestmark = pytest.mark.slow  # starts vLLM servers: not in the quick tier (-m "not slow")


def sample_outputs(url: str) -> dict[str, list[list[int]]]:
    jobs = [(kind, seed) for seed in range(N) for kind in KINDS]  # interleaved: every batch mixes the kinds

    def one(job) -> list[int]:
        kind, seed = job
        params = dict(KINDS[kind])
        return token_ids(completion(url, PROMPT, OUT_LEN, params.pop("temperature"), seed=seed, ignore_eos=True,
                                    **params))

    outputs = run_all(one, jobs, concurrency=8)
    by_kind: dict[str, list[list[int]]] = {kind: [] for kind in KINDS}
    for (kind, _), ids in zip(jobs, outputs):
        by_kind[kind].append(ids)
    return by_kind


def homogeneity_p(a: list[int], b: list[int]) -> float:
    counts_a, counts_b = Counter(a), Counter(b)
    cats = sorted(set(counts_a) | set(counts_b))
    big = [c for c in cats if counts_a[c] + counts_b[c] >= 10]
    rows = [[counts_a[c] for c in big], [counts_b[c] for c in big]]
    rest_a = sum(counts_a[c] for c in cats if c not in big)
    rest_b = sum(counts_b[c] for c in cats if c not in big)
    if rest_a + rest_b:
        rows[0].append(rest_a)
        rows[1].append(rest_b)
    if len(rows[0]) < 2:
        return 1.0  # one category: nothing to compare
    return float(chi2_contingency(rows)[1])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return small_vocab_pair(tmp_path_factory.mktemp("small_vocab"))


@pytest.fixture(scope="module")
def spec_off_samples(pair, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("off") / "server.log")
    with Server(pair[0], FLAGS, log_path=log) as server:
        return sample_outputs(server.url)


@pytest.fixture(scope="module")
def specbeam_run(pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("on")
    flags = specbeam_flags(pair[1], 3, adaptive_draft_length=False)  # every step drafts: the path under test
    with Server(pair[0], flags + FLAGS, log_path=str(folder / "server.log")) as server:
        samples = sample_outputs(server.url)
        idle = wait_for(lambda: kv_idle(server.url), timeout=30)
        return samples, spec_metrics(server.url), idle, server.log_tail(10_000_000)


def test_samples_are_full_length_and_kv_blocks_come_back(spec_off_samples, specbeam_run):
    samples, _, idle, log = specbeam_run
    for kind in KINDS:
        assert all(len(s) == OUT_LEN for s in spec_off_samples[kind])
        assert all(len(s) == OUT_LEN for s in samples[kind])
    assert idle, "vLLM's KV cache did not come back to idle after the load"
    assert "Missing cached draft probabilities" not in log  # every verified draft came with its probabilities


def test_drafts_were_verified_and_accepted(specbeam_run):
    _, metrics, _, _ = specbeam_run
    assert 0 < metrics["accepted_tokens"] < metrics["draft_tokens"], metrics


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("position", range(OUT_LEN))
def test_output_distribution_matches_spec_off(spec_off_samples, specbeam_run, kind, position):
    off = [s[position] for s in spec_off_samples[kind]]
    on = [s[position] for s in specbeam_run[0][kind]]
    p = homogeneity_p(off, on)
    assert p > P_MIN, (kind, position, p, Counter(off).most_common(8), Counter(on).most_common(8))


def test_the_check_tells_different_distributions_apart(spec_off_samples):
    """The same test rejects a sample shifted like a mis-tempered one (the check has power)."""
    off = [s[1] for s in spec_off_samples["temperature"]]
    top = Counter(off).most_common(1)[0][0]
    shifted = [t if (t != top or i % 3) else (t + 1) % 32 for i, t in enumerate(off)]  # a third of top moved
    assert homogeneity_p(off, shifted) < P_MIN
