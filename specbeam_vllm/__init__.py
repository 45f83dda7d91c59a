"""specbeam_vllm: specbeam inside vLLM, one flag away.

    vllm serve TARGET --speculative-config '{"method": "specbeam", "model": "DRAFT", "num_speculative_tokens": 4}'

or ``specbeam serve --target TARGET --draft DRAFT``. The method name comes from the
``vllm.general_plugins`` entry point (:mod:`specbeam_vllm.plugin`): vLLM runs its own draft-model path
(:mod:`specbeam_vllm.config`), with drafts sampled at each request's parameters
(:mod:`specbeam_vllm.drafter`) and each step's draft length chosen from measured costs
(:mod:`specbeam_vllm.scheduler`). Importing this package does not import vLLM.

Speculative beam search over the offline ``vllm.LLM`` API: :func:`specbeam_vllm.beam.beam_search`
(also ``specbeam_vllm.beam_search``, imported on first use).
"""

__all__ = ["beam_search", "count_engine_calls", "SpecBeamStats"]

_BEAM_EXPORTS = ("beam_search", "count_engine_calls", "SpecBeamStats")


def __getattr__(name: str):
    """Lazy exports of :mod:`specbeam_vllm.beam` (it imports vLLM only when called)."""
    if name in _BEAM_EXPORTS:
        from . import beam

        return getattr(beam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
