"""``--config FILE.yaml``: a subcommand's options from a YAML file, checked like command-line values."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import UsageError


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
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

    actions = option_actions(parser)
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
