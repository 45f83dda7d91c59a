"""``"method": "specbeam"`` in vLLM's speculative config, turned into vLLM's own draft-model path.

    --speculative-config '{"method": "specbeam", "model": "DRAFT", "num_speculative_tokens": 4}'

The draft is ``model``, as for vLLM's ``draft_model``; specbeam's options (:mod:`.options`) may sit in
the same JSON or in ``--additional-config '{"specbeam": {...}}'``. :func:`translate` makes the config
vLLM runs: ``method: draft_model`` (so vLLM loads the draft with its loader, on the target's device
and tensor-parallel group, with KV blocks from its profiled budget, its attention backends, prefix
caching, CUDA graphs and async scheduling), drafts sampled with probabilities, the resolved options
in ``additional_config["specbeam"]`` (which reaches every vLLM process), and specbeam's scheduler,
which chooses each step's draft length.

:func:`install` wraps ``EngineArgs.create_engine_config``. The wrap hands every other config to vLLM
untouched; for a specbeam config it checks the setup, translates it and marks the environment
(:data:`ACTIVE_ENV`), so the engine processes vLLM starts next load specbeam's worker side.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

from .options import SECTION, option_names, parse_options
from .version import SetupError, check_vllm_version

METHOD = "specbeam"
ACTIVE_ENV = "SPECBEAM_VLLM_ACTIVE"  # set in processes whose engines run specbeam, inherited by their children
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
OLD_PROPOSER_PATH = "specbeam_vllm.proposer.SpecBeamProposer"
SCHEDULERS = {False: "specbeam_vllm.scheduler.SpecBeamScheduler",
              True: "specbeam_vllm.scheduler.AsyncSpecBeamScheduler"}


def new_spelling(draft: str = "DRAFT", k: int = 4) -> str:
    return "--speculative-config " + json.dumps({"method": METHOD, "model": draft, "num_speculative_tokens": k})


def _vllm_speculative_keys() -> set[str]:
    import dataclasses

    from vllm.config.speculative import SpeculativeConfig

    return {f.name for f in dataclasses.fields(SpeculativeConfig)}


def _refuse_old_spelling(spec: dict, additional: dict) -> None:
    """The spelling of specbeam's first vLLM proposer (a custom_class) is refused with the new one."""
    model = spec.get("model")
    if model == METHOD and spec.get("method") in (None, "custom_class") or model == OLD_PROPOSER_PATH:
        old = additional.get(SECTION) if isinstance(additional.get(SECTION), dict) else {}
        raise SetupError(f"the spelling '\"model\": \"{model}\"' is gone; name the draft in 'model' instead: "
                         f"{new_spelling(old.get('draft', 'DRAFT'), spec.get('num_speculative_tokens', 4))}")


def translate(spec: Any, additional: Any, vllm_found: str | None = None) -> tuple[dict, dict] | None:
    """(speculative config, additional_config) that vLLM runs for a specbeam config; None for any other.

    Raises :class:`SetupError` for a specbeam config it cannot run (and for the old spelling)."""
    if not isinstance(spec, dict):
        return None
    additional = dict(additional or {})
    _refuse_old_spelling(spec, additional)
    if spec.get("method") != METHOD:
        return None
    check_vllm_version(vllm_found)
    spec = dict(spec)
    draft = spec.get("model")
    if not draft or not isinstance(draft, str):
        raise SetupError(f"method 'specbeam' needs the draft model in 'model': {new_spelling()}")
    for key, why in (("num_speculative_tokens_per_batch_size", "specbeam chooses each step's draft length from "
                      "measured costs; drop this static table (or set adaptive_draft_length: false)"),
                     ("draft_sample_method", "specbeam samples drafts itself; use its option sample_drafts "
                      "(true or false) instead")):
        if key in spec:
            raise SetupError(f"'{key}' does not go with method 'specbeam': {why}")
    own = {key: spec.pop(key) for key in list(spec) if key in option_names()}
    unknown = sorted(set(spec) - _vllm_speculative_keys())
    if unknown:
        raise SetupError(f"unknown key(s) in the speculative config: {', '.join(unknown)} (specbeam's options: "
                         f"{', '.join(sorted(option_names()))}; the rest are vLLM's SpeculativeConfig fields)")
    extra = additional.get(SECTION) or {}
    if not isinstance(extra, dict):
        raise SetupError(f"additional_config['{SECTION}'] must be a JSON object, got {type(extra).__name__}")
    if "draft" in extra:
        raise SetupError(f"additional_config['{SECTION}']['draft'] is gone: the draft goes in the speculative "
                         f"config's 'model': {new_spelling(extra['draft'])}")
    try:
        options = parse_options({**extra, **own})
    except ValueError as err:
        raise SetupError(str(err)) from None
    spec["method"] = "draft_model"
    spec["draft_sample_method"] = "probabilistic" if options.sample_drafts else "greedy"
    additional[SECTION] = options.model_dump()
    return spec, additional


def _fail(err: SetupError, usage_context: Any) -> None:
    """A server says the problem in one line and exits; a library call raises it."""
    if "API_SERVER" in str(getattr(usage_context, "name", "")):
        print(f"specbeam: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    raise err


_installed = False


def install() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, usage_context=None, *args, **kwargs):
        try:
            translated = translate(self.speculative_config, self.additional_config)
            if translated is not None:
                if os.environ.get(V2_RUNNER_ENV, "").lower() in ("1", "true"):
                    raise SetupError(f"specbeam runs on vLLM's V1 model runner; unset {V2_RUNNER_ENV}")
                if self.scheduler_cls is not None:
                    raise SetupError(f"specbeam brings its own scheduler (it chooses the draft length); drop "
                                     f"--scheduler-cls {self.scheduler_cls}")
        except SetupError as err:
            _fail(err, usage_context)
        if translated is None:
            return original(self, usage_context, *args, **kwargs)
        self.speculative_config, self.additional_config = translated
        os.environ[V2_RUNNER_ENV] = "0"
        os.environ[ACTIVE_ENV] = "1"
        from .activate import activate

        activate(front_end=True)
        config = original(self, usage_context, *args, **kwargs)
        config.scheduler_config.scheduler_cls = SCHEDULERS[bool(config.scheduler_config.async_scheduling)]
        return config

    EngineArgs.create_engine_config = create_engine_config
    _installed = True
