"""specbeam_vllm.beam_search against vLLM's own LLM.beam_search on the demo target (skipped without vLLM).

One ``vllm.LLM`` for the module (start-up costs 20-40 s); every case runs vLLM's loop and the
speculative one on the same engine and compares the returned beams field by field.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm_support import require_vllm  # noqa: E402

require_vllm()  # skips without vLLM (outside CI) or where its compiled kernels cannot run
import vllm  # noqa: E402

from vllm.logprobs import Logprob  # noqa: E402
from vllm.sampling_params import BeamSearchParams  # noqa: E402

from conftest import DEMO_DIR  # noqa: E402
from specbeam_vllm.beam import (  # noqa: E402
    AMBIGUOUS,
    DraftNode,
    PromptSearch,
    SearchConfig,
    SpecBeamStats,
    beam_search,
    count_engine_calls,
    draft_paths,
    sampled_format,
)

TARGET = str(DEMO_DIR / "target")
DRAFT = str(DEMO_DIR / "draft")
PROMPTS = ["def main(", "import os\nclass "]
# longer than one KV block (128 tokens on CPU): scoring requests read its cached blocks
LONG_PROMPT = "import os\nimport sys\n\n" + "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(24))

# (beam_width, max_tokens, length_penalty, ignore_eos)
CASES = [(2, 12, 1.0, False), (4, 12, 1.0, False), (4, 14, 0.5, False), (2, 10, 2.0, True)]
LONG_CASE = (2, 8, 1.0, False)


pytestmark = pytest.mark.slow  # starts vLLM: not in the quick tier (-m "not slow")


@pytest.fixture(scope="module")
def llm():
    engine = vllm.LLM(TARGET, max_model_len=512, enforce_eager=True, dtype="bfloat16", max_num_seqs=64, seed=0)
    yield engine
    del engine


@pytest.fixture(scope="module")
def runs(llm):
    """Per case: (vLLM's outputs, its engine counter, specbeam's outputs, specbeam's stats)."""
    results = {}
    for case in CASES:
        beam_width, max_tokens, length_penalty, ignore_eos = case
        params = BeamSearchParams(
            beam_width=beam_width, max_tokens=max_tokens, length_penalty=length_penalty, ignore_eos=ignore_eos
        )
        with count_engine_calls(llm) as counter:
            ref = llm.beam_search(PROMPTS, params)
        stats = SpecBeamStats()
        out = beam_search(
            llm, PROMPTS, beam_width, max_tokens, DRAFT,
            length_penalty=length_penalty, ignore_eos=ignore_eos, stats=stats,
        )
        results[case] = (ref, counter, out, stats)
    return results


def _assert_same(ref, out, beam_width):
    assert len(out) == len(ref)
    for r, o in zip(ref, out):
        assert len(o.sequences) == len(r.sequences) == beam_width
        for rs, os_ in zip(r.sequences, o.sequences):
            assert os_.tokens == rs.tokens
            assert os_.cum_logprob == pytest.approx(rs.cum_logprob, rel=0, abs=1e-9)
            assert os_.text == rs.text
            # the same top-K list at every step, in the same order (dict equality ignores order)
            assert [list(d.items()) for d in os_.logprobs] == [list(d.items()) for d in rs.logprobs]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-lp{c[2]}-ignore_eos{c[3]}")
def test_same_beams_as_vllm(runs, case):
    ref, _, out, _ = runs[case]
    assert len(out) == len(PROMPTS)
    _assert_same(ref, out, case[0])


def test_long_prompt_reads_prefix_cache(llm):
    """A prompt over one KV block: the scoring requests read its cached blocks (prompt log-probs of
    cached positions are never computed) and the beams still match."""
    beam_width, max_tokens, length_penalty, ignore_eos = LONG_CASE
    prompts = [LONG_PROMPT, "def main("]
    assert len(llm.get_tokenizer()(LONG_PROMPT)["input_ids"]) > 140
    with count_engine_calls(llm) as counter:
        ref = llm.beam_search(prompts, BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens))
    stats = SpecBeamStats()
    out = beam_search(llm, prompts, beam_width, max_tokens, DRAFT, stats=stats)
    _assert_same(ref, out, beam_width)
    assert stats.cached_tokens > 0
    assert stats.engine_calls < counter.calls


def test_same_beams_through_top_ties(llm):
    """More prompts and steps, so that scored prefixes with a tie at the top occur (bf16 logits tie
    often): their greedy pick comes from the tie rule, and the beams still match."""
    prompts = PROMPTS + ["    for i in range(", "# Copyright", "def parse_args(argv):", "class Config:"]
    ref = llm.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=24))
    stats = SpecBeamStats()
    out = beam_search(llm, prompts, 4, 24, DRAFT, stats=stats)
    _assert_same(ref, out, 4)
    assert stats.top_ties > 0
    assert stats.plain_steps == 0  # every tie was resolved, none forced an ordinary step


def test_eos_finishes_beams(runs, llm):
    """The EOS path is exercised: a returned beam of vLLM's own search ends in EOS (so finished beams
    were compared above); with ``ignore_eos`` every returned beam runs all ``max_tokens`` steps."""
    eos = llm.get_tokenizer().eos_token_id
    ref = runs[(4, 12, 1.0, False)][0]
    assert any(s.tokens[-1] == eos for r in ref for s in r.sequences)
    for r in runs[(2, 10, 2.0, True)][0]:
        assert all(len(s.tokens) == len(r.sequences[0].tokens) for s in r.sequences)  # nobody finished early


def test_fewer_engine_calls(runs):
    for case, (_, counter, _, stats) in runs.items():
        assert counter.calls == case[1]  # vLLM: one engine call per beam step
        assert stats.engine_calls == stats.passes
        assert stats.engine_calls < counter.calls, (case, stats)
        assert stats.beam_steps == case[1] * len(PROMPTS)  # every prompt ran max_tokens steps (none ran dry)


def test_counter_restores_engine(llm):
    with count_engine_calls(llm) as counter:
        llm.generate(["x = "], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
        with count_engine_calls(llm) as inner:
            llm.generate(["y = "], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
        llm.generate(["z = "], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
    assert inner.calls == 1 and inner.steps >= 1
    assert counter.calls == 3 and counter.steps >= 3
    assert "_run_engine" not in vars(llm) and "step" not in vars(llm.llm_engine)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=PROMPTS, beam_width=0), "beam_width"),
        (dict(prompts=PROMPTS, beam_width=-2), "beam_width"),
        (dict(prompts=[""], beam_width=2), "empty prompt"),
        (dict(prompts=[{"prompt_token_ids": []}], beam_width=2), "empty prompt"),
        (dict(prompts=[], beam_width=2), "prompts is empty"),
        (dict(prompts=PROMPTS, beam_width=2, max_tokens=0), "max_tokens"),
        (dict(prompts=PROMPTS, beam_width=2, temperature=0.7), "temperature"),
        (dict(prompts=PROMPTS, beam_width=2, draft=""), "draft"),
    ],
)
def test_bad_input(llm, kwargs, message):
    kwargs = {"max_tokens": 4, "draft": DRAFT, **kwargs}
    with pytest.raises(ValueError, match=message):
        beam_search(llm, **kwargs)


@pytest.fixture(scope="module")
def resized_drafts(tmp_path_factory):
    """The demo draft with its embedding cut to 4000 rows and grown to 4160 (the target has 4096), each
    saved with the demo tokenizer, and the smaller one once more without a tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("resized_drafts")
    tokenizer = AutoTokenizer.from_pretrained(DRAFT)
    paths = {}
    for name, rows, with_tokenizer in (("smaller", 4000, True), ("larger", 4160, True), ("no_tokenizer", 4000, False)):
        model = AutoModelForCausalLM.from_pretrained(DRAFT, dtype=torch.float32)
        model.resize_token_embeddings(rows, mean_resizing=False)
        model.save_pretrained(root / name)
        if with_tokenizer:
            tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_draft_with_a_padded_embedding(llm, resized_drafts):
    """One tokenizer, embeddings of other sizes (Qwen2.5 0.5B-7B against 14B+): the draft's log-probs
    are cut or padded with -inf to the target's 4096 ids, ids past its embedding read as id 0, and the
    beams are vLLM's; without the tokenizer to show they are the same vocabulary, an error says so."""
    params = BeamSearchParams(beam_width=2, max_tokens=10)
    ref = llm.beam_search(PROMPTS, params)
    for name in ("smaller", "larger"):
        stats = SpecBeamStats()
        out = beam_search(llm, PROMPTS, 2, 10, resized_drafts[name], stats=stats)
        _assert_same(ref, out, 2)
        assert stats.engine_calls < 10  # vLLM makes one engine call per beam step: the draft still covers steps
    with pytest.raises(ValueError, match="vocabulary of 4000 tokens but the target has 4096"):
        beam_search(llm, PROMPTS, 2, 4, resized_drafts["no_tokenizer"])


def _prompt_list(entries: list[tuple[int, float, int]]) -> dict:
    """A prompt-log-prob dict as vLLM builds it: the prompt token first (its entry overwritten by its
    top-K entry when it is in the top-K)."""
    return {tok: Logprob(logprob=lp, rank=rank, decoded_token=None) for tok, lp, rank in entries}


def test_sampled_format_rebuilds_rank_order():
    # prompt token 7 at rank 2, listed first; a greedy sample list has the argmax (rank 1) first
    lst = sampled_format(_prompt_list([(7, -1.5, 2), (3, -0.5, 1), (7, -1.5, 2), (9, -2.0, 3)]), 3)
    assert list(lst) == [3, 7, 9]
    assert [v.rank for v in lst.values()] == [1, 2, 3]
    # a prompt token outside the top-K is dropped
    lst = sampled_format(_prompt_list([(11, -9.0, 40), (3, -0.5, 1), (7, -1.5, 2)]), 2)
    assert list(lst) == [3, 7]


def test_sampled_format_top_ties():
    tie = _prompt_list([(9, -2.0, 3), (7, -0.7, 1), (3, -0.7, 2)])
    assert sampled_format(tie, 3) is AMBIGUOUS
    lst = sampled_format(tie, 3, resolve_top_ties=True)  # the lowest tied id is the greedy pick
    assert list(lst) == [3, 7, 9] and [v.rank for v in lst.values()] == [2, 1, 3]
    all_tied = _prompt_list([(3, -0.7, 1), (7, -0.7, 2)])  # more tied tokens may lie past the list
    assert sampled_format(all_tied, 2, resolve_top_ties=True) is AMBIGUOUS
    assert sampled_format(_prompt_list([(3, -0.7, 1), (7, -0.9, 2)]), 3) is AMBIGUOUS  # short list


def test_greedy_kernel_picks_first_maximum():
    """What ``resolve_top_ties`` relies on: vLLM's CPU greedy kernel returns the first maximum."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # the wheel's build for this CPU (AVX-512 or AVX2), as vLLM's worker loads it

    logits = torch.zeros(3, 4096)  # [rows, vocab]
    logits[0, [100, 4000]] = 1.0
    logits[1, [4095, 17, 18]] = 2.0
    logits[2, 5] = 3.0
    greedy = getattr(torch.ops._C, "greedy_argmax", None)
    if greedy is None:
        pytest.skip("no CPU greedy kernel in this vLLM build")
    assert greedy(logits).tolist() == [100, 17, 5]


class _FixedDraft:
    """A draft whose next-token log-probs depend only on the last token: ``t -> t + 1`` likeliest."""

    vocab = 16
    forward_count = 0

    def next_log_probs(self, seqs):
        logits = torch.zeros(len(seqs), self.vocab)  # [N, vocab]
        for i, s in enumerate(seqs):
            logits[i, (s[-1] + 1) % self.vocab] = 4.0
            logits[i, (s[-1] + 2) % self.vocab] = 2.0
        return torch.log_softmax(logits, dim=-1)


def test_draft_paths_cover_every_running_beam():
    from vllm.entrypoints.generate.beam_search.utils import BeamSearchInstance, create_sort_beams_key_function

    cfg = SearchConfig(2, 8, False, 1.0, 0, create_sort_beams_key_function(0, 1.0))
    search = PromptSearch(BeamSearchInstance({"type": "token", "prompt_token_ids": [5, 6]}))
    (paths,) = draft_paths(_FixedDraft(), [search], [3], cfg, draft_width=2)
    assert all(len(p) <= 2 + 3 for p in paths)
    assert (5, 6, 7, 8, 9) in paths  # the draft's greedy path, three levels deep
    assert all(p[:2] == (5, 6) for p in paths)
    # depth 0 is an ordinary step: the running beams themselves
    assert draft_paths(_FixedDraft(), [search], [0], cfg, draft_width=2) == [[(5, 6)]]
    assert DraftNode((1,), 0.0).has_child is False
