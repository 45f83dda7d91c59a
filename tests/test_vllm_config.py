"""specbeam's vLLM setup without a server: the config translation, the guards, the draft sampler.

- ``"method": "specbeam"`` becomes vLLM's draft-model path with specbeam's options; any other config
  passes untouched; the old spelling and unsupported vLLM versions are refused in one line naming the fix;
- an engine that did not ask for specbeam keeps vLLM's own classes;
- drafts are drawn from the draft's distribution after each row's temperature, top-k and top-p, and
  every tensor stays on the logits' device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vllm_support import require_vllm

require_vllm()

from specbeam_core import SamplingParams, probabilities  # noqa: E402
from specbeam_vllm import config  # noqa: E402
from specbeam_vllm.drafter import check_on_device, sample_drafts, trim_unread_buffers  # noqa: E402

SPEC = {"method": "specbeam", "model": "/drafts/d", "num_speculative_tokens": 4}


pytestmark = pytest.mark.slow  # needs vLLM: not in the quick tier (-m "not slow")


def test_translation_runs_vllms_draft_model_path_with_specbeams_options():
    spec, extra = config.translate({**SPEC, "hold_steps": 4}, {"specbeam": {"trials": 3}, "other": 1})
    assert spec == {"method": "draft_model", "model": "/drafts/d", "num_speculative_tokens": 4,
                    "draft_sample_method": "probabilistic"}
    assert extra["other"] == 1 and extra["specbeam"]["hold_steps"] == 4 and extra["specbeam"]["trials"] == 3
    spec, _ = config.translate({**SPEC, "sample_drafts": False}, {})
    assert spec["draft_sample_method"] == "greedy"


@pytest.mark.parametrize("spec", [None, {"method": "draft_model", "model": "/d", "num_speculative_tokens": 2},
                                  {"method": "ngram", "num_speculative_tokens": 2}])
def test_other_configs_pass_untouched(spec):
    assert config.translate(spec, {"specbeam": {"trials": 2}}) is None


@pytest.mark.parametrize("spec, extra, message", [
    ({"model": "specbeam", "num_speculative_tokens": 3}, {"specbeam": {"draft": "/old/d"}},
     '--speculative-config {"method": "specbeam", "model": "/old/d", "num_speculative_tokens": 3}'),
    ({"model": "specbeam_vllm.proposer.SpecBeamProposer", "num_speculative_tokens": 4}, {}, '"method": "specbeam"'),
    ({**SPEC, "model": None}, {}, "needs the draft model in 'model'"),
    ({**SPEC, "hold_steps": 1}, {}, "hold_steps"),
    ({**SPEC, "sample_draftz": True}, {"specbeam": {"sample_draftz": 1}}, "sample_draftz"),
    ({**SPEC, "draft_sample_method": "greedy"}, {}, "sample_drafts"),
    (SPEC, {"specbeam": {"draft": "/d"}}, "the draft goes in the speculative config's 'model'"),
])
def test_bad_configs_are_refused_in_one_line(spec, extra, message):
    with pytest.raises(config.SetupError) as err:
        config.translate(spec, extra)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_other_vllm_versions_are_refused_naming_the_supported_one():
    with pytest.raises(config.SetupError, match=r"supports vLLM 0\.32\.0 only, and this is vLLM 0\.33\.1"):
        config.translate(SPEC, {}, vllm_found="0.33.1")
    assert config.translate({"method": "draft_model", "model": "/d"}, {}, vllm_found="0.33.1") is None


def test_an_engine_that_did_not_ask_for_specbeam_keeps_vllms_classes():
    """The plugin, loaded as vLLM loads it in every process, leaves the runner's proposer class and
    the CPU kernels alone unless the process belongs to a specbeam engine."""
    code = ("import os; os.environ.pop('SPECBEAM_VLLM_ACTIVE', None)\n"
            "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
            "from vllm.v1.worker import gpu_model_runner\n"
            "from vllm.v1.spec_decode.draft_model import DraftModelProposer\n"
            "from vllm.v1.sample.ops import topk_topp_sampler\n"
            "assert gpu_model_runner.DraftModelProposer is DraftModelProposer\n"
            "assert not getattr(topk_topp_sampler.apply_top_k_only, '_specbeam_mend', False)\n"
            "os.environ['SPECBEAM_VLLM_ACTIVE'] = '1'\n"
            "import specbeam_vllm.plugin as p; p.register()\n"
            "assert gpu_model_runner.DraftModelProposer is not DraftModelProposer\n"
            "assert issubclass(gpu_model_runner.DraftModelProposer, DraftModelProposer)\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), child.stderr[-3000:]


def test_check_on_device_refuses_a_tensor_elsewhere():
    check_on_device(torch.zeros(2), torch.device("cpu"), "x")
    with pytest.raises(RuntimeError, match="draft probabilities is on meta, but vLLM's runner is on cpu"):
        check_on_device(torch.zeros(2, device="meta"), torch.device("cpu"), "the draft probabilities")


def fake_proposer(**kind):
    buffer = torch.zeros(2048, 8, dtype=torch.bfloat16, device="meta")  # [max_num_batched_tokens, hidden]
    fields = dict(pass_hidden_states_to_model=False, supports_mm_inputs=False, max_batch_size=16, hidden_size=8,
                  inputs_embeds_size=8, hidden_states=buffer, inputs_embeds=buffer)
    return SimpleNamespace(**{**fields, **kind})


def test_a_plain_draft_model_keeps_only_the_buffer_rows_it_writes():
    proposer = fake_proposer()
    trim_unread_buffers(proposer)
    assert proposer.hidden_states.shape == (16, 8) and proposer.inputs_embeds.shape == (0, 8)
    assert {t.dtype for t in (proposer.hidden_states, proposer.inputs_embeds)} == {torch.bfloat16}
    assert {t.device.type for t in (proposer.hidden_states, proposer.inputs_embeds)} == {"meta"}


@pytest.mark.parametrize("kind", [{"pass_hidden_states_to_model": True}, {"supports_mm_inputs": True}])
def test_drafts_that_read_the_buffers_keep_them_whole(kind):
    proposer = fake_proposer(**kind)
    trim_unread_buffers(proposer)
    assert proposer.hidden_states.shape == proposer.inputs_embeds.shape == (2048, 8)


def test_drafts_stay_on_the_logits_device():
    logits = torch.empty(3, 50, device="meta")  # [rows, vocab]: no data, only where it lives
    tokens, probs = sample_drafts(logits, torch.tensor([0.0, 0.8, 1.2], device="meta"),
                                  torch.tensor([50, 5, 50], device="meta"), torch.tensor([1.0, 1.0, 0.9], device="meta"),
                                  {})
    assert tokens.device.type == probs.device.type == "meta"
    assert tokens.shape == (3,) and probs.shape == (3, 50)


def test_drafts_follow_each_rows_warped_distribution():
    """Each row's probabilities are the core's warp of its logits (temperature, then top-k, then
    top-p), and the tokens drawn follow them: a chi-square goodness-of-fit test per row on 4000
    draws (fixed seed; p > 1e-3 each, a false alarm about 0.3 % of runs)."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    vocab, draws = 12, 4000
    logits = torch.randn(3, vocab) * 2  # [rows, vocab]
    rows = [SamplingParams(do_sample=True, temperature=0.7),
            SamplingParams(do_sample=True, temperature=1.0, top_k=4),
            SamplingParams(do_sample=True, temperature=1.3, top_p=0.8)]
    temperature = torch.tensor([r.temperature for r in rows])
    top_k = torch.tensor([r.top_k or vocab for r in rows])
    top_p = torch.tensor([r.top_p for r in rows])
    batch = logits.repeat(draws, 1)  # [draws * rows, vocab]
    tokens, probs = sample_drafts(batch, temperature.repeat(draws), top_k.repeat(draws), top_p.repeat(draws), {})
    for i, params in enumerate(rows):
        expected = probabilities(logits[i:i + 1], params)[0]  # [vocab]
        assert torch.allclose(probs[i], expected, atol=1e-5), (params, probs[i], expected)
        counts = Counter(tokens[i::3].tolist())
        support = [t for t in range(vocab) if expected[t] > 0]
        assert set(counts) <= set(support), params  # nothing outside top-k / top-p
        observed = [counts[t] for t in support]
        mass = torch.tensor([float(expected[t]) for t in support], dtype=torch.float64)
        p = chisquare(observed, (mass / mass.sum() * draws).tolist()).pvalue
        assert p > 1e-3, (params, p)


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat():
    logits = torch.randn(4, 30)  # [rows, vocab]
    temperature = torch.tensor([0.0, 0.9, 0.0, 0.9])
    gens = {1: torch.Generator().manual_seed(5)}
    first, _ = sample_drafts(logits, temperature, None, None, gens)
    again, _ = sample_drafts(logits, temperature, None, None, {1: torch.Generator().manual_seed(5)})
    assert first[0] == logits[0].argmax() and first[2] == logits[2].argmax()
    assert first[1] == again[1]  # the request's own generator decides its draws


def test_the_drafter_is_bound_only_where_vllm_imports_its_runner():
    """Activation must not import vLLM's model runner (25 MiB in the API server and engine core); the
    runner module, once imported, carries specbeam's proposer."""
    import subprocess
    import sys

    code = ("import sys; from specbeam_vllm.activate import activate; activate(); "
            "assert 'vllm.v1.worker.gpu_model_runner' not in sys.modules; "
            "from vllm.v1.worker import gpu_model_runner as g; "
            "print(g.DraftModelProposer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "SpecBeamDraftProposer"
