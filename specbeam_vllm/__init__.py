"""specbeam_vllm: specbeam as a vLLM speculative proposer, one flag away.

    vllm serve TARGET --speculative-config '{"model": "specbeam", "num_speculative_tokens": 4}' \\
        --additional-config '{"specbeam": {"draft": "DRAFT_PATH"}}'

or ``specbeam serve --target TARGET --draft DRAFT``. The short name comes from the
``vllm.general_plugins`` entry point (:mod:`specbeam_vllm.plugin`); the dotted path
``specbeam_vllm.proposer.SpecBeamProposer`` works without it. Importing this package does not import
vLLM: the proposer module does, when vLLM loads it.
"""

from .policy import BatchSizePolicy, batch_draft_length

__all__ = ["BatchSizePolicy", "batch_draft_length"]
