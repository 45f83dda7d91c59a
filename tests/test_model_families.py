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
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import specbeam_hf
from conftest import assert_pools_free
from specbeam_core import TokenTree, build_kv_batch, build_packed_kv_batch, forward_rows, pack_is_cheaper

SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    initializer_range=0.6, n_positions=128, n_inner=64, rotary_dim=4, partial_rotary_factor=0.5,
    num_local_experts=4, num_experts=4, num_experts_per_tok=2,
    # multi-head latent attention (DeepSeek V2/V3): keys and values of different widths
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6, kv_lora_rank=16, q_lora_rank=16, moe_intermediate_size=32,
    n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
)
WINDOW = 5
# at initializer_range 0.1 many of these tiny models repeat one token (``[13] * 14``), where a
# position bug would hide; 0.6 makes their outputs vary, except where a family needs more:
TWEAKS = {
    "gptj": dict(initializer_range=0.1),  # at 0.6 it falls into a 2-token loop
    # tied embeddings scaled by sqrt(hidden): the last prompt token dominates and repeats forever
    "gemma2": dict(tie_word_embeddings=False),
    "gemma3_text": dict(tie_word_embeddings=False),
}
MIN_DISTINCT = 5  # distinct tokens each compared row's new tokens must hold (14 new tokens here)


pytestmark = pytest.mark.slow  # many model families, minutes: not in the quick tier (-m "not slow")


def assert_varied(sequences: torch.Tensor, width: int, min_distinct: int = MIN_DISTINCT) -> None:
    """Every row's new tokens hold at least ``min_distinct`` distinct tokens: degenerate text (one
    token repeated) cannot stand in for a comparison."""
    for row, seq in enumerate(sequences[:, width:].tolist()):
        assert len(set(seq)) >= min_distinct, f"row {row} is degenerate ({len(set(seq))} distinct tokens): {seq}"


def build(model_type: str, sliding_window: int | None = None, seed: int = 0, init: float | None = None):
    """A 2-layer model of ``model_type`` (float32); ``sliding_window`` makes its first layer (or, for
    families without layer types, every layer) attend to the last ``sliding_window`` positions only.
    ``init``: another initializer_range (the logit-level tests, whose 1e-5 tolerance is for logits of
    the 0.1 scale)."""
    config = AutoConfig.for_model(model_type)
    tweaks = dict(TWEAKS.get(model_type, {}), **({} if init is None else {"initializer_range": init}))
    for key, value in {**SIZES, **tweaks}.items():
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


def check_greedy_and_beams(target, draft, device: str = "cpu", drafts_agree: bool = True, **options):
    kwargs = dict(input_ids=IDS.to(device), attention_mask=MASK.to(device), max_new_tokens=14, do_sample=False, pad_token_id=0)
    ref = target.generate(**kwargs)
    assert_varied(ref.cpu(), IDS.shape[1])
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, **options)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out, ref)
    if drafts_agree:
        assert assistant.last_stats.mean_accepted_length > 1.0  # the drafts were used, not only the target
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)

    beam = dict(kwargs, num_beams=3, num_return_sequences=3, return_dict_in_generate=True, output_scores=True)
    ref_beams = target.generate(**beam)
    assert_varied(ref_beams.sequences.cpu(), IDS.shape[1])
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


@pytest.mark.parametrize(
    "target_type, draft_type", [("gpt_neox", "gemma2"), ("llama", "gpt2"), ("qwen2", "falcon"), ("phi", "mistral")]
)
def test_draft_of_another_family(target_type, draft_type):
    """The draft need only share the vocabulary: another family, with its own KV shapes (Falcon's
    one KV head, GPT-2's learned positions, Gemma 2's window) in its own pool. An unrelated random
    draft is rejected nearly everywhere, so this exercises the recovered tokens of every step."""
    target, draft = build(target_type), build(draft_type, seed=3, sliding_window=WINDOW if draft_type == "gemma2" else None)
    assert type(draft).__name__ != type(target).__name__
    check_greedy_and_beams(target, draft, drafts_agree=False)
    check_greedy_and_beams(target, draft, drafts_agree=False, drafter="draft_tree", tree_width=3)


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


CHUNK = 6


def chunked_llama4(chunk: int = CHUNK):
    """Llama 4's text model: a chunked-attention layer (RoPE; each query sees only the keys of its own
    ``chunk``-position chunk) and a full-attention layer (no RoPE), with mixture-of-experts MLPs."""
    config = AutoConfig.for_model(
        "llama4_text", vocab_size=96, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=None, num_local_experts=4, num_experts_per_tok=1, initializer_range=0.6,
        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0], attention_chunk_size=chunk,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_chunked_attention_equals_its_own_generate():
    """Prompts plus 14 new tokens span four chunks of 6 positions, chunk boundaries fall inside draft
    chains, trees and beam trees, and the outputs are HF's; the chunks really shape them (the same
    weights with one chunk over everything give others)."""
    target = chunked_llama4()
    greedy, beams = check_greedy_and_beams(target, perturbed(target))
    unchunked = chunked_llama4(chunk=1000)
    kwargs = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert not (torch.equal(unchunked.generate(**kwargs), greedy)
                and torch.equal(unchunked.generate(**kwargs, num_beams=3, num_return_sequences=3), beams))
    assistant = specbeam_hf.SpecBeam(perturbed(target), num_draft_tokens=4, drafter="draft_tree", tree_width=3)
    assert torch.equal(target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant), greedy)


def gemma4(num_kv_shared_layers: int):
    """Gemma 4's text model: sliding layers with 8-wide heads, global layers with 16-wide heads (the
    pool holds each layer's own shape), and optionally its last layers reading the K/V of earlier
    layers of their type instead of caching their own (KV sharing, as Gemma 4's small models do)."""
    config = AutoConfig.for_model(
        "gemma4_text", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=None, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=num_kv_shared_layers, hidden_size_per_layer_input=8, vocab_size_per_layer_input=96,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Gemma 4's own init gives near-constant outputs at this size
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("num_kv_shared_layers", [0, 2])
def test_layers_caching_keys_of_different_shapes(num_kv_shared_layers):
    """Each layer's pool has the shape that layer writes (2 KV heads of 8, or of 16 in the global
    layers; none for a layer that reads another layer's K/V), and greedy chains, trees and beams
    equal Gemma 4's own generate (before, such models were refused)."""
    target = gemma4(num_kv_shared_layers)
    runner = specbeam_hf.HFCausalLM(target)
    expected = [(2, 8, 8), (2, 16, 16)] * 2
    for layer in range(4 - num_kv_shared_layers, 4):
        expected[layer] = (0, 8, 8)
    cache = runner.make_cache(4, 4)
    assert [(k.shape[0], k.shape[-1], v.shape[-1]) for k, v in zip(cache.keys, cache.values)] == expected
    check_greedy_and_beams(target, perturbed(target, noise=0.02))
    assistant = specbeam_hf.SpecBeam(perturbed(target, noise=0.02), num_draft_tokens=4, drafter="draft_tree", tree_width=3)
    kwargs = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert torch.equal(target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant), target.generate(**kwargs))


HOLED = MASK.clone()
HOLED[1, 2:4] = 0  # row 1: two tokens masked inside the prompt, not padding


class BoostColumn(LogitsProcessor):
    """Adds 5 to the logit of the token in column ``column`` of each row's ``input_ids``."""

    def __init__(self, column: int) -> None:
        self.column = column

    def __call__(self, input_ids, scores):
        return scores.scatter_add(1, input_ids[:, self.column : self.column + 1], torch.full_like(scores[:, :1], 5.0))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "falcon"])
def test_tokens_masked_inside_a_prompt(model_type):
    """Zeros inside a row's mask: the masked tokens are not attended and the positions count only the
    others (rotary, learned and Falcon's), as in HF ``generate``; logits processors still see the
    masked tokens in their columns (a processor reading column 2, masked in row 1)."""
    target = build(model_type)
    draft = perturbed(target)
    for extra in ({}, dict(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)):
        kwargs = dict(input_ids=IDS, attention_mask=HOLED, max_new_tokens=10, do_sample=False, pad_token_id=0,
                      repetition_penalty=2.0, logits_processor=LogitsProcessorList([BoostColumn(2)]), **extra)
        ref = target.generate(**kwargs)
        assert_varied(ref.sequences if extra else ref, IDS.shape[1])
        out = target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))
        if extra:
            assert torch.equal(out.sequences, ref.sequences)
            torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)
        else:
            assert torch.equal(out, ref)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "llama4_text"])
def test_tokens_masked_inside_a_prompt_with_a_sliding_window_are_refused(model_type, num_beams):
    """HF's window spans the last columns, masked ones included; the paged cache holds no masked
    tokens, so a window over it would reach further back than HF's. Refused, naming the fix. Llama 4's
    chunks likewise count columns."""
    target = chunked_llama4() if model_type == "llama4_text" else build(model_type, sliding_window=WINDOW)
    kwargs = dict(input_ids=IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=num_beams)
    assistant = specbeam_hf.SpecBeam(perturbed(target))
    named = "chunks of 6" if model_type == "llama4_text" else "window 5"
    with pytest.raises(ValueError, match=rf"row 1 has zeros inside the prompt .*{named}.*drop the masked tokens"):
        target.generate(**kwargs, attention_mask=HOLED, custom_generate=specbeam_hf.generate, assistant=assistant)
    out = target.generate(**kwargs, attention_mask=MASK, custom_generate=specbeam_hf.generate, assistant=assistant)
    assert torch.equal(out, target.generate(**kwargs, attention_mask=MASK))  # left padding alone is fine


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_token_trees(model_type):
    """Tree nodes sit at position cached + depth, not at their index in the pass: the window is
    measured in positions."""
    target = build(model_type, sliding_window=WINDOW)
    draft = perturbed(target)
    kwargs = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=14, do_sample=False, pad_token_id=0)
    ref = target.generate(**kwargs)
    assert_varied(ref, IDS.shape[1])
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, drafter="draft_tree", tree_width=3)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out, ref)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama"])
def test_up_to_the_last_position(model_type):
    """Prompt + new tokens = the position limit exactly: no draft chain, tree or beam-search tree may
    put a node past it (GPT-2 and OPT have no embedding there), and the outputs are HF's; one more
    token is refused with a message naming the limit."""
    target = build(model_type)
    draft = perturbed(target)
    limit = target.config.max_position_embeddings
    ids = torch.randint(2, 96, (2, limit - 28), generator=torch.Generator().manual_seed(0))  # [2, 100]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=28, do_sample=False, pad_token_id=0)
    for beams, options in [(1, dict(num_draft_tokens=5)), (1, dict(num_draft_tokens=5, drafter="draft_tree")),
                           (4, dict(beam_depth=4, beam_candidates=8, beam_adaptive=False)), (4, dict(beam_depth=3))]:
        ref = target.generate(**kwargs, num_beams=beams)
        assert_varied(ref, ids.shape[1])
        out = target.generate(**kwargs, num_beams=beams, custom_generate=specbeam_hf.generate,
                              assistant=specbeam_hf.SpecBeam(draft, **options))
        assert torch.equal(out, ref), (beams, options)
    with pytest.raises(ValueError, match=f"position limit of {limit}"):
        target.generate(**dict(kwargs, max_new_tokens=29), num_beams=4, custom_generate=specbeam_hf.generate,
                        assistant=specbeam_hf.SpecBeam(draft))


ORIGINAL = 16  # original_max_position_embeddings of the longrope model below


def longrope_phi3():
    """Phi-3 with longrope, as Phi-3 / 3.5 128k have it: short RoPE factors while the sequence is at
    most ORIGINAL tokens long, long ones (here 4x the short) past it."""
    config = AutoConfig.for_model(
        "phi3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=ORIGINAL, pad_token_id=0,
        bos_token_id=1, eos_token_id=None, initializer_range=0.1,
    )
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                              "long_factor": [4.0] * 4, "original_max_position_embeddings": ORIGINAL, "partial_rotary_factor": 1.0}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_longrope_past_its_original_length_equals_its_own_generate():
    """The batch's padded input is past ORIGINAL, so HF uses the long factors at every step, for every
    row. Row 1's first greedy token is the EOS id, so it stops at once, and row 0 (6 real tokens) runs
    on alone at positions below ORIGINAL. A forward left to choose would take the short factors there,
    and greedy rows differed from HF's before specbeam pinned the frequencies for the call. Afterwards
    the rotary embedding is as it was (its short frequencies back), so the model's own generate is unchanged."""
    target = longrope_phi3()
    draft = perturbed(target)
    rotary = target.model.rotary_emb
    short = rotary.original_inv_freq.clone()
    ids = torch.randint(2, 96, (2, 20), generator=torch.Generator().manual_seed(3))  # [2, 20]
    mask = torch.ones_like(ids)
    ids[0, :14], mask[0, :14] = 0, 0
    eos = int(target.generate(input_ids=ids[1:], max_new_tokens=1, do_sample=False)[0, -1])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=eos)
    for beams, options in [(1, dict(num_draft_tokens=3)), (1, dict(num_draft_tokens=3, drafter="draft_tree")),
                           (3, dict(beam_adaptive=False))]:
        ref = target.generate(**kwargs, num_beams=beams)
        if beams == 1:  # the case described: row 1 done at its first token, row 0 running on
            assert ref[1, 20] == eos and (ref[0, 20:28] != eos).all()
        assistant = specbeam_hf.SpecBeam(draft, **options)
        out = target.generate(**kwargs, num_beams=beams, custom_generate=specbeam_hf.generate, assistant=assistant)
        assert torch.equal(out, ref), (beams, options)
        assert assistant.kv_blocks_in_use() == 0
        assert torch.equal(rotary.original_inv_freq, short)
        assert torch.equal(target.generate(**kwargs, num_beams=beams), ref)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_longrope_call_that_would_cross_its_original_length_is_refused(num_beams):
    """HF switches a longrope model to its long factors at the step where the sequence passes ORIGINAL
    tokens, and recomputes every cached position there (before this check, specbeam's outputs differed
    from HF's for such a call). specbeam refuses the call up front, naming the limit and what to do.
    A call whose last forward sees exactly ORIGINAL tokens uses the short factors throughout, and
    equals HF."""
    target = longrope_phi3()
    assistant = specbeam_hf.SpecBeam(perturbed(target), num_draft_tokens=3, beam_adaptive=False)
    ids = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(4))  # [1, 12]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, num_beams=num_beams)
    ref = target.generate(**kwargs, max_new_tokens=ORIGINAL + 1 - 12)
    out = target.generate(**kwargs, max_new_tokens=ORIGINAL + 1 - 12, custom_generate=specbeam_hf.generate, assistant=assistant)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match=f"original_max_position_embeddings = {ORIGINAL} tokens.*max_length <= {ORIGINAL + 1}"):
        target.generate(**kwargs, max_new_tokens=ORIGINAL + 2 - 12, custom_generate=specbeam_hf.generate, assistant=assistant)
    assert assistant.kv_blocks_in_use() == 0


def test_alibi_model_is_refused_with_a_reason():
    target = build("bloom")
    with pytest.raises(ValueError, match="ALiBi"):
        target.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0,
                        custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(perturbed(target)))


def test_gpt_neo_is_refused_with_a_reason():
    """GPT-Neo masks by key index inside its attention (a causal table sliced by key count, local
    windows counted in columns), which tree and packed-row layouts do not keep: its beams differed
    from HF's before this refusal."""
    config = AutoConfig.for_model("gpt_neo", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, window_size=5,
                                  attention_types=[[["global", "local"], 1]], max_position_embeddings=128, intermediate_size=64)
    target = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="GPTNeoForCausalLM masks attention by key index"):
        target.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2,
                        custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(perturbed(target)))


def test_model_that_cannot_take_gathered_keys_is_refused_up_front():
    """GPT-NeoX-Japanese reshapes the keys its cache returns with ``view``, which the pool's gather of
    several rows does not allow: it failed mid-generation with a RuntimeError about view sizes. The
    construction probe hands keys back laid out as that gather, so the model is refused up front."""
    config = AutoConfig.for_model("gpt_neox_japanese", vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_multiple_size=2, max_position_embeddings=128)
    target = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="GPTNeoXJapaneseForCausalLM cannot run on specbeam's paged KV cache.*view"):
        specbeam_hf.HFCausalLM(target)


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


@pytest.mark.parametrize(
    "model_type, window", [("llama", None), ("gpt2", None), ("mistral", WINDOW), ("gemma2", WINDOW), ("qwen2", WINDOW)]
)
def test_packed_rows_equal_plain_forward(model_type, window):
    """Ragged rows packed into one row (build_packed_kv_batch: a tree after unseen tokens, a chain,
    a tree with no unseen token; different cached lengths): every needed logit equals a plain HF
    forward of that row's prefix, sliding windows included, and the pool returns to its baseline."""
    model = build(model_type, sliding_window=window, init=0.1)
    lm = specbeam_hf.HFCausalLM(model)
    cache = lm.make_cache(64, 4)
    baseline = cache.num_free_blocks
    prompts = [[5, 17, 33, 8, 61, 22, 40, 9], [9, 70, 14, 3, 55], [12, 4, 77, 31, 6, 2, 19, 48, 23, 11, 60]]
    unseen = [[40, 9], [], []]  # row 0's last two prompt tokens are fed with its tree
    seqs = [cache.new_sequence() for _ in prompts]
    for s, p, u in zip(seqs, prompts, unseen):
        done = p[: len(p) - len(u)]
        lm.forward(torch.tensor([done]), build_kv_batch(cache, [s], [len(done)], cache.dtype), 1)
    tree_a = TokenTree(tokens=[10, 11, 12, 12, 10, 15], parents=[-1, -1, 0, 0, 1, 2])
    tree_c = TokenTree(tokens=[7, 7, 30, 44], parents=[-1, 0, 0, 2])
    chain = [44, 12, 80]
    feeds = [unseen[0] + tree_a.tokens, chain, tree_c.tokens]
    t = max(len(f) for f in feeds)
    masks = torch.zeros(3, t, t, dtype=torch.bool)  # [N, T, T] each row's own order
    depths = torch.zeros(3, t, dtype=torch.long)  # [N, T]
    masks[0, : len(feeds[0]), : len(feeds[0])] = tree_a.row_mask(2)
    depths[0, : len(feeds[0])] = tree_a.row_depths(2)
    masks[1, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    depths[1, :3] = torch.arange(3)
    masks[2, :4, :4] = tree_c.row_mask(0)
    depths[2, :4] = tree_c.row_depths(0)
    needed = [len(feeds[0]) - 1, 3, 2]  # row 0: its last unseen token and every node; row 2: its last two nodes
    kv, packed = build_packed_kv_batch(
        cache, seqs, [len(f) for f in feeds], needed, cache.dtype, new_token_mask=masks, new_token_depths=depths
    )
    assert kv.read_slots.shape == (1, sum(len(p) for p in prompts) + len(tree_a) + 3 + len(tree_c))
    logits = lm.forward(packed.tokens(feeds), kv, packed.total_needed)  # [1, sum(needed), vocab]
    rows = packed.split(logits)
    assert [r.shape[0] for r in rows] == needed

    def plain(tokens):
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()  # [vocab]

    expected = [[plain(prompts[0])] + [plain(prompts[0] + list(tree_a.path_tokens(n))) for n in range(len(tree_a))],
                [plain(prompts[1] + chain[: j + 1]) for j in range(3)],
                [plain(prompts[2] + list(tree_c.path_tokens(n))) for n in (2, 3)]]
    for r, (got, want) in enumerate(zip(rows, expected)):
        for j, w in enumerate(want):
            torch.testing.assert_close(got[j].float(), w, atol=1e-5, rtol=0, msg=f"row {r}, logit {j}")
    # the rows' written K/V is their own: continuing row 1 after its chain sees only its own history
    nxt = lm.forward(torch.tensor([[3]]), build_kv_batch(cache, [seqs[1]], [1], cache.dtype), 1)[0, -1]
    torch.testing.assert_close(nxt.float(), plain(prompts[1] + chain + [3]), atol=1e-5, rtol=0)
    for s in seqs:
        cache.free(s)
    assert cache.num_free_blocks == baseline


@pytest.mark.parametrize("model_type, window", [("llama", None), ("mistral", WINDOW)])
def test_packed_rows_read_a_shared_prefix_once(model_type, window):
    """Beams forked from one sequence share its prefix blocks: the packed row reads and attends each
    shared key once (the keys are the distinct cached slots, then the new tokens), and every logit
    still equals a plain HF forward of that beam's own tokens; the pool returns to its baseline."""
    model = build(model_type, sliding_window=window, init=0.1)
    lm = specbeam_hf.HFCausalLM(model)
    cache = lm.make_cache(64, 4)
    baseline = cache.num_free_blocks
    prompt = [5, 17, 33, 8, 61, 22, 40, 9, 70, 14]  # 10 tokens: two full blocks and half of a third
    root = cache.new_sequence()
    lm.forward(torch.tensor([prompt]), build_kv_batch(cache, [root], [len(prompt)], cache.dtype), 1)
    beams = [cache.fork(root) for _ in range(3)]
    cache.free(root)
    own = [[3], [3, 55], [12]]  # each beam's own tokens after the prompt (beam 1 wrote into its copy of block 3)
    for b, toks in zip(beams, own):
        lm.forward(torch.tensor([toks]), build_kv_batch(cache, [b], [len(toks)], cache.dtype), 1)
    tree = TokenTree(tokens=[10, 11, 12, 12], parents=[-1, -1, 0, 1])
    feeds = [tree.tokens, [44, 6], [7]]
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)  # [N, T, T]
    depths = torch.zeros(3, 4, dtype=torch.long)  # [N, T]
    masks[0], depths[0] = tree.row_mask(0), tree.row_depths(0)
    masks[1, :2, :2] = torch.ones(2, 2, dtype=torch.bool).tril()
    depths[1, :2] = torch.arange(2)
    masks[2, 0, 0] = True
    needed = [4, 2, 1]
    num_cached = [cache.length(b) for b in beams]
    # 11 + 12 + 11 cached keys: blocks 1-2 (8 prompt keys) are shared by all three beams; the third block
    # was copied on write by the first two beams to write into it (2 prompt keys + their own), the last
    # beam writes into the original: 8 + (2 + 1) + (2 + 2) + (2 + 1) = 18 distinct keys
    distinct = cache.num_distinct_slots(beams, num_cached)
    assert (num_cached, distinct) == ([11, 12, 11], 18)
    kv, packed = build_packed_kv_batch(
        cache, beams, [len(f) for f in feeds], needed, cache.dtype, new_token_mask=masks, new_token_depths=depths
    )
    assert kv.read_slots.shape == (1, distinct + sum(len(f) for f in feeds))
    rows = packed.split(lm.forward(packed.tokens(feeds), kv, packed.total_needed))

    def plain(tokens):
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()  # [vocab]

    history = [prompt + o for o in own]
    expected = [[plain(history[0] + list(tree.path_tokens(n))) for n in range(len(tree))],
                [plain(history[1] + feeds[1][: j + 1]) for j in range(2)],
                [plain(history[2] + feeds[2])]]
    for r, (got, want) in enumerate(zip(rows, expected)):
        for j, w in enumerate(want):
            torch.testing.assert_close(got[j].float(), w, atol=1e-5, rtol=0, msg=f"row {r}, logit {j}")
    for b in beams:
        cache.free(b)
    assert cache.num_free_blocks == baseline


def test_packed_rows_reject_bad_counts():
    lm = specbeam_hf.HFCausalLM(build("llama"))
    cache = lm.make_cache(8, 4)
    s = cache.new_sequence()
    with pytest.raises(ValueError, match="at least one token"):
        build_packed_kv_batch(cache, [s], [0], [0], cache.dtype)
    with pytest.raises(ValueError, match="num_needed"):
        build_packed_kv_batch(cache, [s], [2], [3], cache.dtype)
    assert cache.length(s) == 0


def test_pack_is_cheaper_weighs_linear_against_attention_work():
    # ragged rows over short contexts: padding wastes linear work -> pack
    assert pack_is_cheaper([20, 20, 20, 20], [25, 3, 2, 1], keys_per_token=2000)
    # the same rows over long contexts: packed queries would attend to every row's keys -> pad
    assert not pack_is_cheaper([16000, 16000, 16000, 16000], [25, 3, 2, 1], keys_per_token=2000)
    # ... unless the rows are beams sharing most of that context, which the packed row reads once -> pack
    assert pack_is_cheaper([16000, 16000, 16000, 16000], [25, 3, 2, 1], keys_per_token=2000, distinct_cached=16300)
    # one token per row (beam search at depth 0) over a long context: padding reads every row's keys, packing
    # reads a shared prefix once -> pack when the rows are beams sharing it, pad when they share nothing
    assert pack_is_cheaper([817] * 4, [1] * 4, keys_per_token=2476, distinct_cached=864)
    assert not pack_is_cheaper([817] * 4, [1] * 4, keys_per_token=2476)
    # rows of equal length: nothing to save -> pad
    assert not pack_is_cheaper([20, 20], [5, 5], keys_per_token=2000)


@pytest.mark.parametrize("model_type, window", [("llama", None), ("mistral", WINDOW)])
def test_forward_rows_padded_and_packed_agree(model_type, window, monkeypatch):
    """forward_rows gives the same per-row logits and leaves the same K/V whichever layout it picks."""
    import specbeam_core.model as core_model

    model = build(model_type, sliding_window=window, init=0.1)
    prompts = [[5, 17, 33, 8, 61, 22, 40, 9], [9, 70, 14, 3, 55]]
    tree = TokenTree(tokens=[10, 11, 12, 12, 10, 15], parents=[-1, -1, 0, 0, 1, 2])
    feeds = [[9] + tree.tokens, [44]]
    masks = torch.zeros(2, 7, 7, dtype=torch.bool)  # [N, T, T]
    depths = torch.zeros(2, 7, dtype=torch.long)  # [N, T]
    masks[0], depths[0] = tree.row_mask(1), tree.row_depths(1)
    masks[1, 0, 0] = True
    needed = [7, 1]
    packs = []
    real = core_model.build_packed_kv_batch
    monkeypatch.setattr(core_model, "build_packed_kv_batch", lambda *a, **k: packs.append(1) or real(*a, **k))
    results = []
    for pack in (True, False):
        monkeypatch.setattr(core_model, "pack_is_cheaper", lambda *a, pack=pack: pack)
        lm = specbeam_hf.HFCausalLM(model)
        cache = lm.make_cache(32, 4)
        seqs = [cache.new_sequence() for _ in prompts]
        for s, p, f in zip(seqs, prompts, feeds):
            done = p[:-1] if f[0] == p[-1] else p
            lm.forward(torch.tensor([done]), build_kv_batch(cache, [s], [len(done)], cache.dtype), 1)
        rows, slots = forward_rows(lm, cache, seqs, feeds, needed, masks, depths)
        assert [r.shape[0] for r in rows] == needed and [len(s) for s in slots] == [len(f) for f in feeds]
        # what was written is each row's own: one more token after row 1's
        nxt = lm.forward(torch.tensor([[3]]), build_kv_batch(cache, [seqs[1]], [1], cache.dtype), 1)[0, -1]
        results.append((rows, nxt))
    assert len(packs) == 1
    (rows_a, nxt_a), (rows_b, nxt_b) = results
    for a, b in zip(rows_a, rows_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(nxt_a, nxt_b, atol=1e-5, rtol=0)
