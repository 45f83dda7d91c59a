"""The ``specbeam generate`` command on the shipped demo pair: output equals the target's greedy
search, the JSON log, config files with flags overriding them, and one-line errors with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def _greedy_reference(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    return target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False)[0, ids.shape[1]:].tolist()


def test_drafter_flags_keep_the_targets_output(tmp_path):
    """--drafter tree (with --tree-width), --drafter lookup and --adaptive-length: the target's greedy output."""
    ref = None
    for flags in (["--drafter", "tree", "--tree-width", "2"], ["--drafter", "lookup"], ["--adaptive-length"]):
        log = tmp_path / "run.json"
        assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", *flags, "--json-log", str(log)]) == 0, flags
        data = json.loads(log.read_text())
        ref = ref or _greedy_reference(data["prompt_token_ids"], 12)
        assert data["output_token_ids"] == ref[: len(data["output_token_ids"])] and data["output_token_ids"], flags


def test_chat_template_and_system_prompt(tmp_path, capsys):
    """--chat renders the prompt (and --system-prompt) through the tokenizer's chat template; a
    tokenizer without one is a one-line error."""
    assert main(["generate", "--prompt", "hi", "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--system-prompt", "be brief"]) == 2
    assert "add --chat" in capsys.readouterr().err
    chat = tmp_path / "chat_target"
    chat.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (chat / name).symlink_to(DEMO_DIR / "target" / name)
    config = json.loads((DEMO_DIR / "target" / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    log = tmp_path / "chat.json"
    assert main(["generate", "--target", str(chat), "--prompt", "def f():", "--chat", "--system-prompt", "be brief",
                 "--max-new-tokens", "8", "--json-log", str(log)]) == 0
    data = json.loads(log.read_text())
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    expected = tok("<system>be brief\n<user>def f():\n<assistant>", add_special_tokens=False)["input_ids"]
    assert data["prompt_token_ids"] == expected
    assert data["output_token_ids"] == _greedy_reference(expected, 8)[: len(data["output_token_ids"])]


def test_piped_verbose_marks_token_kinds_with_symbols(capsys):
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--verbose"]) == 0
    out = capsys.readouterr().out  # not a terminal: colour alone would be lost
    assert "[✓ accepted draft]" in out and "[✗ rejected draft]" in out
    assert "[✓ " in out.split("tokens\n", 1)[1]  # the iteration lines themselves


def test_help_is_fast_quiet_and_names_no_paths():
    """``--help`` imports neither torch nor transformers, prints no absolute path and one default per option."""
    code = ("import sys; from specbeam_hf.app.cli import main\n"
            "try:\n    main(['generate', '--help'])\nfinally:\n"
            "    print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.rstrip().endswith("LIGHT"), out
    assert str(DEMO_DIR) not in out and "the shipped demo target" in out
    for option in out.split("\n  -")[1:]:
        assert " ".join(option.split()).count("default") <= 1, option


def test_bad_device_and_offline_hub_name_fail_at_once(monkeypatch, capsys):
    assert main(["generate", "--prompt", "x", "--device", "nonsense"]) == 2
    assert "unknown --device" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert main(["generate", "--prompt", "x", "--target", "no-such-org/no-such-model"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "offline" in errors[0] and "local model folder" in errors[0], errors
    assert time.perf_counter() - started < 10  # no retries


def test_evaluate_tables_fit_80_columns():
    from rich.console import Console

    from specbeam_hf.app.evaluation.report import rich_tables

    row = dict(mode="tree", label="tree gamma=4 width=3 budget=12", gamma=4, tree_width=3, tree_budget=12,
               tokens_per_s=125.8, speedup_vs_greedy=1.29, acceptance_rate=0.23, per_token_acceptance=0.906,
               tokens_per_target_pass=3.56, beam_steps_per_target_pass=1.01, exact=True, perplexity=1.89, bleu=14.61,
               rouge1=0.154, rouge2=0.107, rougeL=0.154, distinct_1=0.456, distinct_2=0.554, beam_distinct_1=0.195,
               beam_distinct_2=0.244, self_bleu=92.7)
    results = {"meta": {"config": {"num_prompts": 8, "max_new_tokens": 40, "dtype": "float32", "gamma": 4},
                        "threads": 1, "reference_perplexity": 9.17},
               "modes": [row, dict(row, mode="spec_beam", num_beams=4)], "gamma_sweep": [row], "tree_sweep": [row]}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    for table in rich_tables(results):
        console.print(table)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "tree 3×4/12" in text and "spec_beam B=4" in text


def test_evaluate_mode_names_match_the_evaluation():
    """The CLI checks --modes against its own copy of the names (so --help imports no torch)."""
    from specbeam_hf.app.cli import EVAL_MODES
    from specbeam_hf.app.evaluation.modes import MODES

    assert EVAL_MODES == MODES
