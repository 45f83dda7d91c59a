"""The installed specbeam version, for ``--version`` and the JSON logs."""

from __future__ import annotations


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("specbeam")
    except Exception:  # not installed as a distribution
        return "unknown"
