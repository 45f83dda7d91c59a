"""specbeam_vllm: specbeam as a vLLM speculative proposer, one flag away.

    vllm serve TARGET --speculative-config '{"model": "specbeam", "num_speculative_tokens": 4}' \\
        --additional-config '{"specbeam": {"draft": "DRAFT_PATH"}}'

or ``specbeam serve --target TARGET --draft DRAFT``. The short name comes from the
``vllm.general_plugins`` entry point (:mod:`specbeam_vllm.plugin`); the dotted path
``specbeam_vllm.proposer.SpecBeamProposer`` works without it. Importing this package does not import
vLLM: the proposer module does, when vLLM loads it.

Speculative beam search over the offline ``vllm.LLM`` API: :func:`specbeam_vllm.beam.beam_search`
(also ``specbeam_vllm.beam_search``, imported on first use).
"""

from .policy import BatchSizePolicy, batch_draft_length

__all__ = ["BatchSizePolicy", "batch_draft_length", "beam_search", "count_engine_calls", "SpecBeamStats"]

_BEAM_EXPORTS = ("beam_search", "count_engine_calls", "SpecBeamStats")


def __getattr__(name: str):
    """Lazy exports of :mod:`specbeam_vllm.beam` (it imports vLLM only when called)."""
    if name in _BEAM_EXPORTS:
        from . import beam

        return getattr(beam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
