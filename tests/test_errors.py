"""Bad input fails fast with a ValueError that names the problem, in the core and through HF ``generate``."""

from __future__ import annotations

import pytest
import torch

import specbeam_core
import specbeam_hf
from conftest import assert_pools_free, build_model, make_pair, ragged_batch, skip_for_old_transformers
from specbeam_core import DraftModelDrafter, SamplingParams, SpecEngine
from specbeam_hf import HFCausalLM


def spec(target, assistant, **kwargs):
    return target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)


def pools(assistant, target):
    return assistant.engine_for(target).target_cache, assistant.drafter.cache


def core_engine(target, draft, gamma=3, **kwargs):
    drafter = DraftModelDrafter(HFCausalLM(draft))
    return SpecEngine(HFCausalLM(target), drafter, gamma, **kwargs), drafter


PROMPT = [5, 17, 42, 8, 33]
IDS = torch.tensor([PROMPT])


class BadLogits:
    """A CausalLM whose forward returns ``value`` everywhere (after really running the model)."""

    def __init__(self, inner, value: float) -> None:
        self.inner, self.value = inner, value
        self.vocab_size, self.max_positions = inner.vocab_size, inner.max_positions

    @property
    def forward_count(self):
        return self.inner.forward_count

    def make_cache(self, num_blocks, block_size):
        return self.inner.make_cache(num_blocks, block_size)

    def forward(self, tokens, kv, num_logits):
        return torch.full_like(self.inner.forward(tokens, kv, num_logits), self.value)


def poisoned(model, value: float):
    """The HF model's logits replaced by ``value`` (a forward hook on its output embedding)."""
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: torch.full_like(out, value))
    return model


# ---------------------------------------------------------------------------- vocabularies


def test_vocab_mismatch_core(llama_pair):
    target, _ = llama_pair
    other = build_model("llama", vocab_size=100, seed=3)
    with pytest.raises(ValueError, match="vocabularies differ.*100.*96"):
        core_engine(target, other)


def test_vocab_mismatch_hf(llama_pair):
    target, _ = llama_pair
    other = build_model("llama", vocab_size=100, seed=3)
    with pytest.raises(ValueError, match="vocabularies differ"):
        spec(target, specbeam_hf.SpecBeam(other, num_draft_tokens=3), input_ids=IDS, max_new_tokens=5, do_sample=False)


# ---------------------------------------------------------------------------- prompts


def test_empty_prompt_core(llama_pair):
    engine, drafter = core_engine(*llama_pair)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], max_new_tokens=5)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([PROMPT, []], max_new_tokens=5)  # also when another prompt is fine
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], max_new_tokens=5)
    assert_pools_free(engine.target_cache, drafter.cache)


def test_prompt_token_out_of_range_core(llama_pair):
    engine, _ = core_engine(*llama_pair)
    with pytest.raises(ValueError, match=r"out of range \[0, 96\)"):
        engine.generate([[3, 96]], max_new_tokens=5)
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([[-1, 3]], max_new_tokens=5)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[3, 96]]), r"prompt token ids out of range \[0, 96\): \[96\]"),
        (torch.tensor([[-1, 3]]), r"prompt token ids out of range \[0, 96\): \[-1\]"),
        (torch.tensor([[3.0, 5.0]]), "input_ids must hold integer token ids, got torch.float32"),
        (torch.zeros(0, 4, dtype=torch.long), "empty batch: input_ids has no rows"),
    ],
    ids=["past-vocab", "negative", "float", "no-rows"],
)
def test_bad_input_ids_hf(llama_pair, ids, match, num_beams):
    """What HF's own loop fails on deep inside a forward (IndexError, a dtype error, a reshape of 0
    elements), or for float ids would not even reach: a ValueError naming it, greedy and beams."""
    target, draft = llama_pair
    with pytest.raises(ValueError, match=match):
        spec(target, specbeam_hf.SpecBeam(draft), input_ids=ids, max_new_tokens=4, do_sample=False,
             num_beams=num_beams, pad_token_id=0)


def test_empty_prompt_hf_masked_row(llama_pair):
    target, draft = llama_pair
    ids, mask = ragged_batch([4, 3], seed=40)
    mask[1] = 0
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3)
    with pytest.raises(ValueError, match="empty prompt: row 1"):
        spec(target, assistant, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert_pools_free(*pools(assistant, target))


def test_empty_prompt_hf_zero_width(llama_pair):
    """HF lets a [1, 0] input through to custom_generate; specbeam must refuse it clearly."""
    target, draft = llama_pair
    with pytest.raises(ValueError, match="empty prompt"):
        spec(
            target,
            specbeam_hf.SpecBeam(draft, num_draft_tokens=3),
            input_ids=torch.zeros(1, 0, dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
        )


@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_bad_max_new_tokens_core(llama_pair, bad):
    engine, _ = core_engine(*llama_pair)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([PROMPT], max_new_tokens=bad)


# ---------------------------------------------------------------------------- position limit


@pytest.fixture(scope="module")
def short_pair():
    return make_pair("llama", max_positions=32)


def test_position_limit_core(short_pair):
    engine, drafter = core_engine(*short_pair)
    with pytest.raises(ValueError, match="exceeds the models' position limit of 32"):
        engine.generate([[4] * 10], max_new_tokens=23)
    assert engine.generate([[4] * 10], max_new_tokens=22)[0].num_generated == 22  # exactly at the limit is fine
    assert_pools_free(engine.target_cache, drafter.cache)


def test_position_limit_of_the_draft_counts(llama_pair):
    """A target with 128 positions and a draft with 32: the draft's limit bounds the request."""
    target, _ = llama_pair
    short_draft = build_model("llama", max_positions=32, seed=0)
    engine, _ = core_engine(target, short_draft)
    assert engine.max_positions == 32
    with pytest.raises(ValueError, match="position limit of 32"):
        engine.generate([[4] * 20], max_new_tokens=20)


def test_position_limit_hf(short_pair):
    target, draft = short_pair
    ids, mask = ragged_batch([10, 6], seed=41)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3)
    with pytest.raises(ValueError, match="prompt \\(10 tokens\\).*position limit of 32"):
        spec(target, assistant, input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert_pools_free(*pools(assistant, target))


# ---------------------------------------------------------------------------- draft length


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_draft_tokens_core(llama_pair, bad):
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 1"):
        core_engine(*llama_pair, gamma=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_draft_tokens_hf(llama_pair, bad):
    _, draft = llama_pair
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 1"):
        specbeam_hf.SpecBeam(draft, num_draft_tokens=bad)


class DraftLength:
    def __init__(self, value):
        self.value = value

    @specbeam_core.hookimpl
    def specbeam_draft_length(self, requests, default):
        return self.value


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_draft_length_hook_bad_value_core(llama_pair, bad):
    pm = specbeam_core.get_plugin_manager()
    pm.register(DraftLength(bad))
    engine, drafter = core_engine(*llama_pair, plugin_manager=pm)
    with pytest.raises(ValueError, match="specbeam_draft_length hook"):
        engine.generate([PROMPT], max_new_tokens=5)
    assert_pools_free(engine.target_cache, drafter.cache)


def test_draft_length_hook_bad_value_hf(llama_pair):
    target, draft = llama_pair
    pm = specbeam_core.get_plugin_manager()
    pm.register(DraftLength(-1))
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3, plugin_manager=pm)
    with pytest.raises(ValueError, match="must be an integer >= 0, got -1"):
        spec(target, assistant, input_ids=IDS, max_new_tokens=5, do_sample=False)
    assert_pools_free(*pools(assistant, target))


# ---------------------------------------------------------------------------- NaN / inf logits


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
@pytest.mark.parametrize("side", ["target", "draft"])
def test_bad_logits_core(llama_pair, side, value, word):
    target, draft = HFCausalLM(llama_pair[0]), HFCausalLM(llama_pair[1])
    if side == "target":
        target = BadLogits(target, value)
    else:
        draft = BadLogits(draft, value)
    drafter = DraftModelDrafter(draft)
    engine = SpecEngine(target, drafter, 3)
    with pytest.raises(ValueError, match=f"{side} model logits contain {word}"):
        engine.generate([PROMPT, PROMPT[:3]], max_new_tokens=6)
    assert_pools_free(engine.target_cache, drafter.cache)


@pytest.mark.parametrize("side", ["target", "draft"])
def test_nan_weights_hf(side):
    target, draft = make_pair("llama")
    with torch.no_grad():
        (target if side == "target" else draft).lm_head.weight.fill_(float("nan"))
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3)
    ids, mask = ragged_batch([5, 3], seed=42)
    with pytest.raises(ValueError, match=f"{side} model logits contain NaN"):
        spec(target, assistant, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert_pools_free(*pools(assistant, target))


@pytest.mark.parametrize("side", ["target", "draft"])
def test_inf_logits_hf_sampling(side):
    target, draft = make_pair("llama")
    poisoned(target if side == "target" else draft, float("inf"))
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=3)
    with pytest.raises(ValueError, match=rf"{side} model logits contain \+inf"):
        spec(target, assistant, input_ids=IDS, max_new_tokens=6, do_sample=True, top_k=0)
    assert_pools_free(*pools(assistant, target))


# ---------------------------------------------------------------------------- options


def test_unknown_specbeam_option(llama_pair):
    _, draft = llama_pair
    with pytest.raises(ValueError, match="unknown SpecBeam option.*foo"):
        specbeam_hf.SpecBeam(draft, foo=1)


def test_prompt_lookup_option_needs_a_tree_drafter(llama_pair):
    _, draft = llama_pair
    with pytest.raises(ValueError, match="prompt_lookup=True merges a lookup branch into token trees.*'draft_model'"):
        specbeam_hf.SpecBeam(draft, prompt_lookup=True)
    assert specbeam_hf.SpecBeam(draft, drafter="draft_tree", prompt_lookup=True).drafter.drafters[1].name == "prompt_lookup"


def test_unknown_drafter_name(llama_pair):
    _, draft = llama_pair
    with pytest.raises(ValueError, match="unknown drafter 'nope'; available: draft_model"):
        specbeam_hf.SpecBeam(draft, drafter="nope")
    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        specbeam_core.make_drafter(specbeam_core.get_plugin_manager(), "nope")


def test_draft_model_drafter_without_model():
    """The built-in drafter called without a model: a ValueError, not an AttributeError deep inside.

    Regression (was a library bug): ``SpecBeam()`` (draft_model defaults to None) passes
    ``options={"model": None, ...}``; ``builtin.specbeam_make_drafter`` checks only
    ``"model" not in options``, so ``DraftModelDrafter(None)`` raises
    ``AttributeError: 'NoneType' object has no attribute 'vocab_size'``.
    """
    with pytest.raises(ValueError, match="draft_model drafter needs"):
        specbeam_core.make_drafter(specbeam_core.get_plugin_manager(), "draft_model")  # no model at all: fine
    with pytest.raises(ValueError, match="draft_model drafter needs"):
        specbeam_hf.SpecBeam()


def test_generate_without_assistant(llama_pair):
    target, _ = llama_pair
    with pytest.raises(ValueError, match="needs an assistant"):
        target.generate(custom_generate=specbeam_hf.generate, input_ids=IDS, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature must be a non-negative number"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be a non-negative integer"),
        (dict(top_k=2.5), "top_k"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(do_sample=True, **kwargs)


def test_sampling_params_type_checked_by_engine(llama_pair):
    engine, _ = core_engine(*llama_pair)
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        engine.generate([PROMPT], params=[{"do_sample": True}], max_new_tokens=3)
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        engine.generate([PROMPT, PROMPT], params=[SamplingParams()], max_new_tokens=3)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions"),
        (dict(return_dict_in_generate=True, output_hidden_states=True), "output_hidden_states"),
        (dict(num_beams=2, return_dict_in_generate=True, output_attentions=True), "output_attentions"),
        (dict(guidance_scale=1.5), "guidance_scale"),
        (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5), "group beam search"),
        (dict(num_beams=2, force_words_ids=[[5]]), "constrained beam search"),
    ],
    ids=["attentions", "hidden_states", "beam_attentions", "cfg", "groups", "constraints"],
)
def test_generate_options_it_would_not_reproduce_are_refused(options, named):
    """HF options whose result specbeam would not reproduce (or would silently leave out) are refused
    by name, rather than answered differently (CFG, for one, runs the model inside its processor)."""
    target, draft = make_pair("llama")
    ids, mask = ragged_batch([5, 7])
    with pytest.raises(ValueError, match=named):
        target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                        custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft), **options)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_model_inputs_it_would_not_feed_are_refused(num_beams):
    """GPT-2 reads ``token_type_ids`` (through its token embedding: even all zeros change the output)
    and takes absolute ``position_ids``; HF feeds both to the model at every step, specbeam feeds
    neither, so both are refused by name (they gave other tokens, silently, before). The positions
    HF itself derives from the attention mask, given explicitly, are not refused and give HF's output."""
    target, draft = make_pair("gpt2")
    ids, mask = ragged_batch([5, 7])
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=num_beams)
    assistant = specbeam_hf.SpecBeam(draft)
    shifted = (mask.cumsum(-1) - 1).clamp(min=0) + 3  # [2, 7]
    for extra, named in [(dict(token_type_ids=torch.zeros_like(ids)), "token_type_ids"), (dict(position_ids=shifted), "position_ids")]:
        assert not torch.equal(target.generate(**common, **extra), target.generate(**common))  # HF's output depends on it
        with pytest.raises(ValueError, match=named):
            target.generate(**common, **extra, custom_generate=specbeam_hf.generate, assistant=assistant)
    own = dict(position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    ref = target.generate(**common, **own)
    assert torch.equal(target.generate(**common, **own, custom_generate=specbeam_hf.generate, assistant=assistant), ref)
    assert assistant.kv_blocks_in_use() == 0


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_attention_implementations_without_4d_masks_are_refused(implementation):
    """Flash attention is causal (or unpads from a 2D mask) and would ignore a tree's ancestor-only
    mask; flex attention is not tested here. Either is refused by name, with the fix, before any
    forward; eager and sdpa give HF's output."""
    target, draft = make_pair("llama")
    ids, mask = ragged_batch([5, 7])
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for model in (target, draft):
        model.config._attn_implementation_internal = implementation  # set_attn_implementation needs the kernels installed
        with pytest.raises(ValueError, match=f"attn_implementation='{implementation}'.*set_attn_implementation"):
            target.generate(**common, custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))
        model.config._attn_implementation_internal = "eager"
    assert torch.equal(target.generate(**common, custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft)),
                       target.generate(**common))


@pytest.mark.needs_new_transformers
@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_quantized_kv_cache_is_refused(num_beams):
    """HF's output with a quantized KV cache is that of rounded keys and values; specbeam's would be the
    unquantized one, so it refuses rather than differ."""
    from transformers import GenerationConfig

    target, draft = make_pair("llama")
    ids, mask = ragged_batch([5, 7])
    config = GenerationConfig(cache_implementation="quantized", num_beams=num_beams, max_length=12, pad_token_id=0)
    with pytest.raises(ValueError, match="quantized KV cache"):  # the check itself, whatever backends are installed
        specbeam_hf.generate(target, ids, generation_config=config, assistant=specbeam_hf.SpecBeam(draft), attention_mask=mask)
    try:  # through HF generate: the fp8 backend needs no extra package (transformers 5.24)
        from transformers.cache_utils import QuantizedCache

        QuantizedCache(backend="fp8", config=target.config)
    except Exception as error:  # noqa: BLE001 -- older transformers: no fp8 backend
        skip_for_old_transformers(f"no quantized cache backend without extra packages: {error}")
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=num_beams)
    for spelling in (dict(cache_implementation="quantized", cache_config={"backend": "fp8"}),
                     dict(past_key_values=QuantizedCache(backend="fp8", config=target.config))):
        target.generate(**common, **spelling)  # HF runs it
        with pytest.raises(ValueError, match="quantized KV cache"):
            target.generate(**common, **spelling, custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_static_cache_gives_hfs_output(num_beams):
    """HF hands the custom generate the empty static cache it made; specbeam runs its own paged cache
    and returns what HF's static-cache decoding returns."""
    target, draft = make_pair("llama")
    ids, mask = ragged_batch([5, 7])
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  num_beams=num_beams, cache_implementation="static")
    assert torch.equal(target.generate(**common, custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft)),
                       target.generate(**common))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_synthid_watermarking_is_refused_and_the_stateless_watermark_runs(num_beams):
    """SynthID's processor keeps each row's context and seen-context hashes from call to call, so calls
    for positions later rejected (or rows run apart) would change what it adds; the green-list
    watermark is a function of the ids it is given and gives HF's output."""
    from transformers import SynthIDTextWatermarkingConfig, WatermarkingConfig

    target, draft = make_pair("llama")
    ids, mask = ragged_batch([5, 7])
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, num_beams=num_beams)
    synthid = SynthIDTextWatermarkingConfig(keys=[654, 400, 836, 123], ngram_len=3)
    with pytest.raises(ValueError, match="SynthID"):
        target.generate(**common, watermarking_config=synthid, custom_generate=specbeam_hf.generate,
                        assistant=specbeam_hf.SpecBeam(draft))
    green = WatermarkingConfig(bias=2.5, seeding_scheme="selfhash")
    assert torch.equal(target.generate(**common, watermarking_config=green, custom_generate=specbeam_hf.generate,
                                       assistant=specbeam_hf.SpecBeam(draft)),
                       target.generate(**common, watermarking_config=green))


def test_inputs_embeds_and_a_filled_cache_are_refused():
    target, draft = make_pair("llama")
    ids, mask = ragged_batch([5, 7])
    assistant = specbeam_hf.SpecBeam(draft)
    with pytest.raises(ValueError, match="inputs_embeds"):
        target.generate(inputs_embeds=target.get_input_embeddings()(ids), attention_mask=mask, max_new_tokens=4,
                        do_sample=False, pad_token_id=0, custom_generate=specbeam_hf.generate, assistant=assistant)
    first = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    name = "cache" if getattr(first, "cache", None) is not None else "past_key_values"  # renamed in transformers 5.24
    cache = getattr(first, name)
    assert cache is not None and cache.get_seq_length() > 0
    with pytest.raises(ValueError, match="filled"):
        target.generate(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences), **{name: cache},
                        max_new_tokens=4, do_sample=False, pad_token_id=0, custom_generate=specbeam_hf.generate, assistant=assistant)
