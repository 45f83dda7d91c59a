"""Sampled output of a specbeam vLLM server follows the target's distribution (small vocabulary).

Spec-off and specbeam servers each answer the same ``N`` seeded requests at T = 0.8; at every
output position the two samples' token distributions are compared with a chi-square test of
homogeneity (categories with fewer than 10 samples in both together are pooled). Each position must
have p > 1e-3, so the four tests together raise a false alarm about 0.4 % of the time; the seeds
are fixed, so a given build passes or fails the same way each run. specbeam samples its drafts and
hands vLLM's rejection sampler their probabilities, the path that must stay exact.
"""

from __future__ import annotations

from collections import Counter

import pytest
from scipy.stats import chi2_contingency

from vllm_support import COMMON_FLAGS, completion, read_stats, require_vllm, run_all, token_ids

require_vllm()

from specbeam_vllm.server import Server, spec_metrics, specbeam_flags  # noqa: E402

from model_folders import small_vocab_pair  # noqa: E402

N = 240
PROMPT = [1, 5, 9, 13, 4]
OUT_LEN = 4
TEMPERATURE = 0.8
P_MIN = 1e-3
FLAGS = [("256" if prev == "--max-model-len" else f) for prev, f in zip([None] + COMMON_FLAGS, COMMON_FLAGS)]


def sample_outputs(url: str) -> list[list[int]]:
    def one(seed: int) -> list[int]:
        return token_ids(completion(url, PROMPT, OUT_LEN, TEMPERATURE, seed=seed, ignore_eos=True))

    return run_all(one, range(N), concurrency=8)


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
    stats = str(folder / "stats.json")
    flags = specbeam_flags(pair[1], 3, proposer="specbeam_vllm.proposer.SpecBeamProposer",  # the dotted path works too
                           stats_file=stats, full_draft_max_batch=8, no_draft_min_batch=9)
    with Server(pair[0], flags + FLAGS, log_path=str(folder / "server.log")) as server:
        samples = sample_outputs(server.url)
        return samples, spec_metrics(server.url), read_stats(stats)


def test_samples_are_full_length(spec_off_samples, specbeam_run):
    assert all(len(s) == OUT_LEN for s in spec_off_samples)
    assert all(len(s) == OUT_LEN for s in specbeam_run[0])


def test_drafts_were_sampled_verified_and_accepted(specbeam_run):
    _, metrics, stats = specbeam_run
    assert metrics["draft_tokens"] > 0 and metrics["accepted_tokens"] > 0, metrics
    assert stats["sampled_draft_rows"] > 0, stats  # the draft-probability path ran


@pytest.mark.parametrize("position", range(OUT_LEN))
def test_output_distribution_matches_spec_off(spec_off_samples, specbeam_run, position):
    off = [s[position] for s in spec_off_samples]
    on = [s[position] for s in specbeam_run[0]]
    p = homogeneity_p(off, on)
    assert p > P_MIN, (position, p, Counter(off).most_common(8), Counter(on).most_common(8))


def test_the_check_tells_different_distributions_apart(spec_off_samples):
    """The same test rejects a sample shifted like a mis-tempered one (the check has power)."""
    off = [s[1] for s in spec_off_samples]
    top = Counter(off).most_common(1)[0][0]
    shifted = [t if (t != top or i % 3) else (t + 1) % 32 for i, t in enumerate(off)]  # a third of top moved
    assert homogeneity_p(off, shifted) < P_MIN
