"""The ``specbeam`` command line.

    specbeam generate --prompt "class Stack:" --draft-length 4 --max-new-tokens 64
    specbeam generate --prompt "import os" --mode sample --temperature 0.8 --seed 1 --verbose
    specbeam generate --prompt "class Stack:" --num-beams 4 --num-return-sequences 2 --compare-hf
    specbeam generate --config examples/config.yaml --json-log run.json
    specbeam evaluate [--quick] [--out runs/eval]      # modes compared, γ and tree sweeps: JSON + PNG
    specbeam distill --target T --draft D --data DIR --out OUT [--minutes M]  # align a draft with its target
    specbeam dashboard [--host 127.0.0.1] [--port 8765] # watch iterations in a browser, browse runs
    specbeam serve --target T --draft D                 # vLLM's OpenAI server with specbeam

Without ``--target``/``--draft`` the shipped demo pair (``specbeam_hf/demo_models``) is used. A
``--target``/``--draft`` that is a local folder is loaded from there; any other value is taken as a
model-hub name and goes to ``from_pretrained`` (offline, that works only for models in the local
cache, and any other name fails at once). Generation runs through the core engine
(``SpecBeam(draft).engine_for(target)``).

Options can also come from a YAML file (``--config``) holding the same option names (dashes or
underscores); flags given on the command line override the file. Exit status: 0 on success, 2
for bad input (options, prompt, model folders, config), 1 when generation itself fails.

Each subcommand is one ``add_parser`` + ``run`` pair registered in ``COMMANDS``. Only the parser of
the subcommand being run is built, and nothing imports torch or transformers before a command runs,
so ``specbeam --help`` and ``specbeam COMMAND --help`` are fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config_file import load_config
from .errors import UsageError, one_line
from .models import DEMO_DRAFT, DEMO_TARGET, DTYPES, check_model_location
from .options import HelpFormatter, Parser, int_at_least, int_list, non_negative_int, positive_int
from .version import version

DEMO_HELP = {"target": "the shipped demo target", "draft": "the shipped demo draft"}


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=str(DEMO_TARGET),
                   help=f"target model: a local folder or a model-hub name (default: {DEMO_HELP['target']})")
    p.add_argument("--draft", default=str(DEMO_DRAFT),
                   help=f"draft model: a local folder or a model-hub name (default: {DEMO_HELP['draft']})")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype both models are loaded in")


# --------------------------------------------------------------------------- generate
def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    from .cli_generate import add_parser

    return add_parser(subparsers)


def _cmd_generate(args) -> int:
    from .cli_generate import run

    return run(args)


# --------------------------------------------------------------------------- evaluate
EVAL_MODES = ("greedy", "beam", "speculative", "spec_beam", "tree")  # specbeam_hf.app.evaluation.modes.MODES


def _mode_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in EVAL_MODES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected modes from {', '.join(EVAL_MODES)}, got {text!r}")
    return values


def _add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="compare greedy, beam, speculative, speculative beam and tree decoding "
        "(speed, acceptance, quality, diversity)",
        description=(
            "Evaluate the decoding modes on a reference task built from the demo models' held-out stdlib files: "
            "tokens/s, acceptance, perplexity under the target, BLEU/ROUGE against the reference continuations, "
            "distinct-n and self-BLEU across beams; plus a γ sweep and a tree-shape sweep. Prints tables, writes "
            "JSON and PNG plots to --out. Unset options take the defaults below, or with --quick a CI-sized run's."
        ),
        formatter_class=HelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 prompts, 12 tokens, 2 beams, small sweeps")
    p.add_argument(
        "--num-prompts", type=positive_int, default=None, metavar="N", help="held-out prompts (default 8; quick 2)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens per prompt (default 40; quick 12)",
    )
    p.add_argument(
        "--modes", type=_mode_list, default=None, metavar="LIST", help="comma-separated modes (default all five)"
    )
    p.add_argument(
        "--gamma",
        type=positive_int,
        default=None,
        help="draft length of speculative chains, depth of trees (default 4)",
    )
    p.add_argument(
        "--num-beams", type=positive_int, default=None, metavar="B", help="beams of the beam modes (default 4; quick 2)"
    )
    p.add_argument(
        "--tree-width", type=positive_int, default=None, metavar="W", help="tree width of the tree mode (default 3)"
    )
    p.add_argument(
        "--tree-budget",
        type=positive_int,
        default=None,
        metavar="N",
        help="tree nodes of the tree mode (default width × depth)",
    )
    p.add_argument(
        "--gammas",
        type=int_list,
        default=None,
        metavar="LIST",
        help="γ sweep values ('' for none; default 1,2,3,4,6,8)",
    )
    p.add_argument("--tree-widths", type=int_list, default=None, metavar="LIST", help="tree sweep widths (default 2,3)")
    p.add_argument(
        "--tree-budgets",
        type=int_list,
        default=None,
        metavar="LIST",
        help="tree sweep node budgets ('' for none; default 4,8,12)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timing: best of this many passes per mode (default 2; quick 1)",
    )
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        help="torch threads (default 1: steadier on a shared machine; 0: torch's default)",
    )
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="folder for eval[_quick].json and the PNG plots")
    p.add_argument(
        "--track",
        "--wandb",
        dest="track",
        action="store_true",
        help="also log to Weights & Biases, offline (needs pip install wandb; nothing is sent)",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar (default: on)"
    )
    p.add_argument(
        "--config", default=None, metavar="FILE.yaml", help="YAML file of these options; command-line flags override it"
    )
    return p


def _eval_config(args):
    from .evaluation import EvalConfig

    fields = (
        "num_prompts",
        "max_new_tokens",
        "modes",
        "gamma",
        "num_beams",
        "tree_width",
        "tree_budget",
        "gammas",
        "tree_widths",
        "tree_budgets",
        "repeats",
        "threads",
    )
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    common = dict(
        target=args.target,
        draft=args.draft,
        dtype=args.dtype,
        out=Path(args.out).expanduser(),
        track=args.track,
        extra={"argv": list(getattr(args, "_argv", []))},
    )
    config = EvalConfig.quick_defaults(**common, **given) if args.quick else EvalConfig(**common, **given)
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return config


def _cmd_evaluate(args) -> int:
    from rich.console import Console

    from .evaluation import evaluate
    from .evaluation.report import rich_tables
    from .evaluation.tracking import TrackingUnavailable

    config = _eval_config(args)
    check_model_location(config.target, "target")
    check_model_location(config.draft, "draft")
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


# --------------------------------------------------------------------------- distill
def _add_distill_parser(subparsers) -> argparse.ArgumentParser:
    from .cli_distill import add_parser

    return add_parser(subparsers)


def _cmd_distill(args) -> int:
    from .cli_distill import run

    return run(args)


# --------------------------------------------------------------------------- dashboard
def _add_dashboard_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dashboard",
        help="a web page to watch speculative decoding step by step and browse saved runs and plots",
        description=(
            "Serve a dashboard: pick a prompt and a mode and watch every iteration (accepted, corrected, bonus and "
            "rejected draft tokens in colour) with acceptance statistics; browse saved JSON runs and benchmark plots."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    p.add_argument("--port", type=int_at_least(0), default=8765, help="TCP port (0: any free port)")
    _add_model_arguments(p)
    p.add_argument(
        "--runs-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="folders of saved JSON runs and PNG plots to browse (repeatable; default: the canonical "
        "benchmark results and runs/)",
    )
    p.add_argument(
        "--config", default=None, metavar="FILE.yaml", help="YAML file of these options; command-line flags override it"
    )
    return p


def _cmd_dashboard(args) -> int:
    check_model_location(args.target, "target")
    check_model_location(args.draft, "draft")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("the dashboard needs fastapi and uvicorn: pip install 'specbeam[dashboard]'") from None
    from .dashboard.app import create_app, default_runs_dirs

    runs_dirs = [Path(d).expanduser() for d in args.runs_dir] if args.runs_dir else default_runs_dirs()
    app = create_app(args.target, args.draft, dtype=args.dtype, runs_dirs=runs_dirs)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"specbeam dashboard: warning: listening on {args.host}, not only on loopback; anyone who can reach it "
            "can run generations",
            file=sys.stderr,
        )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    async def announce_and_serve():
        # print the bound address once the socket is open (--port 0 picks a free port)
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


# --------------------------------------------------------------------------- serve
def _add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from specbeam_vllm.serve import add_arguments

    p = subparsers.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server with specbeam as its speculative proposer",
        description="Start vLLM's OpenAI-compatible server with specbeam set up. Flags not listed here "
        "(--max-model-len, --dtype, --tensor-parallel-size, ...) go to vLLM unchanged.",
        formatter_class=HelpFormatter,
    )
    return add_arguments(p)


def _cmd_serve(args) -> int:
    from specbeam_vllm.serve import SetupError, run

    try:
        return run(args, args.vllm_args)
    except SetupError as exc:
        raise UsageError(str(exc)) from None


# name -> (one-line help, add the subcommand's parser, run it)
COMMANDS: dict[str, tuple[str, Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate a continuation of a prompt with speculative decoding", _add_generate_parser, _cmd_generate),
    "evaluate": (
        "compare greedy, beam, speculative, speculative beam and tree decoding",
        _add_evaluate_parser,
        _cmd_evaluate,
    ),
    "distill": (
        "fine-tune a draft on what its target does, so speculation accepts more",
        _add_distill_parser,
        _cmd_distill,
    ),
    "dashboard": ("a web page to watch speculative decoding step by step", _add_dashboard_parser, _cmd_dashboard),
    "serve": (
        "start vLLM's OpenAI-compatible server with specbeam as its speculative proposer",
        _add_serve_parser,
        _cmd_serve,
    ),
}
PASS_THROUGH = {"serve"}  # subcommands whose unknown flags belong to another program (vLLM)


# --------------------------------------------------------------------------- entry point
def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser, by name. With ``only``, the other
    subcommands get an empty parser (their one-line help is all the top-level help shows)."""
    parser = Parser(prog="specbeam", description="specbeam: exact speculative decoding for LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    subs = {}
    for name, (help_text, add, _) in COMMANDS.items():
        subs[name] = add(subparsers) if only is None or name == only else subparsers.add_parser(name, help=help_text)
    return parser, subs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file supplies defaults that the flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser(only=_command_in(argv) or "")
    args, unknown = parser.parse_known_args(argv)
    if args.command in PASS_THROUGH:
        args.vllm_args = unknown
    elif unknown:
        subs[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args._argv = argv
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
        args._argv = argv
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``specbeam`` command line; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    run = COMMANDS[args.command][2]
    prog = f"specbeam {args.command}"
    try:
        return run(args)
    except UsageError as exc:
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure while generating: one line, status 1
        sys.stdout.flush()
        print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        if os.environ.get("SPECBEAM_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
