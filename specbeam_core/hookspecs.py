"""Hook specifications: how plugins add drafters, steer speculation and observe it.

Each hook is a documented no-op here; plugins implement them with ``@hookimpl``. Hooks marked
``firstresult`` stop at the first plugin that answers something other than ``None``. Plugins are
found through the ``specbeam`` entry-point group (see :func:`specbeam_core.plugins.get_plugin_manager`);
the built-in drafter and the statistics observer are registered through these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .drafting import Drafter
    from .request import Request
    from .stats import StepRecord

PROJECT = "specbeam"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def specbeam_drafter_names() -> list[str]:
    """Names of the drafters this plugin can make (for listings and error messages)."""


@hookspec(firstresult=True)
def specbeam_make_drafter(name: str, options: dict[str, Any]) -> "Drafter | None":
    """Make the drafter called ``name`` from ``options``, or return None if it is not yours.

    The built-in ``draft_model`` drafter takes ``options["model"]`` (a ``CausalLM``) and optional
    ``options["block_size"]``.
    """


@hookspec(firstresult=True)
def specbeam_draft_length(requests: "list[Request]", default: int) -> "int | None":
    """How many tokens to draft this step for ``requests`` (0 = plain decoding), or None to pass.

    ``default`` is the engine's configured draft length. The first non-None answer wins.
    """


@hookspec
def specbeam_on_step(record: "StepRecord") -> None:
    """Observe one draft → verify → commit step (drafted, accepted, recovered and bonus counts)."""


@hookspec
def specbeam_on_request_finished(request: "Request") -> None:
    """Observe a request that has finished (``request.finish_reason`` says why) or was aborted."""
