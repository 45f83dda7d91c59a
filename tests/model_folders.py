"""Tiny HF model folders on disk (config, weights, tokenizer), for the code paths that load by path:
vLLM servers and the vLLM proposer. Built from random weights; nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Words ``w0 .. w{V-1}`` split on whitespace; ``w0`` is <unk>/<pad>, ``w1`` BOS, ``w2`` EOS."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", bos_token="w1",
                                   eos_token="w2")


def tiny_llama(vocab_size: int = 32, seed: int = 0, init: float = 0.6, layers: int = 2,
               max_positions: int = 256) -> LlamaForCausalLM:
    """A small llama whose next-token distributions are far from uniform (large init)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def perturbed(model: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return draft


def save(model, folder: Path, vocab_size: int | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    word_tokenizer(vocab_size or model.config.vocab_size).save_pretrained(folder)
    return str(folder)


def small_vocab_pair(root: Path, vocab_size: int = 32, noise: float = 0.05) -> tuple[str, str]:
    """(target folder, draft folder): a 2-layer target and a perturbed copy as its draft."""
    target = tiny_llama(vocab_size)
    return save(target, root / "target"), save(perturbed(target, noise), root / "draft")
