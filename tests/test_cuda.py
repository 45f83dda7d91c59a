"""The demo pair on a CUDA device: the same exactness checks as on the CPU, with the models, their
paged KV pools and HF's reference all on the GPU.

The engine keeps its bookkeeping, verification and sampling on the host; models run on their own
device (the pools live there too, indexed with device copies of the slot tables) and hand their
logits back once per forward. Skipped where torch sees no CUDA device (CI has none); run on a GPU
machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

import specbeam_hf
from conftest import assert_pools_free
from test_beam_search import assert_same_beams
from test_bf16 import assert_equal_up_to_near_ties
from test_demo_pair import PROMPTS
from test_demo_pair import load as load_on  # the demo pair as users load it
from test_model_families import WINDOW, build, check_greedy_and_beams, perturbed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def load(dtype):
    return load_on(dtype, "cuda")


@pytest.fixture(scope="module")
def demo_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (HF's reference runs the same way)
    torch.backends.cudnn.allow_tf32 = False
    return load(torch.float32)


@pytest.mark.parametrize(
    "options", [dict(), dict(drafter="draft_tree", tree_width=3)], ids=["chain", "tree"]
)
@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["batch1", "batch4"])
def test_cuda_greedy_equals_hf(demo_fp32, prompts, options):
    tok, target, draft = demo_fp32
    enc = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(**enc, max_new_tokens=40, do_sample=False)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4, **options)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert out.device.type == "cuda"
    assert torch.equal(out, ref), tok.batch_decode(out)
    target_cache = assistant.engine_for(target).target_cache
    assert target_cache.device.type == "cuda" and target_cache.keys[0].is_cuda
    assert assistant.last_stats.mean_accepted_length > 1.3, assistant.last_stats.summary()
    assert_pools_free(target_cache, assistant.drafter.cache)


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS[1:3]], ids=["batch1", "batch2"])
def test_cuda_beam_search_equals_hf(demo_fp32, prompts, num_beams):
    tok, target, draft = demo_fp32
    enc = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(**enc, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=32,
                  do_sample=False, length_penalty=0.8, return_dict_in_generate=True, output_scores=True)
    ref = target.generate(**kwargs)
    # a fixed draft depth: every pass verifies trees on the GPU (the adaptive default may pick depth 0 there)
    assistant = specbeam_hf.SpecBeam(draft, beam_adaptive=False)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert out.sequences.device.type == "cuda"
    assert_same_beams(ref, out)
    assert assistant.last_beam_stats.steps_per_target_forward > 1.0
    assert_pools_free(assistant.beam_searcher_for(target).cache, assistant._beam_drafter.cache)


def test_cuda_sampling_is_seeded_and_valid(demo_fp32):
    tok, target, draft = demo_fp32
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True).to("cuda")
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(target.generate(**enc, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.95,
                                    custom_generate=specbeam_hf.generate, assistant=assistant))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape[1] > enc["input_ids"].shape[1]
    assert int(outs[0].max()) < target.config.vocab_size
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


def test_cuda_bf16_greedy_up_to_near_ties():
    tok, target, draft = load(torch.bfloat16)
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    width = enc["input_ids"].shape[1]
    kwargs = dict(**enc, max_new_tokens=40, do_sample=False)
    ref = target.generate(return_dict_in_generate=True, output_scores=True, **kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    report = assert_equal_up_to_near_ties(out, ref, width, target=target, attention_mask=enc["attention_mask"])
    assert report.positions == 40 * len(PROMPTS)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


@pytest.mark.parametrize("model_type, window", [("mistral", WINDOW), ("gemma2", WINDOW), ("falcon", None)])
def test_cuda_sliding_window_and_multi_query(demo_fp32, model_type, window):
    target = build(model_type, sliding_window=window).to("cuda")
    check_greedy_and_beams(target, perturbed(target), device="cuda")
