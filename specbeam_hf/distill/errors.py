"""The error that bad distillation input raises: one line naming the problem and its fix."""

from __future__ import annotations

from specbeam_hf.app.errors import UsageError


class DistillInputError(UsageError, ValueError):
    """Bad input to :func:`specbeam_hf.distill.distill` (the command line prints it as one line, exit 2)."""
