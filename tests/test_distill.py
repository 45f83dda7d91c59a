"""``specbeam distill``: its losses on hand-made distributions, the one-line errors of bad input, and a
short run on a tiny random Llama pair (the saved draft loads and generates; a run resumes from its
checkpoint)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from model_folders import save, small_vocab_pair, tiny_llama
from specbeam_hf.app.cli import main
from specbeam_hf.distill.losses import argmax_ce, beam_rank_loss, tv_loss
from specbeam_hf.distill.rollouts import _kept, _mask

TINY = ["--prompt-length", "12", "--new-tokens", "6", "--eval-prompts", "1", "--eval-new-tokens", "4",
        "--eval-positions", "24", "--batch-size", "2", "--no-progress", "--threads", "1"]


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)  # [1, seq, vocab]


# --------------------------------------------------------------------------- losses
def test_tv_loss_is_zero_for_equal_distributions_and_half_the_l1_distance_otherwise():
    p = _logits([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    q = _logits([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert tv_loss(p, p, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert tv_loss(p, q, mask).item() == pytest.approx((0.2 + 0.0) / 2)  # TV 0.2 at position 0, 0 at 1
    assert tv_loss(p, q, torch.tensor([[False, True]])).item() == pytest.approx(0.0, abs=1e-7)


def test_argmax_ce_is_the_draft_nll_of_the_target_argmax():
    p = _logits([[0.1, 0.6, 0.3]])
    q = _logits([[0.5, 0.25, 0.25]])
    assert argmax_ce(p, q, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(-torch.log(torch.tensor(0.25)))


def test_beam_rank_loss_is_zero_when_the_kept_beams_are_the_drafts_top():
    q = _logits([[0.5, 0.3, 0.1, 0.05, 0.05]])  # draft ranks 0, 1, 2, ...
    top_two = torch.tensor([[[0, 1]]])  # [1, 1, 2]: the target kept tokens 0 and 1
    assert beam_rank_loss(q, top_two, top_k=2, margin=0.5).item() == 0.0
    kept_third = torch.tensor([[[2, -1]]])  # one token kept, the draft's third
    assert beam_rank_loss(q, kept_third, top_k=3, margin=0.5).item() == 0.0  # in the top 3 with margin
    loss = beam_rank_loss(q, kept_third, top_k=1, margin=0.5).item()  # must beat token 0 by the margin
    assert loss == pytest.approx(0.5 + torch.log(torch.tensor(0.5 / 0.1)).item(), rel=1e-5)
    assert beam_rank_loss(q, torch.full((1, 1, 2), -1), top_k=2).item() == 0.0  # nothing kept: no loss


def test_beam_rank_loss_gradient_lifts_the_kept_token():
    q = _logits([[0.5, 0.3, 0.1, 0.05, 0.05]]).requires_grad_()
    beam_rank_loss(q, torch.tensor([[[3]]]), top_k=2).backward()
    assert q.grad[0, 0, 3] < 0 and q.grad[0, 0, 1] > 0  # raise the kept token, lower the one it must beat


def test_rows_are_trained_up_to_their_first_eos_and_beams_share_kept_tokens():
    seqs = torch.tensor([[5, 6, 7, 2, 2], [5, 6, 8, 9, 2]])  # prompt [5, 6], eos 2; one group of 2 beams
    mask = _mask(seqs, 2, eos=2)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    kept = _kept(seqs, 2, group=2, mask=mask)
    assert sorted(kept[0, 1].tolist()) == [7, 8]  # both beams leave the prompt: tokens 7 and 8 were kept
    assert kept[1, 2].tolist() == [9, -1] and kept[0, 2].tolist() == [2, -1]


# --------------------------------------------------------------------------- bad input
def _text(folder, files: int = 6, words: int = 300, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(files):
        (folder / f"doc{i}.txt").write_text(" ".join(f"w{rng.randrange(3, 32)}" for _ in range(words)))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    target, draft = small_vocab_pair(root, vocab_size=32, noise=0.05)
    return target, draft, str(_text(root / "data"))


def _error(capsys, argv) -> str:
    assert main(["distill", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("specbeam distill: error: ")
    return err


def test_bad_input_gives_one_line_and_status_2(pair, tmp_path, capsys):
    target, draft, data = pair
    models = ["--target", target, "--draft", draft]
    other = save(tiny_llama(40, seed=3), tmp_path / "other_draft")  # its own 40-word tokenizer
    capsys.readouterr()  # the progress bar of that save
    assert "vocabulary (40 tokens) differs from the target's (32)" in _error(
        capsys, ["--target", target, "--draft", other, "--data", data, "--out", str(tmp_path / "o1")])
    small = _text(tmp_path / "small", files=2, words=10)
    assert "too little text" in _error(capsys, [*models, "--data", str(small), "--out", str(tmp_path / "o2")])
    assert "would overwrite the input draft" in _error(capsys, [*models, "--data", data, "--out", draft])
    assert "no such file or folder" in _error(capsys, [*models, "--data", str(tmp_path / "nope"),
                                                       "--out", str(tmp_path / "o3")])
    (tmp_path / "empty").mkdir()
    assert "no readable text files" in _error(capsys, [*models, "--data", str(tmp_path / "empty"),
                                                       "--out", str(tmp_path / "o4")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert "is not empty; pass --resume" in _error(capsys, [*models, "--data", data, "--out", str(tmp_path / "full")])
    assert "holds no checkpoint" in _error(capsys, [*models, "--data", data, "--out", str(tmp_path / "o5"),
                                                    "--resume"])
    assert "does not exist" in _error(capsys, ["--target", str(tmp_path / "t"), "--draft", draft, "--data", data,
                                               "--out", str(tmp_path / "o6")])
    assert "not allowed with argument --steps" in _error(capsys, [*models, "--data", data, "--out", str(tmp_path / "o7"), "--steps", "2",
                                         "--minutes", "1"])


# --------------------------------------------------------------------------- a short run
@pytest.mark.slow
def test_distill_saves_a_loadable_draft_and_resumes(pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, draft, data = pair
    out = tmp_path / "out"
    argv = ["distill", "--target", target, "--draft", draft, "--data", data, "--out", str(out), *TINY]
    assert main([*argv, "--steps", "4", "--save-steps", "2", "--objective", "both"]) == 0
    assert "greedy agreement" in capsys.readouterr().out
    report = json.loads((out / "distill_report.json").read_text())
    assert report["steps"] == 4 and set(report["before"]) == set(report["after"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
    changed = AutoModelForCausalLM.from_pretrained(draft).state_dict()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in changed.items())  # the draft was trained

    assert main([*argv, "--steps", "6", "--save-steps", "2", "--resume"]) == 0  # continues from checkpoint-4
    assert json.loads((out / "distill_report.json").read_text())["steps"] == 6
    assert (out / "checkpoints" / "checkpoint-6").is_dir()


def test_the_report_says_whether_the_draft_improved():
    from specbeam_hf.distill.report import DistillReport

    def report(after):
        before = dict(greedy_agreement=0.5, mean_accepted_length=2.0, beam_steps_per_pass=1.3)
        return DistillReport(out="x", steps=1, train_seconds=1.0, before=before, after=after)

    assert report(dict(greedy_agreement=0.6, mean_accepted_length=2.2, beam_steps_per_pass=1.4)).improved() is True
    assert report(dict(greedy_agreement=0.4, mean_accepted_length=1.9, beam_steps_per_pass=1.3)).improved() is False
    assert report(dict(greedy_agreement=0.6, mean_accepted_length=1.9, beam_steps_per_pass=1.3)).improved() is None
