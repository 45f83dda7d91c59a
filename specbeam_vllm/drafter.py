"""specbeam's draft model inside vLLM: vLLM's own ``DraftModelProposer``, drafting at each request's
sampling parameters.

vLLM's model runner builds its draft-model proposer from the module-level name
``vllm.v1.worker.gpu_model_runner.DraftModelProposer``; :func:`install` binds that name to
:class:`SpecBeamDraftProposer`, so every ``method == "draft_model"`` branch of the runner (draft
loading, KV cache groups, attention backends, CUDA graph keys, async scheduling) treats it as
vLLM's own. For an engine that did not ask for specbeam it is vLLM's class unchanged.

What it changes:

- A step at draft length 0 that verified no drafts skips the draft's forward; the draft catches up on
  what it missed when drafting resumes (:mod:`specbeam_vllm.draft_lag`), so length 0 costs what a
  spec-off step costs.
- The draft tokens of sampled requests. vLLM 0.32 samples them at the request's temperature alone;
  here each row's draft is drawn from the draft's distribution after the request's temperature,
  top-k and top-p (vLLM's own ``apply_top_k_top_p``), with the request's generator when it has a
  seed, and those probabilities go to vLLM's rejection sampler. Rejection sampling is exact for any
  draft distribution it is told; one closer to the target's accepts more.

- Two of the base proposer's buffers, sized ``[max_num_batched_tokens, hidden]``, serve only EAGLE-style
  heads and multimodal drafts; a plain draft model gets smaller ones (:func:`trim_unread_buffers`).

Every tensor stays on the runner's device; :func:`check_on_device` asserts it where the tensors
leave for vLLM.
"""

from __future__ import annotations

import logging
import sys

import torch

from . import plain_steps
from .draft_lag import DraftLag, catch_up
from .options import options_of

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it is greedy
LAG_BUDGET_STEPS = 32  # skipped tokens recorded at most, in multiples of the step's token budget


def _flat_positions(positions: torch.Tensor) -> torch.Tensor:
    return positions[0] if positions.dim() == 2 else positions  # M-RoPE [3, tokens]: text positions agree


def check_on_device(tensor: torch.Tensor | None, device: torch.device, what: str) -> None:
    """Raise if a tensor handed to vLLM sits on another device than the runner's."""
    if tensor is not None and tensor.device.type != torch.device(device).type:
        raise RuntimeError(f"specbeam: {what} is on {tensor.device}, but vLLM's runner is on {device}")


def sample_drafts(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                  top_p: torch.Tensor | None, generators: dict[int, torch.Generator]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens and the probabilities they were drawn from, one draft position for every row.

    ``logits`` [rows, vocab] (the draft's); ``temperature``, ``top_k``, ``top_p`` [rows] (vLLM's
    sampling metadata; a temperature under ``GREEDY_EPS`` marks a greedy row, which gets the argmax);
    ``generators``: row -> the request's own generator (seeded requests). Returns tokens [rows] and
    probabilities [rows, vocab], float32, on ``logits``' device."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    greedy = temperature < GREEDY_EPS  # [rows]
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    scaled = apply_top_k_top_p(scaled, top_k, top_p)  # [rows, vocab]; masked entries -inf
    probs = scaled.softmax(dim=-1)  # [rows, vocab]
    noise = torch.empty_like(probs).exponential_()  # [rows, vocab]: Gumbel-max through exponential races
    for row, generator in generators.items():
        if row < noise.shape[0]:
            noise[row].exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)  # [rows]
    tokens = torch.where(greedy, probs.argmax(dim=-1), sampled)  # [rows]
    return tokens, probs


def trim_unread_buffers(proposer) -> None:
    """Shrink what a plain draft model never reads of the base proposer's persistent buffers.

    vLLM's proposer allocates ``hidden_states`` and ``inputs_embeds`` at ``[max_num_batched_tokens,
    hidden]`` for drafts that take the target's hidden states (EAGLE) or input embeddings (multimodal).
    A draft model takes neither: its drafting loop only writes the first ``batch`` rows of
    ``hidden_states``, and nothing touches ``inputs_embeds``. Both then cost memory (device memory on
    a GPU) that vLLM's KV budget could have had."""
    if proposer.pass_hidden_states_to_model or proposer.supports_mm_inputs:
        return
    proposer.hidden_states = proposer.hidden_states.new_zeros(proposer.max_batch_size, proposer.hidden_size)
    # [max_num_seqs, hidden]: the drafting loop writes one row per request
    proposer.inputs_embeds = proposer.inputs_embeds.new_zeros(0, proposer.inputs_embeds_size)  # [0, hidden]: unread


def _proposer_class():
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    class SpecBeamDraftProposer(DraftModelProposer):
        """vLLM's draft-model proposer whose sampled drafts follow each request's top-k and top-p."""

        def __init__(self, vllm_config, device, runner=None):
            super().__init__(vllm_config, device, runner)
            self.runner = runner  # the base class takes it but keeps none: the batch's request ids come from it
            self.specbeam = options_of(vllm_config)  # None: an engine that did not ask for specbeam
            if self.specbeam is not None:
                trim_unread_buffers(self)
            self.last_length: int | None = None  # draft length of the last proposal
            self.lag = DraftLag(max_tokens=LAG_BUDGET_STEPS * self.max_num_tokens)
            self.can_skip = (self.specbeam is not None and self.specbeam.skip_draft_at_zero and runner is not None
                             and not self.supports_mm_inputs and not self.uses_mrope and not self.parallel_drafting
                             and vllm_config.parallel_config.data_parallel_size == 1)
            if self.can_skip:
                plain_steps.wrap_runner(runner, self)

        def _sample_from_logits(self, logits, sampling_metadata):
            if self.specbeam is None or not self._enable_probabilistic_draft_probs or sampling_metadata.all_greedy:
                return super()._sample_from_logits(logits, sampling_metadata)
            rows = logits.shape[0]
            temperature = sampling_metadata.temperature[:rows]
            top_k = None if sampling_metadata.top_k is None else sampling_metadata.top_k[:rows]
            top_p = None if sampling_metadata.top_p is None else sampling_metadata.top_p[:rows]
            return sample_drafts(logits, temperature, top_k, top_p, sampling_metadata.generators)

        def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                    next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                    mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
            args = dict(num_speculative_tokens=num_speculative_tokens, target_token_ids=target_token_ids,
                        target_positions=target_positions, target_hidden_states=target_hidden_states,
                        next_token_ids=next_token_ids, token_indices_to_sample=token_indices_to_sample,
                        common_attn_metadata=common_attn_metadata, sampling_metadata=sampling_metadata,
                        mm_embed_inputs=mm_embed_inputs, num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                        slot_mappings=slot_mappings)
            if not self.can_skip:
                return self._checked(super().propose(**args))
            batch = common_attn_metadata.batch_size()
            req_ids = self.runner.input_batch.req_ids[:batch]
            verified_nothing = self.last_length == 0  # the last proposal drafted nothing: this step verified none
            self.last_length = num_speculative_tokens
            if num_speculative_tokens == 0 and verified_nothing:  # plain decoding: no draft forward at all
                return self._skip(req_ids, common_attn_metadata, target_token_ids, _flat_positions(target_positions))
            if self.lag:  # the rows' draft KV misses the skipped steps: write it before this step's pass reads it
                skipped = len(self.lag.steps)
                for chunk in self.lag.take(req_ids, budget=self.max_num_tokens):
                    catch_up(self, chunk, common_attn_metadata)
                    logger.debug("specbeam: draft caught up on %d tokens of %d requests after %d skipped steps",
                                 chunk.num_tokens, len(chunk.rows), skipped)
            return self._checked(super().propose(**args))

        def skip_step(self, common_attn_metadata) -> list[list[int]]:
            """The draft step of a plain step (:mod:`specbeam_vllm.plain_steps`): the runner prepared no draft
            inputs; the step's target tokens are noted for the catch-up. Returns no drafts as host lists (as
            vLLM's host-side proposers do), so the runner starts no device-to-host copy of an empty tensor."""
            batch = common_attn_metadata.batch_size()
            num_tokens = common_attn_metadata.num_actual_tokens
            req_ids = self.runner.input_batch.req_ids[:batch]
            self.last_length = 0
            self._note_skipped(req_ids, common_attn_metadata, self.runner.input_ids.gpu[:num_tokens],
                               _flat_positions(self.runner._get_positions(num_tokens)))
            return [[] for _ in range(batch)]

        def _skip(self, req_ids, common_attn_metadata, target_token_ids, target_positions):
            """No draft forward this step (vLLM's draft path): note what the draft missed; no drafts."""
            self._note_skipped(req_ids, common_attn_metadata, target_token_ids, target_positions)
            return torch.empty(len(req_ids), 0, dtype=torch.int64, device=self.device)  # [batch, 0]

        def _note_skipped(self, req_ids, common_attn_metadata, target_token_ids, target_positions):
            self._last_draft_probs = None
            self.lag.record(req_ids, common_attn_metadata.query_start_loc_cpu, target_token_ids, target_positions)

        def _checked(self, drafts):
            if self.specbeam is not None:
                check_on_device(drafts, self.device, "the draft token ids")
                check_on_device(self._last_draft_probs, self.device, "the draft probabilities")
            return drafts  # [batch, k]

    return SpecBeamDraftProposer


_installed = None
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


class _BindOnImport:
    """A ``sys.meta_path`` finder that binds the proposer right after vLLM imports its runner module.

    Only processes that build a model runner import that module; the API server and the engine core of
    a multi-process engine never do, and importing it there would cost them about 25 MiB each."""

    def find_spec(self, name, path, target=None):
        if name != RUNNER_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once: the real finders take it from here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_bind(module):
            exec_module(module)
            install()

        spec.loader.exec_module = exec_and_bind
        return spec


def install_on_import() -> None:
    """Bind the proposer now if vLLM's runner module is loaded, else as soon as it is imported (idempotent)."""
    if RUNNER_MODULE in sys.modules:
        install()
    elif not any(isinstance(finder, _BindOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BindOnImport())


def install() -> type:
    """Bind the runner's ``DraftModelProposer`` to specbeam's subclass (idempotent); return the class."""
    global _installed
    if _installed is None:
        from vllm.v1.worker import gpu_model_runner

        _installed = _proposer_class()
        gpu_model_runner.DraftModelProposer = _installed
    return _installed
