"""Shared fixtures: tiny random-weight HF causal LMs (no downloads) and draft/target pairs.

A draft is a perturbed copy of its target (same architecture, every weight plus small Gaussian
noise), so drafts are often but not always accepted: both the accept and the reject paths run.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

# keep the suite light on a shared 2-core machine
torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

transformers.logging.set_verbosity_error()

import specbeam_core  # noqa: E402

def pytest_configure(config):
    """``-m "not slow"`` (the quick tier) leaves vLLM out: its modules skip without it, in CI too."""
    if "not slow" in (config.option.markexpr or ""):
        os.environ["SPECBEAM_QUICK_TIER"] = "1"


# Single tests of tens of seconds each, marked slow here (whole slow modules carry their own
# pytestmark): the statistical exactness checks that draw thousands of samples, the mutation runs,
# the load-test runs and a whole evaluation. The full suite runs them; the quick tier (-m "not slow")
# does not.
SLOW_TESTS = (
    "test_mutants.py::",
    "test_sampling.py::test_speculative_sampling_is_exact",
    "test_tree_decoding.py::test_tree_sampling_is_exact",
    "test_tree_decoding.py::test_statistical_test_catches",
    "test_prompt_lookup.py::test_engine_sampling_follows_the_target",
    "test_prompt_lookup.py::test_tree_sampling_with_a_lookup_branch_follows_the_target",
    "test_vocab_resize.py::test_sampling_stays_exact_with_a_smaller_draft_vocabulary",
    "test_plain_torch_model.py::test_sampling_follows_the_plain_model",
    "test_plain_torch_model.py::test_core_runs_a_plain_torch_model_without_transformers",
    "test_hooks.py::test_engines_made_and_dropped_with_a_shared_plugin_manager",
    "test_loadtests.py::test_sweep_",
    "test_loadtests.py::test_locust_",
    "test_evaluate.py::test_quick_run_writes_json_and_plots",  # these three share one whole evaluation
    "test_evaluate.py::test_speculative_rows_reproduce_the_baselines",
    "test_evaluate.py::test_greedy_outputs_and_perplexity_are_the_targets",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(pattern in item.nodeid for pattern in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


FAMILIES = ("llama", "gpt2", "opt", "qwen2")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SECOND_STEP = ".ci/run's second step (a venv with transformers>=5.24 and no vLLM: pytest -m needs_new_transformers)"
PAD_ID = 0
DEMO_DIR = Path(specbeam_core.__file__).resolve().parent.parent / "specbeam_hf" / "demo_models"


def build_model(
    family: str = "llama",
    vocab_size: int = 96,
    seed: int = 0,
    max_positions: int = 128,
    init: float = 0.1,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
):
    """A tiny randomly initialised causal LM; no EOS configured (tests pass ``eos_token_id``)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=None, pad_token_id=PAD_ID, initializer_range=init)
    if family == "llama":
        cfg = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max_positions, **common,
        )
        cls = LlamaForCausalLM
    elif family == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max_positions, **common,
        )
        cls = Qwen2ForCausalLM
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, n_positions=max_positions, **common)
        cls = GPT2LMHeadModel
    elif family == "opt":
        cfg = OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=num_layers, num_attention_heads=4,
            max_position_embeddings=max_positions, word_embed_proj_dim=32, init_std=init, **common,
        )
        cls = OPTForCausalLM
    else:  # pragma: no cover
        raise ValueError(family)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    model = cls(cfg).eval()
    return model.to(dtype)


def perturbed_copy(model, noise: float = 0.005, seed: int = 1):
    """The same model with N(0, noise²) added to every parameter (a draft that often agrees)."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_((noise * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return draft.eval()


def make_pair(family: str = "llama", noise: float = 0.005, **kwargs):
    target = build_model(family, **kwargs)
    return target, perturbed_copy(target, noise)


def ragged_batch(lengths, vocab_size: int = 96, seed: int = 0, low: int = 3):
    """Left-padded ``input_ids`` / ``attention_mask`` for prompts of these lengths (no special ids)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = torch.randint(low, vocab_size, (n,), generator=gen)
        mask[r, width - n :] = 1
    return ids, mask


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF ``generate``'s greedy continuation of each prompt, one prompt at a time (no padding)."""
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [batch, longest] for ``prompts``, padded on the left."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [batch, width]
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask


def record_feeds(model) -> list[list[int]]:
    """Make ``model.forward`` (a CausalLM's) record each call's tokens fed per row (``kv.num_new``);
    returns the record, which the caller may clear between steps."""
    fed: list[list[int]] = []
    inner = model.forward

    def recording(tokens, kv, num_logits):
        fed.append(list(kv.num_new))
        return inner(tokens, kv, num_logits)

    model.forward = recording
    return fed


def assert_pools_free(*caches):
    """Every block of every pool is back in its free list and no sequence is left."""
    for cache in caches:
        if cache is None:
            continue
        assert cache.num_sequences == 0, f"{cache.num_sequences} KV sequences left alive"
        assert cache.num_free_blocks == cache.num_usable_blocks, (
            f"{cache.num_usable_blocks - cache.num_free_blocks} blocks leaked"
        )
        assert all(cache.ref_count(b) == 0 for b in range(1, cache.num_blocks))


SMALL_VOCAB = 12  # the sampling tests' vocabulary: small enough to enumerate joint distributions


@pytest.fixture(scope="session")
def small_pair():
    """A 12-token target and a draft that often but not always agrees (sampling exactness tests)."""
    target = build_model("llama", vocab_size=SMALL_VOCAB, seed=0, init=0.2)
    draft = perturbed_copy(target, noise=0.03, seed=1)
    return target, draft


@pytest.fixture(scope="session")
def llama_pair():
    return make_pair("llama")


@pytest.fixture(scope="session")
def family_pairs():
    return {f: make_pair(f) for f in FAMILIES}


@pytest.fixture(params=["packed", "padded"])
def rows_layout(request, monkeypatch):
    """Force specbeam_core.forward_rows to pack ragged rows into one row, or to pad them, whatever
    pack_is_cheaper would say; yields the list of layouts forward_rows used with more than one row."""
    import specbeam_core.model as core_model

    used: list[str] = []
    pack = request.param == "packed"

    def forced(num_cached, num_new, keys_per_token, distinct_cached=None):
        used.append(request.param)
        return pack

    monkeypatch.setattr(core_model, "pack_is_cheaper", forced)
    yield used


def first_difference(out: torch.Tensor, ref: torch.Tensor, width: int = 0) -> str:
    """Where ``out`` first differs from ``ref`` (``[rows, L]`` each): for assertion messages."""
    if out.shape != ref.shape:
        return f"shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    for row in range(out.shape[0]):
        a, b = out[row].tolist(), ref[row].tolist()
        for j in range(len(a)):
            if a[j] != b[j]:
                return f"row {row} first differs at new token {j - width}: {a[j]} vs reference {b[j]}"
    return "equal"


# ---------------------------------------------------------------------------- skips in CI


def skip_for_old_transformers(detail: str) -> None:
    """For a test marked ``needs_new_transformers`` whose feature this transformers lacks: skip,
    naming the CI step that runs it; fail where that step runs (``SPECBEAM_REQUIRE_NEW_TRANSFORMERS=1``)."""
    have = transformers.__version__
    if os.environ.get("SPECBEAM_REQUIRE_NEW_TRANSFORMERS") == "1":
        pytest.fail(f"transformers {have} lacks what this test needs ({detail}); this step must run it")
    pytest.skip(f"needs transformers>=5.24 (have {have}: {detail}); run by {SECOND_STEP}")


def _may_skip_in_ci(item, reason: str) -> bool:
    """Skips a CI run cannot meet by nature: no CUDA device; the newer-transformers tests (their own
    step runs them); vLLM's tests (tests/vllm_support.py decides those)."""
    return ("CUDA" in reason or item.get_closest_marker("needs_new_transformers") is not None
            or item.path.name.startswith("test_vllm_"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``CI`` set, a skip for a missing requirement is a failure (CI must install what the suite
    needs), except the skips of :func:`_may_skip_in_ci`."""
    outcome = yield
    report = outcome.get_result()
    if not CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not _may_skip_in_ci(item, reason):
        report.outcome = "failed"
        report.longrepr = f"skipped with CI set ({reason}): CI must meet this requirement, so the skip fails"


def pytest_terminal_summary(terminalreporter):
    """Skip counts by reason (``-rs`` / ``-ra`` list each test; this groups them)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = Counter(r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped)
    terminalreporter.section(f"{len(skipped)} skipped, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.line(f"{count:4d}  {reason}")
