"""Exactness across transformers model families, including ones whose attention differs from llama's.

Tiny random models built from each family's own config class (``AutoConfig.for_model``): greedy and
beam search through specbeam must equal the model's own ``generate``. Covered besides the llama,
gpt2, opt and qwen2 of the other tests: multi-query attention (Falcon, GPTBigCode; the KV shapes
are read from the model, not from config names), partial rotary (Phi, GPT-J, CodeGen), MoE
(Mixtral, Qwen3-MoE, gpt-oss), multi-head latent attention (DeepSeek V3: keys and values of
different widths), and **sliding-window attention** (Mistral, Qwen2 with ``use_sliding_window``,
Gemma 2/3, Cohere 2, gpt-oss), where prompts plus new tokens run past a window of 5 so that the
window changes the model's own output (checked) and a mask without it would be wrong. ALiBi models
(Bloom) are refused with a message naming why.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import specbeam_hf
from conftest import assert_pools_free

SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    initializer_range=0.1, n_positions=128, n_inner=64, rotary_dim=4, partial_rotary_factor=0.5,
    num_local_experts=4, num_experts=4, num_experts_per_tok=2,
    # multi-head latent attention (DeepSeek V2/V3): keys and values of different widths
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6, kv_lora_rank=16, q_lora_rank=16, moe_intermediate_size=32,
    n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
)
WINDOW = 5


def build(model_type: str, sliding_window: int | None = None, seed: int = 0):
    """A 2-layer model of ``model_type`` (float32); ``sliding_window`` makes its first layer (or, for
    families without layer types, every layer) attend to the last ``sliding_window`` positions only."""
    config = AutoConfig.for_model(model_type)
    for key, value in SIZES.items():
        if hasattr(config, key) or key in getattr(config, "attribute_map", {}):
            try:
                setattr(config, key, value)
            except AttributeError:  # derived in this family (Falcon's head_dim = hidden_size / heads)
                pass
    if model_type.startswith("deepseek"):  # its attention has as many KV heads as query heads
        config.num_key_value_heads = config.num_attention_heads
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["sliding_attention", "full_attention"] if sliding_window else ["full_attention"] * 2
    if sliding_window:
        config.sliding_window = sliding_window
        if hasattr(config, "use_sliding_window"):
            config.use_sliding_window, config.max_window_layers = True, 0
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def perturbed(model, noise: float = 0.005):
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(noise * torch.randn(param.shape, generator=gen).to(param.device))
    return draft


IDS = torch.tensor([[0, 0, 5, 7, 9, 11, 13], [3, 4, 5, 6, 7, 8, 9]])  # [2, 7], row 0 left-padded
MASK = (IDS != 0).long()


def check_greedy_and_beams(target, draft, device: str = "cpu", **options):
    kwargs = dict(input_ids=IDS.to(device), attention_mask=MASK.to(device), max_new_tokens=14, do_sample=False, pad_token_id=0)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, **options)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out, ref)
    assert assistant.last_stats.mean_accepted_length > 1.0  # the drafts were used, not only the target
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)

    beam = dict(kwargs, num_beams=3, num_return_sequences=3, return_dict_in_generate=True, output_scores=True)
    ref_beams = target.generate(**beam)
    beam_assistant = specbeam_hf.SpecBeam(draft, beam_adaptive=False)
    out_beams = target.generate(custom_generate=specbeam_hf.generate, assistant=beam_assistant, **beam)
    assert torch.equal(out_beams.sequences, ref_beams.sequences)
    torch.testing.assert_close(out_beams.sequences_scores, ref_beams.sequences_scores, atol=1e-4, rtol=0)
    assert_pools_free(beam_assistant.beam_searcher_for(target).cache, beam_assistant._beam_drafter.cache)
    return ref, ref_beams.sequences


@pytest.mark.parametrize(
    "model_type",
    ["falcon", "gpt_bigcode", "gemma", "phi", "phi3", "gpt_neox", "gptj", "codegen", "mixtral", "starcoder2", "olmo2", "cohere",
     "deepseek_v3", "qwen3_moe", "glm4", "smollm3"],
)
def test_family_equals_its_own_generate(model_type):
    target = build(model_type)
    check_greedy_and_beams(target, perturbed(target))


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma2", "gemma3_text", "cohere2", "gpt_oss"])
def test_sliding_window_equals_its_own_generate(model_type):
    target = build(model_type, sliding_window=WINDOW)
    greedy, beams = check_greedy_and_beams(target, perturbed(target))
    # the window really shapes these outputs: the same weights attending to everything give others
    unwindowed = copy.deepcopy(target)
    unwindowed.config.sliding_window = 1000
    for module in unwindowed.modules():
        if getattr(module, "sliding_window", None):
            module.sliding_window = 1000
    kwargs = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert not (torch.equal(unwindowed.generate(**kwargs), greedy)
                and torch.equal(unwindowed.generate(**kwargs, num_beams=3, num_return_sequences=3), beams))


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_token_trees(model_type):
    """Tree nodes sit at position cached + depth, not at their index in the pass: the window is
    measured in positions."""
    target = build(model_type, sliding_window=WINDOW)
    draft = perturbed(target)
    kwargs = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=14, do_sample=False, pad_token_id=0)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, drafter="draft_tree", tree_width=3)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out, ref)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


def test_alibi_model_is_refused_with_a_reason():
    target = build("bloom")
    with pytest.raises(ValueError, match="ALiBi"):
        target.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0,
                        custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(perturbed(target)))


def test_kv_shapes_are_read_from_the_model():
    """Falcon's config names its KV heads differently (and multi-query means one): the pool follows
    what the attention layers actually write."""
    target = build("falcon")
    runner = specbeam_hf.HFCausalLM(target)
    assert runner.num_kv_heads == 1 and runner.head_dim == 8 and runner.num_layers == 2


def test_latent_attention_keys_and_values_of_different_widths():
    """DeepSeek V3's attention writes keys and values of different widths: the pool keeps both."""
    runner = specbeam_hf.HFCausalLM(build("deepseek_v3"))
    assert runner.value_head_dim != runner.head_dim
    cache = runner.make_cache(4, 4)
    assert cache.keys[0].shape[-1] == runner.head_dim and cache.values[0].shape[-1] == runner.value_head_dim
