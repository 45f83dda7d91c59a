"""``specbeam evaluate``: the quick run writes the JSON and plots it promises, its speculative rows
reproduce the target's own outputs (so their BLEU/ROUGE/perplexity equal the baselines'), its greedy
outputs are those of HF ``generate``; the metrics against hand-computed values; the reference task
comes from held-out files only; bad options are one-line errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEMO_DIR, build_model
from specbeam_hf.app.cli import main
from specbeam_hf.app.evaluation import metrics
from specbeam_hf.app.evaluation.task import PASSAGES, load_passages, reference_text

REPO = Path(__file__).resolve().parent.parent
MODE_KEYS = {"mode", "label", "seconds", "new_tokens", "tokens_per_s", "speedup_vs_greedy", "perplexity", "bleu",
             "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["evaluate", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "eval_quick.json").read_text())


def test_quick_run_writes_json_and_plots(quick_run):
    out, results = quick_run
    assert set(results) >= {"meta", "modes", "gamma_sweep", "tree_sweep", "samples", "files"}
    assert [r["mode"] for r in results["modes"]] == ["greedy", "beam", "speculative", "tree", "spec_beam"]
    cfg = results["meta"]["config"]
    assert cfg["quick"] and cfg["num_prompts"] == 2 and cfg["max_new_tokens"] == 12
    for row in results["modes"]:
        assert MODE_KEYS <= set(row), row["mode"]
        assert row["new_tokens"] == cfg["num_prompts"] * cfg["max_new_tokens"]
        assert row["tokens_per_s"] > 0 and math.isfinite(row["perplexity"]) and row["perplexity"] >= 1.0
        assert 0.0 <= row["bleu"] <= 100.0
        for key in ("rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2"):
            assert 0.0 <= row[key] <= 1.0, (row["mode"], key)
    beams = {r["mode"]: r for r in results["modes"] if r["mode"] in ("beam", "spec_beam")}
    for row in beams.values():
        assert 0.0 <= row["beam_distinct_1"] <= 1.0 and 0.0 <= row["beam_distinct_2"] <= 1.0
        assert 0.0 <= row["self_bleu"] <= 100.0
    assert [r["gamma"] for r in results["gamma_sweep"]] == [2, 4]
    assert [(r["tree_width"], r["tree_budget"]) for r in results["tree_sweep"]] == [(2, 4), (2, 8)]
    for row in results["gamma_sweep"] + results["tree_sweep"]:
        assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["tokens_per_target_pass"] >= 1.0
        assert row["exact"] is True
    files = [Path(results["files"]["json"]), *map(Path, results["files"]["plots"])]
    assert [f.name for f in files] == ["eval_quick.json", "eval_quick_modes.png", "eval_quick_gamma.png", "eval_quick_tree.png"]
    for png in files[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speculative_rows_reproduce_the_baselines(quick_run):
    _, results = quick_run
    rows = {r["mode"]: r for r in results["modes"]}
    for mode, base in (("speculative", "greedy"), ("tree", "greedy"), ("spec_beam", "beam")):
        assert rows[mode]["exact"] is True and rows[mode]["exact_vs"] == base
        for key in ("bleu", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "perplexity"):
            assert rows[mode][key] == rows[base][key], (mode, key)
    assert rows["spec_beam"]["self_bleu"] == rows["beam"]["self_bleu"]
    assert rows["speculative"]["tokens_per_target_pass"] > 1.0  # drafts were accepted
    assert rows["spec_beam"]["beam_steps_per_target_pass"] >= 1.0
    for sample in results["samples"]:
        assert sample["outputs"]["speculative"] == sample["outputs"]["greedy"] == sample["outputs"]["tree"]


def test_greedy_outputs_and_perplexity_are_the_targets(quick_run):
    """Recompute the greedy row independently: HF generate's tokens, and perplexity via HF's own loss."""
    _, results = quick_run
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    passages = load_passages(2)
    assert [p.id for p in passages] == results["meta"]["prompts"]
    nll = count = 0.0
    for passage, sample in zip(passages, results["samples"]):
        ids = tok(passage.prompt, return_tensors="pt")["input_ids"]  # [1, P]
        out = target.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)  # [1, P + 12]
        assert sample["outputs"]["greedy"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert sample["reference"] == reference_text(tok, passage, 12)
        labels = out.clone()
        labels[0, : ids.shape[1]] = -100  # score the continuation only
        with torch.no_grad():
            loss = target(input_ids=out, labels=labels).loss  # mean NLL over the 12 new tokens
        nll, count = nll + float(loss) * 12, count + 12
    greedy = next(r for r in results["modes"] if r["mode"] == "greedy")
    assert greedy["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_metrics_against_hand_computed_values():
    assert metrics.distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert metrics.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75  # (1,2) twice, (2,3), (2,4)
    assert metrics.distinct_n([[1, 2, 3, 4]], 2) == 1.0
    assert metrics.distinct_n([[1]], 2) == 0.0
    same = ["return self.value + 1", "return self.value + 1", "return self.value + 1"]
    assert metrics.self_bleu(same) == pytest.approx(100.0)
    assert metrics.self_bleu(["alpha beta gamma delta", "one two three four"]) == pytest.approx(0.0, abs=1e-6)
    assert metrics.self_bleu(["only one"]) is None
    assert metrics.corpus_bleu(["x = foo(bar) + 1"], ["x = foo(bar) + 1"]) == pytest.approx(100.0)
    assert metrics.corpus_bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0, abs=1e-6)
    r = metrics.rouge(["the cat sat"], ["the cat sat down"])
    assert r["rouge1"] == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # precision 3/3, recall 3/4
    assert metrics.perplexity(0.0, 0) != metrics.perplexity(0.0, 0)  # NaN when nothing was scored


def test_continuation_nll_matches_log_softmax():
    model = build_model("llama", seed=3)
    prompt, output = [5, 6, 7], [8, 9, 10, 11]
    nll, n = metrics.continuation_nll(model, prompt, output)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + output])).logits[0].float(), -1)  # [7, V]
    expected = -sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(output))
    assert n == 4 and nll == pytest.approx(expected, rel=1e-5)


def test_reference_task_comes_from_held_out_files_only():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from train_demo_models import is_val_file
    finally:
        sys.path.remove(str(REPO / "scripts"))
    data = json.loads(PASSAGES.read_text())
    assert len(data["passages"]) >= 12
    for p in data["passages"]:
        assert is_val_file(p["file"]), p["file"]  # never a training file of the demo models
        assert p["file"] in data["held_out_files"] and p["prompt"].lstrip().startswith(("def ", "async def "))
    first = load_passages(12)
    assert first == load_passages(12)  # deterministic
    assert len({p.id.split(":")[0] for p in first}) == 12  # round-robin: twelve different files
    with pytest.raises(ValueError):
        load_passages(0)


def test_bad_options_are_one_line_errors(capsys, monkeypatch, tmp_path):
    cases = [
        (["evaluate", "--modes", "beam,speculative"], "greedy mode is the baseline"),
        (["evaluate", "--modes", "greedy,nope"], "expected modes from"),
        (["evaluate", "--gammas", "2,0"], "expected integers >= 1"),
        (["evaluate", "--modes", "greedy,beam", "--num-beams", "1"], "num_beams >= 2"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb not installed: import fails
    assert main(["evaluate", "--quick", "--track", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and err.count("\n") == 1
