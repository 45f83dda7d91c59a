"""``FastLlamaDraft`` (the lean llama forward for drafts) against HF's own forward (``HFCausalLM``) and
plain full-sequence HF forwards: ragged multi-row prefill, multi-row 1-token decode steps, and the
single-row paths (one token, and a chain of several tokens through ``_single_chain``)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from specbeam_core import build_kv_batch
from specbeam_hf import HFCausalLM
from specbeam_hf.fast_draft import FastLlamaDraft, draft_causal_lm, supports
from test_model_families import WINDOW, build

VOCAB = 96
ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral-window5", "qwen2-window5"])
def model(request):
    """Sliding-window variants: every sequence below runs past the window of 5, on layers that
    slide (Mistral: all; Qwen2: the first, by its layer types)."""
    if request.param.endswith("-window5"):
        family = request.param.split("-")[0]
        m = build(family, sliding_window=WINDOW)
        assert m.config.vocab_size == VOCAB
    else:
        family = request.param
        m = build_model(family, vocab_size=VOCAB, seed=3, init=0.2)
    assert m.config.num_attention_heads != m.config.num_key_value_heads  # GQA
    assert m.config.num_hidden_layers == 2
    if family == "qwen2":
        with torch.no_grad():  # give the q/k/v biases values, so a forward that skipped them would show
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    return m


class Pair:
    """The same token feeds through both runners, each on its own paged KV cache."""

    def __init__(self, model, block_size=4, num_blocks=32):
        self.fast = FastLlamaDraft(model)
        self.hf = HFCausalLM(model)
        self.caches = [r.make_cache(num_blocks, block_size) for r in (self.fast, self.hf)]
        self.seqs = [[c.new_sequence() for _ in range(3)] for c in self.caches]

    def feed(self, rows, feeds, num_logits):
        """Feed ``feeds[j]`` (token lists) to sequences ``rows[j]``; return (fast, hf) logits."""
        t_max = max(len(f) for f in feeds)
        tokens = torch.zeros(len(rows), t_max, dtype=torch.long)  # [N, T] left-padded
        for j, f in enumerate(feeds):
            tokens[j, t_max - len(f):] = torch.tensor(f)
        out = []
        for runner, cache, seqs in zip((self.fast, self.hf), self.caches, self.seqs):
            kv = build_kv_batch(cache, [seqs[r] for r in rows], [len(f) for f in feeds], cache.dtype)
            out.append(runner.forward(tokens, kv, num_logits))
        return out


def full_logits(model, tokens):
    """Plain HF forward over the whole sequence (no cache): logits [len, vocab]."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def check_close(fast, hf, ref=None):
    assert fast.shape == hf.shape
    assert torch.allclose(fast, hf, atol=ATOL, rtol=1e-5), float((fast - hf).abs().max())
    assert torch.equal(fast.argmax(-1), hf.argmax(-1))
    if ref is not None:
        assert torch.allclose(fast, ref, atol=ATOL, rtol=1e-5), float((fast - ref).abs().max())
        assert torch.equal(fast.argmax(-1), ref.argmax(-1))


def test_fast_draft_matches_hf(model):
    gen = torch.Generator().manual_seed(0)
    pair = Pair(model)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 3)]
    # ragged 2-row prefill: logits of the last 3 columns (every row has at least 3 real tokens)
    fast, hf = pair.feed([0, 1], seqs, 3)
    ref = torch.stack([full_logits(model, s)[-3:] for s in seqs])
    check_close(fast, hf, ref)
    # also every real position of the long row
    pair2 = Pair(model)
    fast, hf = pair2.feed([0, 1], seqs, 7)
    check_close(fast[0], hf[0], full_logits(model, seqs[0]))
    # 1-token decode steps of both rows (multi-row path), across block boundaries (block size 4)
    for _ in range(6):
        nxt = [int(fast_row.argmax()) for fast_row in fast[:, -1]]
        seqs = [s + [t] for s, t in zip(seqs, nxt)]
        fast, hf = pair.feed([0, 1], [[t] for t in nxt], 1)
        ref = torch.stack([full_logits(model, s)[-1:] for s in seqs])
        check_close(fast, hf, ref)
    # single row, one token: no mask at all
    t = int(fast[0, -1].argmax())
    seqs[0] = seqs[0] + [t]
    fast, hf = pair.feed([0], [[t]], 1)
    check_close(fast, hf, full_logits(model, seqs[0])[-1:][None])
    # single row, a chain of 3 tokens (build_kv_batch's _single_chain path, causal mask)
    chain = torch.randint(3, VOCAB, (3,), generator=gen).tolist()
    seqs[1] = seqs[1] + chain
    fast, hf = pair.feed([1], [chain], 3)
    check_close(fast, hf, full_logits(model, seqs[1])[-3:][None])
    # a fresh sequence prefilled alone (single chain from an empty cache)
    fresh = torch.randint(3, VOCAB, (5,), generator=gen).tolist()
    fast, hf = pair.feed([2], [fresh], 5)
    check_close(fast, hf, full_logits(model, fresh)[None])
    assert pair.fast.forward_count == pair.hf.forward_count == 10


def test_rotary_table_grows_past_its_first_length():
    """cos/sin come from a table built for 256 positions at first; longer sequences rebuild it."""
    m = build_model("llama", vocab_size=VOCAB, seed=6, init=0.2, max_positions=600)
    runner = FastLlamaDraft(m)
    tokens = torch.randint(3, VOCAB, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = runner.make_cache(80, 8)
    seq = cache.new_sequence()
    kv = build_kv_batch(cache, [seq], [200], cache.dtype)
    runner.forward(torch.tensor([tokens[:200]]), kv, 1)
    assert runner._rope_table[0].shape[0] == 256
    kv = build_kv_batch(cache, [seq], [100], cache.dtype)
    got = runner.forward(torch.tensor([tokens[200:]]), kv, 100)[0]
    assert runner._rope_table[0].shape[0] >= 300
    check_close(got, full_logits(m, tokens)[200:])


def test_draft_causal_lm_picks_the_runner(model):
    assert supports(model) is None
    assert type(draft_causal_lm(model)) is FastLlamaDraft


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_families_fall_back_to_hf(family):
    m = build_model(family, vocab_size=VOCAB)
    runner = draft_causal_lm(m)
    assert type(runner) is HFCausalLM
    with pytest.raises(ValueError, match=rf"FastLlamaDraft cannot run .*model type '{family}' is not llama-shaped"):
        FastLlamaDraft(m)


def test_unsupported_activation_is_refused():
    m = build_model("llama", vocab_size=VOCAB)
    m.config.hidden_act = "gelu"
    assert "activation" in supports(m)
    assert type(draft_causal_lm(m)) is HFCausalLM
    with pytest.raises(ValueError, match="activation 'gelu'"):
        FastLlamaDraft(m)
