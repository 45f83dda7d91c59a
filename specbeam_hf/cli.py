"""The ``specbeam`` command line.

    specbeam generate --prompt "def fibonacci(n):" --draft-length 4 --max-new-tokens 64
    specbeam generate --prompt "import os" --mode sample --temperature 0.8 --seed 1 --verbose
    specbeam generate --prompt "def parse(" --num-beams 4 --num-return-sequences 2 --compare-hf
    specbeam generate --config examples/config.yaml --json-log run.json
    specbeam evaluate [--quick] [--out runs/eval]      # modes compared, γ and tree sweeps: JSON + PNG
    specbeam dashboard [--host 127.0.0.1] [--port 8765] # watch iterations in a browser, browse runs

Without ``--target``/``--draft`` the shipped demo pair (``specbeam_hf/demo_models``) is used. A
``--target``/``--draft`` that is a local folder is loaded from there; any other value is taken as a
model-hub name and goes to ``from_pretrained`` (offline, that works only for models in the local
cache). Generation runs through the core engine (``SpecBeam(draft).engine_for(target)``).

Options can also come from a YAML file (``--config``) holding the same option names (dashes or
underscores); flags given on the command line override the file. Exit status: 0 on success, 2
for bad input (options, prompt, model folders, config), 1 when generation itself fails.

Each subcommand is one ``_add_<name>_parser`` + ``_cmd_<name>`` pair registered in
``_COMMANDS``; ``serve`` and ``bench`` are meant to join the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DEMO_MODELS = Path(__file__).parent / "demo_models"
DEMO_TARGET = DEMO_MODELS / "target"
DEMO_DRAFT = DEMO_MODELS / "draft"

DTYPES = ("float32", "bfloat16")
MODES = ("greedy", "sample")

# Colours of the --verbose view, one per kind of token in an iteration.
STYLE_ACCEPTED = "green"
STYLE_RECOVERED = "bold red"
STYLE_BONUS = "bold cyan"
STYLE_REJECTED = "dim strike"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# --------------------------------------------------------------------------- option types
def _int_at_least(low: int | None):
    """An argparse type: an integer, at least ``low`` unless ``low`` is None."""
    wanted = "an integer" if low is None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int, _int = _int_at_least(1), _int_at_least(0), _int_at_least(None)


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``prog: error: message``) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate a continuation of a prompt with speculative decoding",
        description="Generate a continuation of --prompt with exact speculative decoding (draft model + target model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prompt", help="the text to continue (required, here or in --config)")
    p.add_argument("--target", default=str(DEMO_TARGET), help="target model: a local folder or a model-hub name")
    p.add_argument("--draft", default=str(DEMO_DRAFT), help="draft model: a local folder or a model-hub name")
    p.add_argument("--mode", choices=MODES, default="greedy", help="greedy (argmax, output equals the target's own greedy search) or sample")
    p.add_argument("--draft-length", "--gamma", dest="draft_length", type=_positive_int, default=4, metavar="GAMMA",
                   help="draft tokens proposed per iteration (γ)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=_temperature, default=None, metavar="T", help="sampling temperature (sample mode; default 1.0)")
    p.add_argument("--top-k", type=_non_negative_int, default=None, metavar="K", help="keep the K most likely tokens (sample mode; 0 = off)")
    p.add_argument("--top-p", type=_top_p, default=None, metavar="P", help="nucleus sampling mass (sample mode; 1 = off)")
    p.add_argument("--seed", type=_int, default=None, metavar="S", help="random seed of the sampler (sample mode)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype both models are loaded in")
    p.add_argument("--draft-dtype", choices=DTYPES, default=None,
                   help="load the draft in this dtype instead (e.g. bfloat16 beside a float32 target: faster drafts on CPUs "
                        "with AVX512-BF16 or AMX; the output is the target's either way); default: --dtype")
    p.add_argument("--num-beams", type=_positive_int, default=1, metavar="B",
                   help="beam search with B beams (exact speculative beam search: the hypotheses of the target's own "
                        "generate(num_beams=B)); 1 = speculative decoding of one sequence")
    p.add_argument("--num-return-sequences", type=_positive_int, default=1, metavar="R", help="beam search: hypotheses to print (<= B)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="L", help="beam search: HF's length_penalty")
    p.add_argument("--early-stopping", choices=["false", "true", "never"], default="false", help="beam search: HF's early_stopping")
    p.add_argument("--compare-hf", action="store_true",
                   help="beam search: also run HF's own beam search, report whether the sequences are the same and the speed-up "
                        "(exit status 1 if they differ)")
    p.add_argument("--verbose", "-v", action=argparse.BooleanOptionalAction, default=False,
                   help="show every iteration (accepted / corrected / bonus / rejected tokens) and a statistics table")
    p.add_argument("--json-log", default=None, metavar="FILE",
                   help="write options, prompt, output, summary and per-iteration records to this JSON file")
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of these options; command-line flags override it")
    return p


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser, by name."""
    parser = _Parser(prog="specbeam", description="specbeam: exact speculative decoding for LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    subs = {name: add(subparsers) for name, (add, _) in _COMMANDS.items()}
    return parser, subs


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("specbeam")
    except Exception:  # not installed as a distribution
        return "unknown"


# --------------------------------------------------------------------------- config files
def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML file of ``parser``'s options; values are checked like command-line values."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")

    actions = _option_actions(parser)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise UsageError(f"config file {path}: unknown option {key!r} (known: {known})")
        if dest in values:
            raise UsageError(f"config file {path}: option {key!r} is given twice")
        values[dest] = _config_value(path, key, raw, action)
    return values


def _config_value(path: str, key: str, raw: Any, action: argparse.Action) -> Any:
    where = f"config file {path}: option {key!r}"
    if raw is None:
        return action.default
    if action.nargs == 0:  # a switch such as --verbose
        if not isinstance(raw, bool):
            raise UsageError(f"{where} must be true or false, got {raw!r}")
        return raw
    if isinstance(raw, (dict, list, bool)):
        raise UsageError(f"{where} must be a single value, got {raw!r}")
    value: Any = str(raw)
    if action.type is not None:
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise UsageError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


# --------------------------------------------------------------------------- models
def _looks_like_path(name: str) -> bool:
    """A value that can only mean a local folder (a model-hub name is ``name`` or ``org/name``)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return name.count("/") > 1


def _check_model_location(name: str, role: str, default: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{role} model {name!r} is a file; expected a model folder (with config.json) or a model-hub name")
        if not (path / "config.json").is_file():
            raise UsageError(f"{role} model folder {name} has no config.json; is it a saved transformers model?")
        return
    if name == default:
        raise UsageError(
            f"the demo {role} model folder {name} does not exist (the shipped demo models are missing); "
            f"pass --target and --draft"
        )
    if _looks_like_path(name):
        raise UsageError(f"{role} model folder {name} does not exist")


def _hub_hint(name: str) -> str:
    return "" if Path(name).expanduser().exists() else f" ({name!r} is no local folder, so it was looked up as a model-hub name; offline, only cached models load)"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().exists() else name)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load"
        raise UsageError(f"cannot load the tokenizer of {name!r}: {_first_line(exc)}{_hub_hint(name)}") from None


def load_model(name: str, role: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    location = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype))
    except Exception as exc:
        raise UsageError(f"cannot load the {role} model {name!r}: {_first_line(exc)}{_hub_hint(name)}") from None
    return model.eval()


def _vocab_resize(draft_name: str, draft, target, target_tokenizer) -> dict:
    """``{"vocab_size": ...}`` for a draft whose embedding is padded to another size than the target's
    around the same tokenizer (Qwen2.5 0.5B-7B: 151,936 rows, 14B+: 152,064); else ``{}``, and a
    real mismatch stays the engine's error."""
    rows = target.get_output_embeddings().weight.shape[0]
    if draft.get_output_embeddings().weight.shape[0] == rows:
        return {}
    try:
        same = load_tokenizer(draft_name).get_vocab() == target_tokenizer.get_vocab()
    except UsageError:  # no tokenizer beside the draft: nothing shows they share one
        same = False
    return {"vocab_size": int(rows)} if same else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- generate
def _sampling_params(args):
    from specbeam_core import SamplingParams

    if args.mode == "greedy":
        return SamplingParams(do_sample=False)
    return SamplingParams(
        do_sample=True,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
    )


def _eos_ids(tokenizer, model) -> list[int]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    return ids


def _token_text(tokenizer, token: int) -> str:
    """One token as readable text: whitespace made visible, partial UTF-8 shown as bytes."""
    text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" in text:  # a piece of a multi-byte character
        piece = tokenizer.convert_ids_to_tokens(token)
        text = piece if isinstance(piece, str) else text
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def _classify(record, row: int = 0) -> dict[str, list[int]]:
    """Split one row of a step into accepted drafts, the recovered or bonus token, and rejected drafts."""
    drafted = record.drafted_tokens[row]
    k = record.num_accepted[row]
    emitted = record.emitted_tokens[row]
    last = emitted[k:]  # the target's own token (absent if a stop condition cut the step short)
    bonus = bool(record.bonus[row])
    return {
        "accepted": emitted[:k],
        "recovered": [] if bonus else last,
        "bonus": last if bonus else [],
        "rejected": drafted[k:],
    }


def _legend():
    from rich.text import Text

    legend = Text("legend: ")
    legend.append("accepted draft", style=STYLE_ACCEPTED)
    legend.append("  ")
    legend.append("corrected by target", style=STYLE_RECOVERED)
    legend.append("  ")
    legend.append("bonus (all drafts accepted)", style=STYLE_BONUS)
    legend.append("  ")
    legend.append("rejected draft", style=STYLE_REJECTED)
    return legend


def _iteration_line(tokenizer, record, gamma_width: int):
    from rich.text import Text

    parts = _classify(record)
    drafted = len(record.drafted_tokens[0])
    line = Text(f"{record.step:>4}  {record.num_accepted[0]:>{gamma_width}}/{drafted:<{gamma_width}}  ", style="dim")
    for kind, style in (("accepted", STYLE_ACCEPTED), ("recovered", STYLE_RECOVERED), ("bonus", STYLE_BONUS)):
        for token in parts[kind]:
            line.append(_token_text(tokenizer, token), style=style)
    if parts["rejected"]:
        line.append("  ")
        for token in parts["rejected"]:
            line.append(_token_text(tokenizer, token), style=STYLE_REJECTED)
    return line


def _summary(stats, tokens: int, seconds: float) -> dict[str, Any]:
    summary = dict(stats.summary())
    summary.update(
        generated_tokens=tokens,
        wall_seconds=seconds,
        # decoding time only (the engine's own step time): printing --verbose lines is not generation
        tokens_per_second=tokens / stats.seconds if stats.seconds > 0 else 0.0,
    )
    return summary


def _summary_line(summary: dict[str, Any], finish_reason: str | None) -> str:
    return (
        f"{summary['generated_tokens']} tokens in {summary['wall_seconds']:.2f} s "
        f"({summary['tokens_per_second']:.1f} tokens/s) | acceptance rate {summary['acceptance_rate']:.1%} | "
        f"mean accepted length {summary['mean_accepted_length']:.2f} | "
        f"{summary['target_forwards']} target forwards | finish: {finish_reason}"
    )


def _summary_table(summary: dict[str, Any], args, finish_reason: str | None, load_seconds: float):
    from rich.table import Table

    table = Table(title="specbeam generate", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("generated tokens", f"{summary['generated_tokens']}"),
        ("wall time (incl. printing)", f"{summary['wall_seconds']:.3f} s"),
        ("decoding time", f"{summary['seconds']:.3f} s"),
        ("tokens/s", f"{summary['tokens_per_second']:.1f}"),
        ("acceptance rate", f"{summary['acceptance_rate']:.1%} ({summary['accepted']}/{summary['drafted']} drafts)"),
        ("mean accepted length", f"{summary['mean_accepted_length']:.2f} tokens / target forward"),
        ("iterations (steps)", f"{summary['steps']}"),
        ("target forwards", f"{summary['target_forwards']}"),
        ("draft forwards", f"{summary['draft_forwards']}"),
        ("corrected / bonus tokens", f"{summary['recovered']} / {summary['bonus']}"),
        ("draft length γ", f"{args.draft_length}"),
        ("mode", args.mode),
        ("finish reason", f"{finish_reason}"),
        ("model load time", f"{load_seconds:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _json_log(args, prompt_ids, request, tokenizer, engine, summary, text: str) -> dict[str, Any]:
    stats = json.loads(engine.stats.to_json())
    steps = stats["steps"]
    for step, record in zip(steps, engine.stats.records):
        step["drafted_strings"] = [[_token_text(tokenizer, t) for t in row] for row in record.drafted_tokens]
        step["emitted_strings"] = [[_token_text(tokenizer, t) for t in row] for row in record.emitted_tokens]
        parts = _classify(record)
        step["kinds"] = [{kind: [_token_text(tokenizer, t) for t in toks] for kind, toks in parts.items()}]
    options = {k: v for k, v in vars(args).items() if k not in ("command", "_handler", "_argv")}
    return {
        "specbeam_version": _version(),
        "command": "generate",
        "options": options,
        "prompt": args.prompt,
        "prompt_token_ids": list(prompt_ids),
        "output_text": text,
        "output_token_ids": list(request.output),
        "finish_reason": request.finish_reason,
        "summary": summary,
        "steps": steps,
    }


def _cmd_generate(args) -> int:
    from rich.console import Console

    if args.prompt is None:
        raise UsageError("no prompt given: pass --prompt TEXT (or 'prompt:' in --config)")
    if args.prompt == "":
        raise UsageError("empty prompt: --prompt needs some text to continue")
    if args.json_log is not None:
        log_dir = Path(args.json_log).expanduser().resolve().parent
        if not log_dir.is_dir():
            raise UsageError(f"--json-log: folder {log_dir} does not exist")
    for role, name, default in (("target", args.target, str(DEMO_TARGET)), ("draft", args.draft, str(DEMO_DRAFT))):
        _check_model_location(name, role, default)
    try:
        params = _sampling_params(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    if args.num_beams > 1 and args.mode == "sample" and args.compare_hf and args.seed is None:
        raise UsageError("--compare-hf with beam sampling compares the draws of one seed: give --seed")
    if args.num_beams == 1 and args.compare_hf:
        raise UsageError("--compare-hf compares beam searches: give --num-beams 2 or more")
    err = Console(stderr=True, highlight=False)
    if args.mode == "greedy":
        ignored = [f"--{n.replace('_', '-')}" for n in ("temperature", "top_k", "top_p", "seed") if getattr(args, n) is not None]
        if ignored:
            err.print(f"note: {', '.join(ignored)} only apply with --mode sample; greedy decoding ignores them", style="yellow")

    from specbeam_hf import SpecBeam
    from specbeam_hf.rope import rope_pinned

    started = time.perf_counter()
    tokenizer = load_tokenizer(args.target)
    target = load_model(args.target, "target", args.dtype)
    draft = load_model(args.draft, "draft", args.draft_dtype or args.dtype)
    try:
        assistant = SpecBeam(draft, num_draft_tokens=args.draft_length, **_vocab_resize(args.draft, draft, target, tokenizer))
        engine = assistant.engine_for(target)
    except ValueError as exc:  # e.g. the two vocabularies differ
        raise UsageError(_one_line(exc)) from None
    load_seconds = time.perf_counter() - started

    prompt_ids = tokenizer(args.prompt)["input_ids"]
    if not prompt_ids:
        raise UsageError("empty prompt: the prompt tokenizes to no tokens")
    eos_ids = _eos_ids(tokenizer, target)
    if args.num_beams > 1:
        from .cli_beam import run_beams

        return run_beams(args, tokenizer, target, assistant, prompt_ids, eos_ids, load_seconds)

    out = Console(highlight=False, soft_wrap=True)
    if args.verbose:
        out.print(_legend())
        out.print(f"{'step':>4}  {'acc/γ':^{2 * len(str(args.draft_length)) + 1}}  tokens", style="dim")
        width = len(str(args.draft_length))

        def on_tokens(request, new_tokens):
            out.print(_iteration_line(tokenizer, engine.stats.records[-1], width))

        streamer = None
    else:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)

        def on_tokens(request, new_tokens):
            import torch

            streamer.put(torch.tensor(new_tokens))

    engine.stats.reset()
    started = time.perf_counter()
    try:
        with rope_pinned(target, len(prompt_ids), len(prompt_ids) + args.max_new_tokens):  # longrope: HF's frequencies
            (request,) = engine.generate(
                [prompt_ids], params=params, max_new_tokens=args.max_new_tokens, eos_token_ids=eos_ids, on_tokens=on_tokens
            )
    except ValueError as exc:  # the request itself is invalid, e.g. longer than the models' positions
        if streamer is not None:
            streamer.end()
        raise UsageError(_one_line(exc)) from None
    seconds = time.perf_counter() - started
    if streamer is not None:
        streamer.end()

    text = tokenizer.decode(request.output, skip_special_tokens=True)
    summary = _summary(engine.stats, len(request.output), seconds)
    if args.verbose:
        out.rule("output")
        out.print(text, markup=False)
        out.rule()
        out.print(_summary_table(summary, args, request.finish_reason, load_seconds))
    else:
        err.print(_summary_line(summary, request.finish_reason), style="dim", soft_wrap=True)

    if args.json_log is not None:
        log = _json_log(args, prompt_ids, request, tokenizer, engine, summary, text)
        try:
            Path(args.json_log).expanduser().write_text(json.dumps(log, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write --json-log {args.json_log}: {exc.strerror or exc}") from None
        if args.verbose:
            out.print(f"wrote {args.json_log}", style="dim")
    return 0


# --------------------------------------------------------------------------- evaluate
def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers >= 1 ("" for none)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _mode_list(text: str) -> tuple[str, ...]:
    from specbeam_hf.evaluation.modes import MODES

    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in MODES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected modes from {', '.join(MODES)}, got {text!r}")
    return values


def _add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="compare greedy, beam, speculative, speculative beam and tree decoding (speed, acceptance, quality, diversity)",
        description=(
            "Evaluate the decoding modes on a reference task built from the demo models' held-out stdlib files: "
            "tokens/s, acceptance, perplexity under the target, BLEU/ROUGE against the reference continuations, "
            "distinct-n and self-BLEU across beams; plus a γ sweep and a tree-shape sweep. Prints tables, writes "
            "JSON and PNG plots to --out. Unset options take the defaults below, or with --quick a CI-sized run's."
        ),
    )
    p.add_argument("--target", default=str(DEMO_TARGET), help="target model: a local folder or a model-hub name (default: the demo target)")
    p.add_argument("--draft", default=str(DEMO_DRAFT), help="draft model: a local folder or a model-hub name (default: the demo draft)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype both models are loaded in (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 prompts, 12 tokens, 2 beams, small sweeps")
    p.add_argument("--num-prompts", type=_positive_int, default=None, metavar="N", help="held-out prompts (default 8; quick 2)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N", help="tokens per prompt (default 40; quick 12)")
    p.add_argument("--modes", type=_mode_list, default=None, metavar="LIST", help="comma-separated modes (default all five)")
    p.add_argument("--gamma", type=_positive_int, default=None, help="draft length of speculative chains, depth of trees (default 4)")
    p.add_argument("--num-beams", type=_positive_int, default=None, metavar="B", help="beams of the beam modes (default 4; quick 2)")
    p.add_argument("--tree-width", type=_positive_int, default=None, metavar="W", help="tree width of the tree mode (default 3)")
    p.add_argument("--tree-budget", type=_positive_int, default=None, metavar="N", help="tree nodes of the tree mode (default width × depth)")
    p.add_argument("--gammas", type=_int_list, default=None, metavar="LIST", help="γ sweep values ('' for none; default 1,2,3,4,6,8)")
    p.add_argument("--tree-widths", type=_int_list, default=None, metavar="LIST", help="tree sweep widths (default 2,3)")
    p.add_argument("--tree-budgets", type=_int_list, default=None, metavar="LIST", help="tree sweep node budgets ('' for none; default 4,8,12)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timing: best of this many passes per mode (default 2; quick 1)")
    p.add_argument("--threads", type=_non_negative_int, default=None,
                   help="torch threads (default 1: steadier on a shared machine; 0: torch's default)")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="folder for eval[_quick].json and the PNG plots (default: %(default)s)")
    p.add_argument("--track", "--wandb", dest="track", action="store_true",
                   help="also log to Weights & Biases, offline (needs pip install wandb; nothing is sent)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar (default: on)")
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of these options; command-line flags override it")
    return p


def _eval_config(args):
    from specbeam_hf.evaluation import EvalConfig

    fields = ("num_prompts", "max_new_tokens", "modes", "gamma", "num_beams", "tree_width", "tree_budget", "gammas",
              "tree_widths", "tree_budgets", "repeats", "threads")
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    common = dict(target=args.target, draft=args.draft, dtype=args.dtype, out=Path(args.out).expanduser(), track=args.track,
                  extra={"argv": list(getattr(args, "_argv", []))})
    config = EvalConfig.quick_defaults(**common, **given) if args.quick else EvalConfig(**common, **given)
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return config


def _cmd_evaluate(args) -> int:
    from rich.console import Console

    from specbeam_hf.evaluation import evaluate
    from specbeam_hf.evaluation.report import rich_tables
    from specbeam_hf.evaluation.tracking import TrackingUnavailable

    config = _eval_config(args)
    for role, name, default in (("target", config.target, str(DEMO_TARGET)), ("draft", config.draft, str(DEMO_DRAFT))):
        _check_model_location(name, role, default)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {config.out}: {exc.strerror or exc}") from None
    try:
        results = evaluate(config, progress=args.progress)
    except TrackingUnavailable as exc:
        raise UsageError(str(exc)) from None
    console = Console(highlight=False)
    for table in rich_tables(results):
        console.print(table)
    files = [results["files"]["json"], *results["files"]["plots"]]
    console.print(f"wrote {', '.join(files)} ({results['meta']['seconds']:.0f} s)", style="dim")
    return 0


# --------------------------------------------------------------------------- dashboard
def _add_dashboard_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dashboard",
        help="a web page to watch speculative decoding step by step and browse saved runs and plots",
        description=(
            "Serve a dashboard: pick a prompt and a mode and watch every iteration (accepted, corrected, bonus and "
            "rejected draft tokens in colour) with acceptance statistics; browse saved JSON runs and benchmark plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    p.add_argument("--port", type=_int_at_least(0), default=8765, help="TCP port (0: any free port)")
    p.add_argument("--target", default=str(DEMO_TARGET), help="target model: a local folder or a model-hub name")
    p.add_argument("--draft", default=str(DEMO_DRAFT), help="draft model: a local folder or a model-hub name")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype both models are loaded in")
    p.add_argument("--runs-dir", action="append", default=None, metavar="DIR",
                   help="folders of saved JSON runs and PNG plots to browse (repeatable; default: benchmarks/results and runs/)")
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of these options; command-line flags override it")
    return p


def _cmd_dashboard(args) -> int:
    for role, name, default in (("target", args.target, str(DEMO_TARGET)), ("draft", args.draft, str(DEMO_DRAFT))):
        _check_model_location(name, role, default)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("the dashboard needs fastapi and uvicorn: pip install 'specbeam[dashboard]'") from None
    from specbeam_hf.dashboard.app import create_app, default_runs_dirs

    runs_dirs = [Path(d).expanduser() for d in args.runs_dir] if args.runs_dir else default_runs_dirs()
    app = create_app(args.target, args.draft, dtype=args.dtype, runs_dirs=runs_dirs)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"specbeam dashboard: warning: listening on {args.host}, not only on loopback; anyone who can reach it can run generations",
              file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    async def announce_and_serve():
        # print the bound address once the socket is open (--port 0 picks a free port)
        import asyncio

        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"specbeam dashboard: serving on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
        await task

    import asyncio

    asyncio.run(announce_and_serve())
    return 0


# name -> (add the subcommand's parser, run it). serve and bench will be added here.
# --------------------------------------------------------------------------- serve
def _add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from specbeam_vllm.serve import add_arguments

    p = subparsers.add_parser(
        "serve", help="start vLLM's OpenAI-compatible server with specbeam as its speculative proposer",
        description="Start vLLM's OpenAI-compatible server with specbeam set up. Flags not listed here "
                    "(--max-model-len, --dtype, --tensor-parallel-size, ...) go to vLLM unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_arguments(p)


def _cmd_serve(args) -> int:
    from specbeam_vllm.serve import SetupError, run

    try:
        return run(args, args.vllm_args)
    except SetupError as exc:
        raise UsageError(str(exc)) from None


_COMMANDS: dict[str, tuple[Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "generate": (_add_generate_parser, _cmd_generate),
    "evaluate": (_add_evaluate_parser, _cmd_evaluate),
    "dashboard": (_add_dashboard_parser, _cmd_dashboard),
    "serve": (_add_serve_parser, _cmd_serve),
}
PASS_THROUGH = {"serve"}  # subcommands whose unknown flags belong to another program (vLLM)


# --------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file supplies defaults that the flags override."""
    parser, subs = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in PASS_THROUGH:
        args.vllm_args = unknown
    elif unknown:
        subs[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args._argv = list(sys.argv[1:] if argv is None else argv)
    config = getattr(args, "config", None)
    if config is not None:
        sub = subs[args.command]
        try:
            values = load_config(config, sub)
        except UsageError as exc:
            sub.error(str(exc))
        sub.set_defaults(**values)
        args, unknown = parser.parse_known_args(argv)
        if args.command in PASS_THROUGH:
            args.vllm_args = unknown
        args._argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``specbeam`` command line; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    run = _COMMANDS[args.command][1]
    prog = f"specbeam {args.command}"
    try:
        return run(args)
    except UsageError as exc:
        sys.stdout.flush()
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure while generating: one line, status 1
        sys.stdout.flush()
        print(f"{prog}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        if os.environ.get("SPECBEAM_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
