"""The ``specbeam generate`` command on the shipped demo pair: output equals the target's greedy
search, the JSON log, config files with flags overriding them, and one-line errors with status 2."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEMO_DIR
from specbeam_hf.app.cli import main

PROMPT = "class Stack:\n    def __init__(self):\n"


def test_generate_greedy_equals_target_and_writes_json_log(tmp_path, capsys):
    log = tmp_path / "run.json"
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--draft-length", "3",
                 "--dtype", "float32", "--json-log", str(log), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "accepted" in out and "tokens/s" in out  # the legend and the summary of --verbose
    data = json.loads(log.read_text())
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = target.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert data["prompt_token_ids"] == ids[0].tolist()
    assert data["output_token_ids"] == ref and len(ref) == 12  # the whole output: no EOS within 12 tokens here
    assert data["finish_reason"] == "length"
    assert sum(len(s["emitted_tokens"][0]) for s in data["steps"]) == len(data["output_token_ids"])
    assert data["summary"]["target_forwards"] == len(data["steps"])


def test_generate_with_a_bfloat16_draft_equals_the_float32_target(tmp_path):
    log = tmp_path / "run.json"
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--dtype", "float32",
                 "--draft-dtype", "bfloat16", "--json-log", str(log)]) == 0
    data = json.loads(log.read_text())
    assert data["options"]["draft_dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = target.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert data["output_token_ids"] == ref and len(ref) == 16  # the whole output: no EOS within 16 tokens here
    assert data["finish_reason"] == "length"


def test_config_file_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"prompt: {json.dumps(PROMPT)}\nmax-new-tokens: 5\ndraft_length: 2\ndtype: float32\n")
    log = tmp_path / "run.json"
    assert main(["generate", "--config", str(cfg), "--max-new-tokens", "7", "--json-log", str(log)]) == 0
    data = json.loads(log.read_text())
    assert data["options"]["max_new_tokens"] == 7  # the flag wins
    assert data["options"]["draft_length"] == 2  # from the file
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = target.generate(ids, max_new_tokens=7, do_sample=False)[0, ids.shape[1]:].tolist()
    assert data["output_token_ids"] == ref and len(ref) == 7  # the whole output, 7 tokens (the flag's count)


def test_bad_input_is_one_line_with_status_2(tmp_path, capsys):
    cases = [
        (["generate", "--prompt", "x", "--draft-length", "0"], "expected an integer >= 1"),
        (["generate", "--prompt", ""], "empty prompt"),
        (["generate"], "no prompt given"),
        (["generate", "--prompt", "x", "--draft", str(tmp_path)], "no config.json"),
        (["generate", "--prompt", "x", "--max-new-tokens", "5000"], "position limit"),
    ]
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("prompt: x\nno_such_option: 1\n")
    cases.append((["generate", "--config", str(bad_cfg)], "unknown option 'no_such_option'"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("specbeam generate: error:")]
        assert len(errors) == 1 and message in errors[0], (argv, errors)  # one line (HF's load bars aside)


def test_generate_beam_search_equals_hf_and_compares(tmp_path, capsys):
    """``--num-beams 4 --num-return-sequences 2``: the hypotheses and scores of the target's own
    ``generate(num_beams=4, ...)``; ``--compare-hf`` runs that and says the sequences are the same."""
    log = tmp_path / "beams.json"
    assert main(["generate", "--prompt", PROMPT, "--num-beams", "4", "--num-return-sequences", "2",
                 "--length-penalty", "0.8", "--early-stopping", "true", "--max-new-tokens", "16",
                 "--compare-hf", "--verbose", "--json-log", str(log)]) == 0
    captured = capsys.readouterr()
    assert "hypothesis 2" in captured.out and "beam steps per target pass" in captured.out
    assert "same sequences as HF's beam search" in captured.err
    data = json.loads(log.read_text())
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), num_beams=4, num_return_sequences=2,
                          length_penalty=0.8, early_stopping=True, max_new_tokens=16, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          return_dict_in_generate=True, output_scores=True)
    assert [h["rank"] for h in data["hypotheses"]] == [1, 2]
    for h, seq, score in zip(data["hypotheses"], ref.sequences, ref.sequences_scores):
        assert h["token_ids"] == [t for t in seq[ids.shape[1]:].tolist() if t != tok.pad_token_id]
        assert abs(h["score"] - float(score)) < 1e-4
    assert data["compare_hf"]["same_sequences"] is True
    assert data["summary"]["steps"] == 16 and data["summary"]["target_forwards"] == len(data["summary"]["depths"])


def test_generate_beam_sampling_with_a_seed_equals_hf(tmp_path, capsys):
    """``--num-beams 3 --mode sample --seed 7``: HF's beam sampling under that seed (``--compare-hf``
    says the same, and the hypotheses are those of ``generate(num_beams=3, do_sample=True)`` after
    ``torch.manual_seed(7)``)."""
    log = tmp_path / "beams.json"
    argv = ["generate", "--prompt", PROMPT, "--num-beams", "3", "--mode", "sample", "--seed", "7", "--temperature", "0.8",
            "--top-p", "0.95", "--max-new-tokens", "12", "--compare-hf", "--json-log", str(log)]
    assert main(argv) == 0
    assert "same sequences as HF's beam search" in capsys.readouterr().err
    data = json.loads(log.read_text())
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    torch.manual_seed(7)
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=True, temperature=0.8, top_k=0,
                          top_p=0.95, max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert data["hypotheses"][0]["token_ids"] == [t for t in ref[0, ids.shape[1]:].tolist() if t != tok.pad_token_id]
    torch.manual_seed(8)
    other = target.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=True, temperature=0.8,
                            top_k=0, top_p=0.95, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    assert not torch.equal(other, ref)  # the seed decides the draw


def test_generate_beam_search_bad_options(capsys):
    cases = [
        (["generate", "--prompt", "x", "--num-beams", "2", "--mode", "sample", "--compare-hf"], "give --seed"),
        (["generate", "--prompt", "x", "--num-beams", "2", "--num-return-sequences", "3"], "at most --num-beams"),
        (["generate", "--prompt", "x", "--compare-hf"], "--num-beams 2 or more"),
        (["generate", "--prompt", "x", "--num-beams", "0"], "expected an integer >= 1"),
        (["generate", "--prompt", "x", "--num-beams", "2", "--max-new-tokens", "5000"], "position limit"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("specbeam generate: error:")]
        assert len(errors) == 1 and message in errors[0], (argv, errors)


def test_generate_with_a_draft_embedding_padded_to_another_size(tmp_path, capsys):
    """A draft with the target's tokenizer and an embedding of 4000 rows against the target's 4096
    (as Qwen2.5 0.5B against 14B+): the tokenizers show they are one vocabulary, so the draft is
    resized and the output is the target's (greedy and beams); without its tokenizer the mismatch is
    a one-line error."""
    draft = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "draft", dtype=torch.float32)
    draft.resize_token_embeddings(4000, mean_resizing=False)
    draft.save_pretrained(tmp_path / "bare")
    draft.save_pretrained(tmp_path / "with_tokenizer")
    AutoTokenizer.from_pretrained(DEMO_DIR / "target").save_pretrained(tmp_path / "with_tokenizer")
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    for beams in ("1", "3"):
        log = tmp_path / f"run{beams}.json"
        assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--dtype", "float32", "--num-beams", beams,
                     "--draft", str(tmp_path / "with_tokenizer"), "--json-log", str(log)]) == 0
        data = json.loads(log.read_text())
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              num_beams=int(beams), pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        got = data["output_token_ids"] if beams == "1" else data["hypotheses"][0]["token_ids"]
        assert got == ref and len(ref) == 12, (beams, got, ref)  # the whole output (no EOS within 12 tokens here)
    capsys.readouterr()
    assert main(["generate", "--prompt", PROMPT, "--draft", str(tmp_path / "bare")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("specbeam generate: error:")]
    assert len(errors) == 1 and "draft has 4000 tokens, target has 4096" in errors[0], errors
