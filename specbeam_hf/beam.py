"""``model.generate(..., num_beams=B, custom_generate=specbeam_hf.generate, assistant=SpecBeam(draft))``.

HF ``generate`` hands a custom_generate callable beam-expanded inputs (``[batch * B, L]``, every
prompt repeated ``B`` times), its logits processors and stopping criteria. The core's
:class:`~specbeam_core.SpecBeamSearch` replays HF's own beam search on target logits taken from
draft token trees, calling these same processors and criteria on the same tensors HF's loop
would pass them, so sequences, ``sequences_scores`` and ``beam_indices`` are HF's. With
``do_sample=True`` (beam sampling) each step's draw is HF's, from the same generator, so a seed gives
HF's beams too.
"""

from __future__ import annotations

import torch
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from .prompts import unpadded_prompts


def hf_draw(model, num_beams: int, device):
    """The K continuations of a beam-sampling step drawn by HF's own ``_get_top_k_continuations``
    (its versions differ: 5.19 keeps the drawn order, later ones sort it), for
    :class:`~specbeam_core.beam_state.BeamSearchState`: ``draw(scores [batch, B * V], K) ->
    (log-probs, flat indices)``, each ``[batch, K]``. HF's function is handed one-column running
    sequences and beam indices; the token and beam it writes into them give the flat index."""

    def draw(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, vocab = scores.shape[0], scores.shape[1] // num_beams
        column = torch.zeros(batch, num_beams, 1, dtype=torch.long, device=device)  # [batch, B, 1]
        log_probs, sequences, beam_indices = model._get_top_k_continuations(
            accumulated_log_probs=scores.to(device), running_sequences=column, running_beam_indices=column.clone(),
            cur_len=0, decoder_prompt_len=0, do_sample=True, beams_to_keep=k, num_beams=num_beams, batch_size=batch,
        )  # [batch, K], [batch, K, 1], [batch, K, 1]
        offsets = torch.arange(batch, device=device)[:, None] * num_beams  # [batch, 1]
        flat = (beam_indices[:, :, 0] - offsets) * vocab + sequences[:, :, 0]  # [batch, K]
        return log_probs.cpu(), flat.cpu()

    return draw


def beam_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs):
    num_beams = int(generation_config.num_beams)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids must be [batch, length] with length >= 1")
    if input_ids.shape[0] % num_beams:
        raise ValueError(
            f"beam-expanded input_ids has {input_ids.shape[0]} rows, not a multiple of num_beams={num_beams}"
        )
    padded = input_ids[::num_beams]  # [batch, W] one row per prompt (HF repeats each num_beams times)
    mask = model_kwargs.get("attention_mask")
    searcher = assistant.beam_searcher_for(model)
    prompts = unpadded_prompts(
        padded,
        None if mask is None else mask[::num_beams],
        searcher.target.attention.sliding_window,
        searcher.target.attention.chunk_size,
    )

    pad_token_id = generation_config._pad_token_tensor
    eos_token_id = generation_config._eos_token_tensor
    fill = pad_token_id or eos_token_id[0] if eos_token_id is not None else -1  # HF's own expression
    eos_ids = [] if eos_token_id is None else [int(e) for e in eos_token_id.reshape(-1).tolist()]
    scores: list[torch.Tensor] | None = (
        [] if generation_config.return_dict_in_generate and generation_config.output_scores else None
    )
    raw_logits: list[torch.Tensor] | None = (
        [] if generation_config.return_dict_in_generate and generation_config.output_logits else None
    )

    state = searcher.run(
        prompts,
        padded.cpu(),
        num_beams=num_beams,
        max_length=int(generation_config.max_length),
        length_penalty=float(generation_config.length_penalty),
        early_stopping=generation_config.early_stopping,
        num_return_sequences=int(generation_config.num_return_sequences),
        eos_token_ids=eos_ids,
        fill_value=int(fill),
        logits_processor=lambda seqs, log_probs: logits_processor(
            seqs.to(input_ids.device), log_probs.to(input_ids.device)
        ).cpu(),
        stop=lambda seqs: stopping_criteria(
            seqs.to(input_ids.device), tuple(scores) if scores is not None else None
        ).cpu(),
        on_step=None if scores is None else (lambda log_probs: scores.append(log_probs.clone())),
        on_logits=None if raw_logits is None else (lambda logits: raw_logits.append(logits.clone())),
        do_sample=bool(generation_config.do_sample),  # beam sampling: HF's own draw, on the device HF draws on
        draw=hf_draw(model, num_beams, input_ids.device) if generation_config.do_sample else None,
    )
    assistant.last_beam_stats = searcher.stats
    sequences, sequences_scores, beam_indices = state.result()
    sequences = sequences.to(input_ids.device)
    if generation_config.return_dict_in_generate:
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences,
            sequences_scores=sequences_scores.to(input_ids.device) if generation_config.output_scores else None,
            scores=tuple(s.to(input_ids.device) for s in scores) if scores is not None else None,
            logits=tuple(x.to(input_ids.device) for x in raw_logits) if raw_logits is not None else None,
            beam_indices=beam_indices.to(input_ids.device),
        )  # no cache returned (HF's field is `cache` from 5.24, `past_key_values` before; both default to None)
    return sequences
