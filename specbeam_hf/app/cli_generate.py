"""``specbeam generate``: one prompt continued by exact speculative decoding (``--num-beams B``:
exact speculative beam search, :mod:`.cli_beam`).

The models load quietly; one short untimed generation warms both up before the timed one (the
first forward of a fresh process pays for allocations and kernel choices), so the tokens/s reported
are warm; ``--no-warmup`` times the cold run instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import verbose as view
from .errors import UsageError, one_line
from .models import DEMO_DRAFT, DEMO_TARGET, DTYPES, display_name, load_pair
from .options import HelpFormatter, any_int, non_negative_int, positive_int, temperature, top_p
from .version import version

MODES = ("greedy", "sample")
DRAFTERS = {"chain": "draft_model", "tree": "draft_tree", "lookup": "prompt_lookup"}
WARMUP_TOKENS = 8


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate a continuation of a prompt with speculative decoding",
        description="Generate a continuation of --prompt with exact speculative decoding (draft model + target model). "
                    "Without --target/--draft the shipped demo pair is used: two tiny models trained on Python's "
                    "standard library, so they continue Python code and nothing else.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--prompt", help="the text to continue (required, here or in --config)")
    p.add_argument("--target", default=str(DEMO_TARGET), help="target model: a local folder or a model-hub name "
                                                             "(default: the shipped demo target)")
    p.add_argument("--draft", default=str(DEMO_DRAFT), help="draft model: a local folder or a model-hub name "
                                                           "(default: the shipped demo draft)")
    p.add_argument("--mode", choices=MODES, default="greedy",
                   help="greedy (argmax, output equals the target's own greedy search) or sample")
    p.add_argument("--drafter", choices=tuple(DRAFTERS), default="chain",
                   help="chain: the draft model proposes one chain of tokens; tree: a token tree, --tree-width "
                        "tokens per node; lookup: chains copied from the prompt's own n-grams (no draft forwards)")
    p.add_argument("--draft-length", "--gamma", dest="draft_length", type=positive_int, default=4, metavar="GAMMA",
                   help="draft tokens proposed per iteration (γ; the tree's depth with --drafter tree)")
    p.add_argument("--tree-width", type=positive_int, default=None, metavar="W",
                   help="--drafter tree: top tokens offered per tree node (default 3)")
    p.add_argument("--adaptive-length", action="store_true",
                   help="each iteration drafts the length (0 .. γ) measured cheapest per token so far")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=temperature, default=None, metavar="T",
                   help="sampling temperature (sample mode; default 1.0)")
    p.add_argument("--top-k", type=non_negative_int, default=None, metavar="K",
                   help="keep the K most likely tokens (sample mode; default 0 = off)")
    p.add_argument("--top-p", type=top_p, default=None, metavar="P",
                   help="nucleus sampling mass (sample mode; default 1 = off)")
    p.add_argument("--seed", type=any_int, default=None, metavar="S", help="random seed of the sampler (sample mode)")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message in the target tokenizer's chat template")
    p.add_argument("--system-prompt", default=None, metavar="TEXT", help="--chat: a system message before the prompt")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype both models are loaded in")
    p.add_argument("--draft-dtype", choices=DTYPES, default=None,
                   help="load the draft in this dtype instead (e.g. bfloat16 beside a float32 target: faster drafts "
                        "on CPUs with AVX512-BF16 or AMX; the output is the target's either way; default: --dtype)")
    p.add_argument("--device", default="cpu", help="where both models run: cpu, cuda or cuda:N")
    p.add_argument("--num-beams", type=positive_int, default=1, metavar="B",
                   help="beam search with B beams (exact speculative beam search: the hypotheses of the target's own "
                        "generate(num_beams=B)); 1 = speculative decoding of one sequence")
    p.add_argument("--num-return-sequences", type=positive_int, default=1, metavar="R",
                   help="beam search: hypotheses to print (<= B)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="L", help="beam search: HF's length_penalty")
    p.add_argument("--early-stopping", choices=["false", "true", "never"], default="false",
                   help="beam search: HF's early_stopping")
    p.add_argument("--compare-hf", action="store_true",
                   help="beam search: also run HF's own beam search, report whether the sequences are the same and "
                        "the speed-up (exit status 1 if they differ)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help=f"run {WARMUP_TOKENS} untimed tokens first, so the timing is warm (default: on)")
    p.add_argument("--verbose", "-v", action=argparse.BooleanOptionalAction, default=False,
                   help="show every iteration (accepted / corrected / bonus / rejected tokens; marked by symbols too "
                        "when stdout is not a terminal) and a statistics table (default: off)")
    p.add_argument("--json-log", default=None, metavar="FILE",
                   help="write options, prompt, output, summary and per-iteration records to this JSON file")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file of these options; command-line flags override it")
    return p


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


def _check_args(args) -> None:
    """Every check that needs no model, so bad input fails before anything loads."""
    if args.prompt is None:
        raise UsageError("no prompt given: pass --prompt TEXT (or 'prompt:' in --config)")
    if args.prompt == "":
        raise UsageError("empty prompt: --prompt needs some text to continue")
    if args.json_log is not None:
        log_dir = Path(args.json_log).expanduser().resolve().parent
        if not log_dir.is_dir():
            raise UsageError(f"--json-log: folder {log_dir} does not exist")
    if args.system_prompt is not None and not args.chat:
        raise UsageError("--system-prompt goes into the chat template: add --chat")
    if args.tree_width is not None and args.drafter != "tree":
        raise UsageError("--tree-width shapes token trees: add --drafter tree")
    if args.num_beams > 1 and (args.drafter != "chain" or args.adaptive_length):
        raise UsageError("beam search (--num-beams > 1) drafts its own trees: --drafter and --adaptive-length "
                         "apply to --num-beams 1")
    if args.num_beams > 1 and args.mode == "sample" and args.compare_hf and args.seed is None:
        raise UsageError("--compare-hf with beam sampling compares the draws of one seed: give --seed")
    if args.num_beams == 1 and args.compare_hf:
        raise UsageError("--compare-hf compares beam searches: give --num-beams 2 or more")
    if args.num_return_sequences > args.num_beams:
        raise UsageError(f"--num-return-sequences ({args.num_return_sequences}) must be at most "
                         f"--num-beams ({args.num_beams})")


def prompt_ids_of(args, tokenizer) -> list[int]:
    """The prompt's token ids: the text itself, or with ``--chat`` the rendered chat template."""
    if not args.chat:
        ids = tokenizer(args.prompt)["input_ids"]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"--chat: the tokenizer of {display_name(args.target)} has no chat template; "
                             "drop --chat, or use a chat model's folder as --target")
        messages = [{"role": "user", "content": args.prompt}]
        if args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects system messages, for one
            raise UsageError(f"--chat: the chat template fails: {one_line(exc)}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError("empty prompt: the prompt tokenizes to no tokens")
    return list(ids)


def _assistant(args, pair):
    from specbeam_hf import SpecBeam

    options = dict(pair.draft_options, drafter=DRAFTERS[args.drafter])
    if args.tree_width is not None:
        options["tree_width"] = args.tree_width
    if args.adaptive_length:
        options["adaptive_draft"] = True
    try:
        assistant = SpecBeam(pair.draft, num_draft_tokens=args.draft_length, **options)
        return assistant, assistant.engine_for(pair.target)
    except ValueError as exc:  # e.g. the two vocabularies differ
        raise UsageError(one_line(exc)) from None


def run(args) -> int:
    from rich.console import Console

    from specbeam_hf.rope import rope_pinned

    from .models import check_device

    _check_args(args)
    try:
        params = _sampling_params(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    err = Console(stderr=True, highlight=False)
    if args.mode == "greedy":
        sampling_only = ("temperature", "top_k", "top_p", "seed")
        ignored = [f"--{n.replace('_', '-')}" for n in sampling_only if getattr(args, n) is not None]
        if ignored:
            err.print(
                f"note: {', '.join(ignored)} only apply with --mode sample; greedy decoding ignores them",
                style="yellow",
            )

    started = time.perf_counter()
    check_device(args.device)
    pair = load_pair(args.target, args.draft, args.dtype, args.draft_dtype, args.device)
    assistant, engine = _assistant(args, pair)
    load_seconds = time.perf_counter() - started
    tokenizer, target = pair.tokenizer, pair.target
    prompt_ids = prompt_ids_of(args, tokenizer)
    eos_ids = pair.eos_ids
    if args.num_beams > 1:
        from .cli_beam import run_beams

        return run_beams(args, tokenizer, target, assistant, prompt_ids, eos_ids, load_seconds)

    def generate(max_new_tokens: int, on_tokens=None):
        with rope_pinned(target, len(prompt_ids), len(prompt_ids) + max_new_tokens):  # longrope: HF's frequencies
            (request,) = engine.generate(
                [prompt_ids], params=params, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids, on_tokens=on_tokens
            )
        return request

    warmup_seconds = 0.0
    if args.warmup:  # untimed: the first forwards of a fresh process pay for allocations
        warm_started = time.perf_counter()
        try:
            generate(min(WARMUP_TOKENS, args.max_new_tokens))
        except ValueError as exc:  # the request itself is invalid, e.g. longer than the models' positions
            raise UsageError(one_line(exc)) from None
        warmup_seconds = time.perf_counter() - warm_started

    out = Console(highlight=False, soft_wrap=True)
    streamer = None
    if args.verbose:
        symbols = not out.is_terminal
        out.print(view.legend(symbols))
        width = len(str(args.draft_length))
        out.print(f"{'step':>4}  {'acc/γ':^{2 * width + 1}}  tokens", style="dim")

        def on_tokens(request, new_tokens):
            records = engine.stats.records  # this run's only: reset after the warm-up
            out.print(view.iteration_line(tokenizer, records[-1], width, symbols, step=len(records)))
    else:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)

        def on_tokens(request, new_tokens):
            streamer.put(_tensor(new_tokens))

    engine.stats.reset()
    started = time.perf_counter()
    try:
        request = generate(args.max_new_tokens, on_tokens)
    except ValueError as exc:  # the request itself is invalid, e.g. longer than the models' positions
        if streamer is not None:
            streamer.end()
        raise UsageError(one_line(exc)) from None
    seconds = time.perf_counter() - started
    if streamer is not None:
        streamer.end()

    text = tokenizer.decode(request.output, skip_special_tokens=True)
    summary = view.summary(engine.stats, len(request.output), seconds)
    if args.verbose:
        out.rule("output")
        out.print(text, markup=False)
        out.rule()
        out.print(view.summary_table(summary, args, request.finish_reason, load_seconds, warmup_seconds))
    else:
        err.print(view.summary_line(summary, request.finish_reason), style="dim", soft_wrap=True)

    if args.json_log is not None:
        prompt = tokenizer.decode(prompt_ids) if args.chat else args.prompt
        log = view.json_log(args, prompt, prompt_ids, request, tokenizer, engine, summary, text, version())
        try:
            Path(args.json_log).expanduser().write_text(
                json.dumps(log, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        except OSError as exc:
            raise UsageError(f"cannot write --json-log {args.json_log}: {exc.strerror or exc}") from None
        if args.verbose:
            out.print(f"wrote {args.json_log}", style="dim")
    return 0


def _tensor(ids):
    import torch

    return torch.tensor(ids)
