"""Which transformers model families specbeam runs exactly, beyond the ones in the test suite.

For each model type: a tiny random model from its config class (2 layers, hidden 32, vocabulary
80; a sliding window of 8 where the config has one), a draft that is the same model plus noise,
and a ragged batch of two prompts (one left-padded). Greedy with chains and with trees, and beam
search B = 3 (two sequences returned, length penalty 0.7) and B = 2, each against the model's own
``generate``. Each family gets one line: ``equal`` per case, or the ValueError by which specbeam
refuses it (recurrent / convolution / ALiBi layers), or why the tiny model could not be built.

    python scripts/check_families.py                       # the default list below
    python scripts/check_families.py --families granite,phi3

Not part of CI (a few minutes); ``tests/test_model_families.py`` holds the families tested there.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

DEFAULT = (
    "gemma,gemma3_text,cohere,cohere2,granite,granitemoe,phi3,phimoe,stablelm,starcoder2,gpt_bigcode,gptj,codegen,"
    "qwen2_moe,mixtral,qwen3_moe,olmo,olmoe,olmo3,smollm3,glm,glm4,glm4_moe,helium,exaone4,persimmon,nemotron,"
    "bitnet,arcee,ernie4_5,hunyuan_v1_dense,seed_oss,apertus,gpt_oss,ministral,deepseek_v2,deepseek_v3,"
    "lfm2,bloom,mpt,mamba,jamba,falcon_h1,minimax,qwen3_next"
)
# per family: what the common tiny config gets wrong for it (latent attention's head sizes; hybrid
# models' layer types, so that their recurrent / convolution layers are really there)
OVERRIDES = {
    "deepseek_v2": dict(num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16,
                        q_lora_rank=None, head_dim=4, n_group=1, topk_group=1, first_k_dense_replace=1),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=4),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
}
OVERRIDES["deepseek_v3"] = OVERRIDES["deepseek_v2"]
VOCAB = 80
CASES = [("greedy, chain", {}, "draft_model"), ("greedy, tree", {}, "draft_tree"),
         ("beams B=3", dict(num_beams=3, num_return_sequences=2, length_penalty=0.7), "draft_model"),
         ("beams B=2", dict(num_beams=2), "draft_model")]


def tiny_config(model_type: str):
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=None)
    config = AutoConfig.for_model(model_type, **{**common, **OVERRIDES.get(model_type, {})})
    other_names = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, d_model=32, n_heads=4, n_layers=2, num_layers=2,
                       moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                       n_routed_experts=4, rotary_dim=8, n_inner=64, ffn_hidden_size=64)
    for name, value in other_names.items():
        if hasattr(config, name) and name not in OVERRIDES.get(model_type, {}):
            setattr(config, name, value)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = 8
    return config


def check(model_type: str) -> list[str]:
    from transformers import AutoModelForCausalLM

    import specbeam_hf

    try:
        torch.manual_seed(0)
        target = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval().float()
        with torch.no_grad():
            for p in target.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.15)
        draft = copy.deepcopy(target)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(0.01 * torch.randn_like(p))
    except Exception as exc:  # the tiny config does not suit this family
        return [f"not built: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)  # [batch, prompt]
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0 left-padded
    results = []
    for name, options, drafter in CASES:
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None, **options)
        try:
            ref = target.generate(**kwargs)
        except Exception as exc:
            results.append(f"{name}: HF itself fails ({type(exc).__name__})")
            continue
        try:
            out = target.generate(**kwargs, custom_generate=specbeam_hf.generate,
                                  assistant=specbeam_hf.SpecBeam(draft, drafter=drafter))
        except ValueError as exc:
            return [f"refused: {' '.join(str(exc).split())[:160]}"]
        results.append(f"{name}: {'equal' if torch.equal(out, ref) else 'DIFFERENT'}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=DEFAULT, help="comma-separated transformers model types")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    table = {}
    for model_type in args.families.split(","):
        table[model_type] = check(model_type)
        print(f"{model_type:18s} {' | '.join(table[model_type])}", flush=True)
    different = [m for m, r in table.items() if any("DIFFERENT" in x for x in r)]
    print(f"\n{len(table)} families; outputs differ for: {', '.join(different) or 'none'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"transformers": transformers.__version__, "results": table}, f, indent=2)
    raise SystemExit(1 if different else 0)


if __name__ == "__main__":
    main()
