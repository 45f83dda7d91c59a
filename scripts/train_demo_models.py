#!/usr/bin/env python
"""Train specbeam's shipped demo model pair (target LM + small draft LM) on CPU.

Everything is built from text that is present on every machine: the ``.py``
sources of CPython's standard library (``sysconfig.get_paths()["stdlib"]``).
No hub downloads are involved.

Pipeline
--------
1. Collect the stdlib ``.py`` files (sorted by path), excluding test suites
   (``test/``, ``tests/``, ``idlelib/idle_test``, ``lib2to3/tests``),
   ``site-packages`` and the machine-generated codec tables in ``encodings/``
   (files produced by ``gencodec.py``, ~1/3 of the bytes, almost pure hex
   tables).  ~2 % of the files are held out for validation, chosen by a hash
   of their relative path (deterministic, independent of the file count).
2. Train a byte-level BPE tokenizer (HF ``tokenizers``, vocab 4096) on the
   training files.  ``<|endoftext|>`` (id 0) is bos = eos = pad; the tokenizer
   prepends it as BOS when ``add_special_tokens=True``.  The training stream
   is ``<|endoftext|> file1 <|endoftext|> file2 ...``.
3. TARGET: a 12-layer ``LlamaForCausalLM`` (hidden 384, 6 heads, MLP 1024,
   tied embeddings, ~22.8 M parameters).

   Throughput measured on the 2-core CPU this was built on (seq 256, batch 8,
   bf16 autocast): 12 layers ~2.4k tokens/s, 4 layers ~6.9k tokens/s.  In a
   30-minute budget that is ~4.4 M vs ~12.4 M training tokens (the corpus is
   ~3 M tokens), i.e. the run is data/compute limited and the shallow model
   reaches a clearly lower loss.  So by default (``--target-train-layers 4``)
   the script trains a 4-layer model and then GROWS it to 12 layers without
   changing its function: after every trained layer it inserts 2 new decoder
   layers whose ``self_attn.o_proj`` and ``mlp.down_proj`` weights are zero,
   so each inserted layer adds exactly 0 to the residual stream (the identity).
   The script verifies that the grown model's float32 logits equal the small
   model's (max abs diff < 1e-5; in practice it is exactly 0) and aborts
   otherwise.  The grown model therefore has the full 12-layer decode cost
   while behaving like the trained 4-layer model.  ``--target-train-layers 12``
   trains the full depth directly instead.
4. DRAFT: a 1-layer ``LlamaForCausalLM`` (hidden 128, 4 heads, MLP 384, tied
   embeddings, ~0.74 M parameters) trained by distillation from the target
   (KL(target || draft) at temperature 1, optional CE on the data).  The
   greedy (argmax) agreement between the two on held-out positions is
   measured and printed.
5. Both are saved in bfloat16 (safetensors; config dtype float32) with tokenizer files and a
   generation config into ``specbeam_hf/demo_models/{target,draft}`` together
   with a model card ``specbeam_hf/demo_models/README.md``.

All randomness is seeded (``--seed``).  The training budgets are wall-clock
(``--target-minutes``, ``--draft-minutes``): a short calibration converts them
into a fixed number of optimizer steps, which is printed; pass
``--target-steps`` / ``--draft-steps`` to reproduce a run step-for-step.

Helpers in this module (corpus loading, evaluation, decode-cost timing) are
reused by ``scripts/check_demo_models.py``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "specbeam_hf" / "demo_models"

EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
MAX_POS = 1024

TARGET_ARCH = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    num_key_value_heads=6,
    intermediate_size=1024,
)
DRAFT_ARCH = dict(
    hidden_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=384,
)

EXCLUDED_DIR_NAMES = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


# --------------------------------------------------------------------------- #
# corpus
# --------------------------------------------------------------------------- #
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: str, text: str) -> bool:
    parts = rel.split("/")
    if any(p in EXCLUDED_DIR_NAMES for p in parts[:-1]):
        return True
    if parts[0] == "encodings" and "gencodec.py" in text[:1000]:
        return True  # generated charmap tables
    return False


def collect_files(root: Path | None = None) -> list[tuple[str, str]]:
    """Return ``[(relative_path, text)]`` of the stdlib .py sources, sorted by path."""
    root = Path(root) if root is not None else stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if any(part in EXCLUDED_DIR_NAMES for part in rel.split("/")[:-1]):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or _excluded(rel, text):
            continue
        out.append((rel, text))
    return out


def is_val_file(rel: str, val_frac: float = 0.02) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < int(round(val_frac * 10_000))


def split_files(files, val_frac: float = 0.02):
    train = [(r, t) for r, t in files if not is_val_file(r, val_frac)]
    val = [(r, t) for r, t in files if is_val_file(r, val_frac)]
    return train, val


def encode_docs(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token stream ``EOT doc1 EOT doc2 ...`` as a 1-D int64 tensor."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for doc in enc:
        ids.append(eot)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def load_val_ids(tokenizer, val_frac: float = 0.02) -> torch.Tensor:
    """Held-out validation token stream (same split as training)."""
    _, val = split_files(collect_files(), val_frac)
    return encode_docs(tokenizer, [t for _, t in val])


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #
def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eot_id = tok.token_to_id(EOT)
    assert eot_id == 0, eot_id
    # Prepend BOS (= <|endoftext|>, the document separator seen in training).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A",
        pair=f"{EOT} $A {EOT} $B",
        special_tokens=[(EOT, eot_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=MAX_POS,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #
def make_config(arch: dict, eot_id: int = 0, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        attn_implementation="sdpa",
    )
    kw.update(arch)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_model(arch: dict, seed: int, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(make_config(arch, **overrides))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def grow_model(small, target_layers: int, seed: int):
    """Insert identity decoder layers (zero o_proj / down_proj) into ``small``.

    Trained layers are spread evenly: with 4 -> 12 layers, trained layer i goes
    to position 3*i and is followed by two inserted identity layers.
    """
    from transformers import LlamaForCausalLM

    n_small = small.config.num_hidden_layers
    assert target_layers % n_small == 0, (target_layers, n_small)
    stride = target_layers // n_small
    cfg = copy.deepcopy(small.config)
    cfg.num_hidden_layers = target_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[0]] * target_layers
    torch.manual_seed(seed)
    big = LlamaForCausalLM(cfg).to(next(small.parameters()).dtype)
    big.model.embed_tokens.load_state_dict(small.model.embed_tokens.state_dict())
    big.model.norm.load_state_dict(small.model.norm.state_dict())
    with torch.no_grad():
        for j, layer in enumerate(big.model.layers):
            if j % stride == 0:
                layer.load_state_dict(small.model.layers[j // stride].state_dict())
            else:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    big.tie_weights()
    return big


def shrink_grown(big, stride: int = 3):
    """The trained shallow model inside a grown one (layers 0, stride, 2*stride, ...): same function,
    a third of the forward cost, so it is the cheaper distillation teacher."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(big.config)
    n = big.config.num_hidden_layers // stride
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:n]
    small = LlamaForCausalLM(cfg).to(next(big.parameters()).dtype)
    small.model.embed_tokens.load_state_dict(big.model.embed_tokens.state_dict())
    small.model.norm.load_state_dict(big.model.norm.state_dict())
    for i in range(n):
        small.model.layers[i].load_state_dict(big.model.layers[stride * i].state_dict())
    small.tie_weights()
    return small.eval()


def draft_from_target(teacher, num_layers: int = 1):
    """A draft at the target's width: the target's embeddings (tied head), final norm and first
    ``num_layers`` trained decoder layers; distillation then teaches it to stand in for the rest."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:num_layers]
    draft = LlamaForCausalLM(cfg).to(next(teacher.parameters()).dtype)
    draft.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    draft.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for i in range(num_layers):
        draft.model.layers[i].load_state_dict(teacher.model.layers[i].state_dict())
    draft.tie_weights()
    return draft


@torch.no_grad()
def max_logit_diff(a, b, ids: torch.Tensor) -> float:
    a.eval(), b.eval()
    return (a(input_ids=ids).logits.float() - b(input_ids=ids).logits.float()).abs().max().item()


@torch.no_grad()
def round_to_bf16(model):
    """Round the parameters to bfloat16 and back (what the saved checkpoint holds).

    Only parameters are touched: buffers such as the rotary ``inv_freq`` are
    not saved and are recomputed in float32 on load.
    """
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def make_optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def sample_batch(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def lm_step(model, opt, batch, amp: bool, clip: float) -> float:
    x, y = batch[:, :-1], batch[:, 1:]
    with _autocast(amp):
        logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def distill_step(draft, teacher, opt, batch, amp: bool, clip: float, ce_weight: float, temp: float,
                 argmax_ce_weight: float = 0.0):
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad(), _autocast(amp):
        t_logits = teacher(input_ids=x).logits
    with _autocast(amp):
        d_logits = draft(input_ids=x).logits
    t_logp = F.log_softmax(t_logits.float().reshape(-1, t_logits.size(-1)) / temp, dim=-1)
    d_logits = d_logits.float().reshape(-1, d_logits.size(-1))
    d_logp = F.log_softmax(d_logits / temp, dim=-1)
    kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean") * temp**2
    loss = kl
    if ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(d_logits, y.reshape(-1))
    if argmax_ce_weight > 0:  # what speculation needs most: the target's top token ranked first
        loss = loss + argmax_ce_weight * F.cross_entropy(d_logits, t_logp.argmax(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(draft.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        agree = (d_logits.argmax(-1) == t_logp.argmax(-1)).float().mean().item()
    return kl.item(), agree


def calibrate_steps(step_fn, minutes: float, n_warm: int = 2, n_time: int = 6) -> tuple[int, float]:
    """Time ``step_fn`` (run on throw-away copies) and convert minutes to steps."""
    for _ in range(n_warm):
        step_fn()
    t0 = time.perf_counter()
    for _ in range(n_time):
        step_fn()
    sec = (time.perf_counter() - t0) / n_time
    return max(10, int(minutes * 60 / sec)), sec


def run_training(name, n_steps, step_fn, lr_peak, warmup, opt, log_every, eval_fn=None, eval_every=0):
    t0 = time.perf_counter()
    ema = None
    bar = tqdm(range(n_steps), desc=name, mininterval=20, file=sys.stderr, dynamic_ncols=False, ncols=100)
    for step in bar:
        lr = lr_at(step, n_steps, lr_peak, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        out = step_fn()
        loss = out[0] if isinstance(out, tuple) else out
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == n_steps:
            extra = f" agree={out[1]:.3f}" if isinstance(out, tuple) else ""
            msg = f"[{name}] step {step + 1}/{n_steps} loss(ema)={ema:.4f}{extra} lr={lr:.2e} elapsed={time.perf_counter() - t0:.0f}s"
            if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
                msg += f" val={eval_fn():.4f}"
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- #
# evaluation
# --------------------------------------------------------------------------- #
def _windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None):
    n = (ids.numel() - 1) // seq_len
    if max_tokens is not None:
        n = min(n, math.ceil(max_tokens / seq_len))
    return [ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, seq_len: int = 256, max_tokens: int | None = None, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows, float32."""
    model.eval()
    wins = _windows(ids, seq_len, max_tokens)
    tot, cnt = 0.0, 0
    for i in range(0, len(wins), batch):
        b = torch.stack(wins[i : i + batch])
        logits = model(input_ids=b[:, :-1]).logits.float()
        tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="sum").item()
        cnt += b[:, 1:].numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def greedy_agreement(target, draft, ids: torch.Tensor, n_positions: int = 20_000, seq_len: int = 256, batch: int = 8):
    """Fraction of held-out positions where argmax(target) == argmax(draft).

    Full-sequence forward of both models over non-overlapping ``seq_len``
    windows of ``ids``; returns ``(rate, n_positions_used)``.
    """
    target.eval(), draft.eval()
    wins = [w[:-1] for w in _windows(ids, seq_len, n_positions)]
    agree, cnt = 0, 0
    for i in range(0, len(wins), batch):
        b = torch.stack(wins[i : i + batch])
        a = target(input_ids=b).logits.argmax(-1)
        d = draft(input_ids=b).logits.argmax(-1)
        m = a == d
        take = min(m.numel(), n_positions - cnt)
        agree += m.reshape(-1)[:take].sum().item()
        cnt += take
        if cnt >= n_positions:
            break
    return agree / cnt, cnt


@torch.no_grad()
def decode_cost_ms(model, n_runs: int = 50, n_warmup: int = 5, prompt_len: int = 32, seed: int = 0) -> float:
    """Median wall time (ms) of one single-token forward at batch 1 with a KV cache."""
    from transformers import DynamicCache

    model.eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=g)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(n_warmup + n_runs):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t0
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            if i >= n_warmup:
                times.append(dt)
    return 1000 * statistics.median(times)


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=False)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


# --------------------------------------------------------------------------- #
# saving
# --------------------------------------------------------------------------- #
def save_model(model, tokenizer, path: Path):
    from transformers import GenerationConfig

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    eot = tokenizer.eos_token_id
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.dtype = torch.bfloat16
    m.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=False
    )
    m.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # bfloat16 weights (half the size), loaded as float32 by default: exact, and the dtype in which
    # specbeam's outputs equal HF generate's token for token
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Name the class by its classic, version-portable alias.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _arch(model) -> dict:
    c = model.config
    return {k: getattr(c, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                       "num_key_value_heads", "intermediate_size")}


def write_model_card(out_dir: Path, r: dict):
    t, d = r["target"], r["draft"]
    grow_txt = (
        f"""The target was trained as a **{r['target_train_layers']}-layer** model (same width) and then
**grown to 12 layers without changing its function**: after each trained layer two new
decoder layers were inserted whose `self_attn.o_proj` and `mlp.down_proj` weights are zero,
so every inserted layer adds exactly 0 to the residual stream. The grown model's float32
logits equal the trained model's (max abs diff {r['grow_max_diff']:.1e}, checked by the script).
This was chosen after measuring training throughput on the 2-core CPU (bf16 autocast,
seq 256): 12 layers ≈ 2.4k tokens/s vs 4 layers ≈ 6.9k tokens/s; within the time budget
the shallow model sees ~3× more tokens and reaches a lower loss. The grown model has the
full 12-layer decode cost, which is what matters for demonstrating speculative decoding."""
        if r["target_train_layers"] != 12
        else "The target was trained at its full 12-layer depth."
    )
    card = f"""# specbeam demo model pair

A tiny **target** LM and an even tinier **draft** LM that share one tokenizer, for
demonstrating and testing speculative decoding on CPU without any hub downloads.
Both are `LlamaForCausalLM` checkpoints whose weights are stored in **bfloat16** safetensors (half
the size) and whose `config.json` says `"dtype": "float32"`, so `from_pretrained(path)` loads them in
float32 (every bfloat16 value is exact in float32): the dtype in which specbeam's greedy and beam
outputs equal HF `generate` token for token. Pass `dtype=torch.bfloat16` for bfloat16 (equal up to
near-ties). They were trained from scratch on CPython's standard-library
`.py` sources (Python {r['python_version']}), so they continue Python code.

Built by [`scripts/train_demo_models.py`](../../scripts/train_demo_models.py); check with
[`scripts/check_demo_models.py`](../../scripts/check_demo_models.py).

Exact command:

```
{r['command']}
```

(Budgets are wall-clock; this run used `--target-steps {t['steps']} --draft-steps {d['steps']}`,
which reproduces it step-for-step on the same software stack.)

## Data and tokenizer

* {r['n_train_files']} training files / {r['n_val_files']} held-out validation files (~2 %, chosen by a
  hash of the relative path) from `sysconfig.get_paths()["stdlib"]`, excluding `test/`, `tests/`,
  `idlelib/idle_test`, `lib2to3/tests`, `site-packages` and the generated codec tables in
  `encodings/`. Documents are joined as `<|endoftext|> file1 <|endoftext|> file2 ...`.
* {r['n_train_tokens']:,} training tokens, {r['n_val_tokens']:,} validation tokens.
* Byte-level BPE (HF `tokenizers`), vocab 4096. `<|endoftext|>` (id 0) is bos = eos = pad;
  the tokenizer prepends it as BOS when `add_special_tokens=True` (documents in training start
  with it). Decoding is byte-level, so any text round-trips exactly.

## Models

| | target | draft |
|---|---|---|
| layers | {t['arch']['num_hidden_layers']} | {d['arch']['num_hidden_layers']} |
| hidden / heads / kv heads | {t['arch']['hidden_size']} / {t['arch']['num_attention_heads']} / {t['arch']['num_key_value_heads']} | {d['arch']['hidden_size']} / {d['arch']['num_attention_heads']} / {d['arch']['num_key_value_heads']} |
| MLP (intermediate) | {t['arch']['intermediate_size']} | {d['arch']['intermediate_size']} |
| max positions | 1024 | 1024 |
| tied embeddings | yes | yes |
| parameters | {t['params']:,} | {d['params']:,} |
| folder size | {t['mb']:.1f} MB | {d['mb']:.1f} MB |
| training | {t['steps']} steps × {t['batch']}×{r['seq_len']} tokens, {t['minutes']:.1f} min | {d['steps']} steps × {d['batch']}×{r['seq_len']} tokens, {d['minutes']:.1f} min |
| held-out loss (nats/token, fp32) | {t['val_loss']:.4f} | {d['val_loss']:.4f} |
| decode cost, batch 1, 1 token w/ KV cache (median of 50) | {t['decode_ms']:.2f} ms | {d['decode_ms']:.2f} ms |

* **Cost ratio target/draft: {r['cost_ratio']:.1f}×** (float32, `torch.set_num_threads({r['threads']})`,
  measured on: {r['cpu']}).
* **Greedy agreement** (draft argmax == target argmax) on {r['agree_positions']:,} held-out
  positions (full-sequence forward, windows of {r['seq_len']}, both in float32 from the
  bf16 weights): **{100 * r['agreement']:.1f} %**.
* Total size of both folders: {t['mb'] + d['mb']:.1f} MB.

{grow_txt}

Target training: AdamW (β = 0.9/0.95, weight decay {r['weight_decay']} on matrices), peak lr
{r['target_lr']:g} with linear warmup and cosine decay to 10 %, grad clip 1.0, sequence length
{r['seq_len']}, bf16 autocast on CPU, seed {r['seed']}.

Draft training: {r['draft_init']}; distillation from the (bf16-rounded) target, loss = KL(target ‖ draft) at
temperature 1{f" + {r['ce_weight']} × CE on the data" if r['ce_weight'] > 0 else ""}{f" + {r['argmax_ce_weight']} × CE towards the target's argmax token" if r['argmax_ce_weight'] > 0 else ""}, AdamW peak lr {r['draft_lr']:g},
same schedule shape.

Sample greedy continuation of the target for `"def main("` (30 tokens):

```python
def main({r['sample']}
```

## Caveats

* These are toy models: they produce plausible-looking Python but are not useful for anything
  except exercising decoding code paths and measuring speed-ups.
* Trained with sequence length {r['seq_len']}; quality degrades for contexts much longer than that
  (RoPE positions up to 1024 are accepted).
"""
    (out_dir / "README.md").write_text(card)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-frac", type=float, default=0.02)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--no-amp", action="store_true", help="train in float32 instead of bf16 autocast")
    # target
    p.add_argument("--target-minutes", type=float, default=30.0)
    p.add_argument("--target-steps", type=int, default=None, help="overrides --target-minutes")
    p.add_argument("--target-train-layers", type=int, default=4, help="train this many layers, then grow to 12")
    p.add_argument("--target-batch", type=int, default=16)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--target-warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--init-target", type=Path, default=None,
                   help="skip target training: load this saved target folder (and its tokenizer)")
    # draft
    p.add_argument("--draft-minutes", type=float, default=12.0)
    p.add_argument("--draft-steps", type=int, default=None, help="overrides --draft-minutes")
    p.add_argument("--draft-batch", type=int, default=32)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--draft-warmup", type=int, default=100)
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of data CE added to the KL loss")
    p.add_argument("--argmax-ce-weight", type=float, default=0.0,
                   help="weight of CE towards the target's argmax token added to the KL loss")
    p.add_argument("--draft-from-target", action="store_true",
                   help="draft = 1 layer at the target's width, initialised from the target's embeddings, "
                        "first trained layer and final norm (default: a fresh 1-layer, 128-wide model)")
    p.add_argument("--init-draft", type=Path, default=None, help="continue distilling this saved draft folder")
    # eval
    p.add_argument("--agree-positions", type=int, default=20_000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--bench", action="store_true", help="only measure training throughput and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    amp = not args.no_amp
    t_start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # ---- data + tokenizer -------------------------------------------------
    files = collect_files()
    train_files, val_files = split_files(files, args.val_frac)
    print(f"stdlib: {stdlib_dir()}  files: {len(train_files)} train / {len(val_files)} val "
          f"({sum(len(t) for _, t in train_files) / 1e6:.1f} / {sum(len(t) for _, t in val_files) / 1e6:.2f} M chars)")
    if args.init_target is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.init_target)
    else:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer([t for _, t in train_files])
        print(f"tokenizer trained in {time.perf_counter() - t0:.0f}s, vocab {len(tokenizer)}")
    train_ids = encode_docs(tokenizer, [t for _, t in train_files])
    val_ids = encode_docs(tokenizer, [t for _, t in val_files])
    print(f"tokens: {train_ids.numel():,} train / {val_ids.numel():,} val")
    eot = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(args.seed)
    S = args.seq_len

    if args.bench:
        for layers in sorted({args.target_train_layers, 12}):
            m = make_model(TARGET_ARCH, args.seed, num_hidden_layers=layers, eos_token_id=eot)
            o = make_optimizer(m, args.target_lr, args.weight_decay)
            n, sec = calibrate_steps(lambda: lm_step(m, o, sample_batch(train_ids, args.target_batch, S, gen), amp, 1.0),
                                     args.target_minutes)
            print(f"target {layers} layers, batch {args.target_batch}: {sec:.3f} s/step, "
                  f"{args.target_batch * S / sec:.0f} tok/s -> {n} steps in {args.target_minutes} min")
        return

    # ---- target ---------------------------------------------------------------
    results: dict = {}
    if args.init_target is not None:
        target = AutoModelForCausalLM.from_pretrained(args.init_target, dtype=torch.float32)
        results["target_meta"] = json.loads((args.init_target / "train_meta.json").read_text()) \
            if (args.init_target / "train_meta.json").exists() else {}
        small_teacher = shrink_grown(target) if target.config.num_hidden_layers == 12 and \
            results["target_meta"].get("train_layers", 12) == 4 else target
        if small_teacher is not target:
            chk = val_ids[: 2 * S].reshape(2, S)
            print(f"loaded target from {args.init_target}; trained 4-layer teacher inside it, "
                  f"max |logit diff| {max_logit_diff(small_teacher, target, chk):.1e}")
    else:
        L = args.target_train_layers
        small = make_model(TARGET_ARCH, args.seed, num_hidden_layers=L)
        small.train()
        print(f"target (training depth {L}): {n_params(small):,} params")
        opt = make_optimizer(small, args.target_lr, args.weight_decay)
        if args.target_steps is None:
            probe = copy.deepcopy(small)
            popt = make_optimizer(probe, args.target_lr, args.weight_decay)
            pgen = torch.Generator().manual_seed(args.seed + 1)
            n_steps, sec = calibrate_steps(
                lambda: lm_step(probe, popt, sample_batch(train_ids, args.target_batch, S, pgen), amp, 1.0),
                args.target_minutes)
            del probe, popt
            print(f"calibration: {sec:.3f} s/step -> {n_steps} steps for {args.target_minutes} min")
        else:
            n_steps = args.target_steps
        ev = val_ids[: 64 * S + 1]
        secs = run_training(
            "target", n_steps,
            lambda: lm_step(small, opt, sample_batch(train_ids, args.target_batch, S, gen), amp, 1.0),
            args.target_lr, args.target_warmup, opt, args.log_every,
            eval_fn=lambda: eval_loss(small, ev, S), eval_every=args.log_every * 5)
        del opt
        small = round_to_bf16(small.eval())
        if L != TARGET_ARCH["num_hidden_layers"]:
            target = grow_model(small, TARGET_ARCH["num_hidden_layers"], args.seed + 7).eval()
            chk = val_ids[: 2 * S].reshape(2, S)
            diff = max_logit_diff(small, target, chk)
            print(f"grown {L} -> {target.config.num_hidden_layers} layers; max |logit diff| vs trained model = {diff:.3e}")
            if not diff < 1e-5:
                raise SystemExit("grown model is not function-preserving")
            results["grow_max_diff"] = diff
        else:
            target = small
        results["target_meta"] = {"steps": n_steps, "minutes": secs / 60, "batch": args.target_batch,
                                  "train_layers": L}
        small_teacher = small  # same function, cheaper forward
    target.eval()

    # ---- draft (distillation) --------------------------------------------------
    if args.init_draft is not None:
        draft = AutoModelForCausalLM.from_pretrained(args.init_draft, dtype=torch.float32)
        print(f"continuing from the draft in {args.init_draft}")
    elif args.draft_from_target:
        draft = draft_from_target(small_teacher.float())
    else:
        draft = make_model(DRAFT_ARCH, args.seed + 100)
    draft.train()
    print(f"draft: {n_params(draft):,} params")
    teacher = small_teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dopt = make_optimizer(draft, args.draft_lr, args.weight_decay)
    dgen = torch.Generator().manual_seed(args.seed + 2)

    def dstep(m=draft, o=dopt, g=dgen):
        return distill_step(m, teacher, o, sample_batch(train_ids, args.draft_batch, S, g), amp, 1.0,
                            args.ce_weight, 1.0, args.argmax_ce_weight)

    if args.draft_steps is None:
        probe = copy.deepcopy(draft)
        popt = make_optimizer(probe, args.draft_lr, args.weight_decay)
        pgen = torch.Generator().manual_seed(args.seed + 3)
        d_steps, sec = calibrate_steps(lambda: dstep(probe, popt, pgen), args.draft_minutes)
        del probe, popt
        print(f"calibration: {sec:.3f} s/step -> {d_steps} steps for {args.draft_minutes} min")
    else:
        d_steps = args.draft_steps
    dsecs = run_training("draft", d_steps, dstep, args.draft_lr, args.draft_warmup, dopt, args.log_every)
    draft = round_to_bf16(draft.eval())

    # ---- save ------------------------------------------------------------------
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(target, tokenizer, out / "target")
    save_model(draft, tokenizer, out / "draft")

    # ---- final evaluation on the saved checkpoints -----------------------------
    tgt = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    drf = AutoModelForCausalLM.from_pretrained(out / "draft", dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out / "target")
    t_val = eval_loss(tgt, val_ids, S)
    d_val = eval_loss(drf, val_ids, S)
    agree, npos = greedy_agreement(tgt, drf, val_ids, args.agree_positions, S)
    t_ms, d_ms = decode_cost_ms(tgt), decode_cost_ms(drf)
    sample = greedy_continuation(tgt, tok2, "def main(", 30)
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{cpu}, {os.cpu_count()} cores"
    tm = results["target_meta"]
    r = dict(
        command="python scripts/train_demo_models.py " + " ".join(sys.argv[1:] if argv is None else argv),
        python_version=sys.version.split()[0], seed=args.seed, seq_len=S, threads=args.threads,
        n_train_files=len(train_files), n_val_files=len(val_files),
        n_train_tokens=train_ids.numel(), n_val_tokens=val_ids.numel(),
        target_train_layers=tm.get("train_layers", 12), grow_max_diff=results.get("grow_max_diff", 0.0),
        weight_decay=args.weight_decay, target_lr=args.target_lr, draft_lr=args.draft_lr, ce_weight=args.ce_weight,
        argmax_ce_weight=args.argmax_ce_weight,
        draft_init=(f"continued from {args.init_draft}" if args.init_draft is not None else
                    "initialised from the target (its embeddings / tied head, final norm and first trained "
                    "decoder layer)" if args.draft_from_target else "trained from a random initialisation"),
        target=dict(arch=_arch(tgt), params=n_params(tgt), mb=folder_mb(out / "target"), steps=tm.get("steps", 0),
                    batch=tm.get("batch", args.target_batch), minutes=tm.get("minutes", 0.0),
                    val_loss=t_val, decode_ms=t_ms),
        draft=dict(arch=_arch(drf), params=n_params(drf), mb=folder_mb(out / "draft"), steps=d_steps, batch=args.draft_batch,
                   minutes=dsecs / 60, val_loss=d_val, decode_ms=d_ms),
        agreement=agree, agree_positions=npos, cost_ratio=t_ms / d_ms, cpu=cpu, sample=sample,
    )
    (out / "target" / "train_meta.json").write_text(json.dumps(tm, indent=2) + "\n")
    write_model_card(out, r)
    print("=" * 72)
    print(f"target: {r['target']['params']:,} params, val loss {t_val:.4f}, decode {t_ms:.2f} ms, {r['target']['mb']:.1f} MB")
    print(f"draft:  {r['draft']['params']:,} params, val loss {d_val:.4f}, decode {d_ms:.2f} ms, {r['draft']['mb']:.1f} MB")
    print(f"greedy agreement on {npos:,} held-out positions: {100 * agree:.2f} %")
    print(f"cost ratio target/draft: {t_ms / d_ms:.1f}x   total size {r['target']['mb'] + r['draft']['mb']:.1f} MB")
    print(f"sample: {'def main(' + sample!r}")
    print(f"total wall time {(time.perf_counter() - t_start) / 60:.1f} min")
    if agree < 0.60 or t_ms / d_ms < 10:
        print("WARNING: requirement not met (agreement >= 60 % and ratio >= 10x)")


if __name__ == "__main__":
    main()
