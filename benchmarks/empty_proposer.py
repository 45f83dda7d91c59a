"""A vLLM ``custom_class`` proposer that never drafts: the cost of vLLM's speculative machinery alone.

Not part of specbeam. A server with this proposer runs every step as a speculative one (synchronous
scheduling, spec-decode metadata, the rejection sampler, the drafts round trip) with zero drafts, so
against a spec-off server it shows what speculative mode costs before any proposer does any work.
Run with ``benchmarks/`` on ``PYTHONPATH`` (the server inherits it), e.g.::

    PYTHONPATH=benchmarks python benchmarks/bench_vllm_proposer.py --concurrency 16 --requests 256 \\
        --variants '{"spec-off": null, "empty": {"spec_off": true, "server_flags": ["--speculative-config",
        "{\\"method\\": \\"custom_class\\", \\"model\\": \\"empty_proposer.EmptyProposer\\",
        \\"num_speculative_tokens\\": 4}"]}, "default": {}}'
"""


class EmptyProposer:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        pass

    def load_model(self, *args, **kwargs) -> None:  # vLLM's CPU runner calls it on every drafter
        return None

    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]
