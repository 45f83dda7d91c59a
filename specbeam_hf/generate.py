"""``model.generate(..., custom_generate=specbeam_hf.generate, assistant=SpecBeam(draft))``
(or ``assistant_model=draft``: :meth:`SpecBeam.for_draft`).

HF ``generate`` prepares the inputs, the logits processors, the stopping criteria and the
generation config, then calls this function. It strips each row's left padding, runs the rows
through the core engine as one ragged batch (no padding is ever fed to a model), and rebuilds the
output exactly as HF's own decoding loop would: finished rows padded with ``pad_token_id``, the
sequence as long as the longest row, the streamer fed one column of tokens at a time.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from specbeam_core import Request, SamplingParams

from .assistant import SpecBeam
from .beam import beam_generate
from .finished_rows import finished_row_steps
from .prompts import unpadded_prompts
from .rope import rope_pinned
from .stopping import ROW_WISE_CRITERIA, StepStops


def _caller_argument(name: str):
    """HF ``generate`` does not pass its own ``streamer`` or ``assistant_model`` arguments on to a
    custom_generate callable; read them from its frame."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            names = frame.f_locals
            if frame.f_code.co_name == "generate" and "custom_generate" in names and name in names:
                return names[name]
            frame = frame.f_back
        return None
    finally:
        del frame


class _ColumnStreamer:
    """Feeds a streamer as HF's own loop does: one column per position, a token per row (pad once a
    row has finished). Rows advance by different numbers of tokens per step, so column ``c`` is put
    only when every row has its token ``c`` or has finished before it."""

    def __init__(self, streamer, requests: list[Request], pad_id: int) -> None:
        self.streamer, self.requests, self.pad_id = streamer, requests, pad_id
        self.next_column = 0

    def __call__(self) -> None:
        ready = min(r.num_generated if not r.finished else r.max_new_tokens for r in self.requests)
        longest = max(r.num_generated for r in self.requests)
        for c in range(self.next_column, min(ready, longest)):
            column = [r.tokens[len(r.prompt) + c] if c < r.num_generated else self.pad_id for r in self.requests]
            self.streamer.put(torch.tensor(column))  # [batch]
        self.next_column = max(self.next_column, min(ready, longest))


def _end_at(engine, requests: list[Request], length: int) -> None:
    """Without an EOS id HF's loop stops every row at once, when the last row's criterion fires; rows
    that got further in their last speculative step are cut back to that length."""
    for r in requests:
        if r.finished:
            continue
        if r.num_generated >= length:
            del r.tokens[len(r.prompt) + length :]
            r.finish_reason = "stop"
            engine.abort(r)
        else:
            r.max_new_tokens = length


def _sampling_from_processors(generation_config, logits_processor: LogitsProcessorList | None):
    """Map HF's processors onto core SamplingParams; anything else is applied by HF itself.

    Returns ``(params, hf_processors)``: ``hf_processors`` is None when the core's own
    temperature/top-k/top-p reproduce the list exactly, else the whole list to run position by
    position (repetition penalty, min length, bad words, ...).
    """
    do_sample = bool(generation_config.do_sample)
    temperature, top_k, top_p = 1.0, 0, 1.0
    generic = False
    for proc in logits_processor or []:
        if isinstance(proc, TemperatureLogitsWarper):
            temperature = float(proc.temperature)
        elif isinstance(proc, TopKLogitsWarper) and proc.filter_value == float("-inf"):
            top_k = int(proc.top_k)
        elif isinstance(proc, TopPLogitsWarper) and proc.min_tokens_to_keep == 1 and proc.filter_value == float("-inf"):
            top_p = float(proc.top_p)
        else:
            generic = True
    if generic:
        return SamplingParams(do_sample=do_sample), logits_processor
    return SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p), None


# HF logits processors whose output for a row depends on that row's ids and scores only: no state
# sized to the batch, no batch index (checked by exact type: a subclass may add either)
_ROW_WISE_PROCESSORS = {
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
    "SequenceBiasLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor", "ExponentialDecayLengthPenalty",
    "LogitNormalization", "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor",
    "InfNanRemoveLogitsProcessor", "WatermarkLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
    "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper",
    "TopHLogitsWarper",
}


def _for_rows(processors, rows: list[int]) -> LogitsProcessorList | None:
    """``processors`` as they act on the batch rows ``rows`` called on their own (the same floats, a
    fraction of the work), or None where one of them may need the whole batch."""
    out = []
    for proc in processors:
        kind = type(proc)
        if kind.__module__ != "transformers.generation.logits_process" or kind.__name__ not in _ROW_WISE_PROCESSORS:
            return None
        ignore = getattr(proc, "prompt_ignore_length", None)
        if isinstance(ignore, torch.Tensor):  # one length per row of the batch (HF's: each row's left padding)
            proc = copy.copy(proc)
            proc.prompt_ignore_length = ignore[torch.tensor(rows, device=ignore.device)]  # [len(rows)]
        out.append(proc)
    return LogitsProcessorList(out)


class _RowsProcessor:
    """HF's logits processors for the rows of one ``generate`` call, as a core batch processor: the
    positions given (any rows, any depth) whose ids are equally long, which HF's processors read as
    the step, go in one call on those rows' ids; a list that may need the whole batch goes position
    by position on a batch of copies of the row, read at the row."""

    def __init__(self, processors, input_ids: torch.Tensor) -> None:
        self.processors, self.input_ids = processors, input_ids
        self.row_ids = input_ids.tolist()  # what HF's processors see: padding and masked tokens too
        self.rows: dict[int, tuple[int, int]] = {}  # request id -> (batch row, unpadded prompt length)
        self.row_wise = _for_rows(processors, [0]) is not None

    def add(self, request: Request, row: int) -> None:
        self.rows[request.request_id] = (row, len(request.prompt))

    def ids(self, request: Request, context: list[int]) -> tuple[int, list[int]]:
        row, prompt_len = self.rows[request.request_id]
        return row, self.row_ids[row] + context[prompt_len:]

    def one(self, request: Request, context: list[int], logits: torch.Tensor) -> torch.Tensor:
        """One position (``logits`` ``[1, vocab]``): the core's per-request processor."""
        return self([request], [context], logits)

    def __call__(self, requests: list[Request], contexts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        device = self.input_ids.device
        out = torch.empty(logits.shape, dtype=torch.float32)  # [E, vocab]; each entry written once below
        if not self.row_wise:
            batch = self.input_ids.shape[0]
            for e, (request, context) in enumerate(zip(requests, contexts)):
                row, ids = self.ids(request, context)
                copies = torch.tensor([ids], device=device).repeat(batch, 1)  # [batch, L]
                out[e] = self.processors(copies, logits[e : e + 1].to(device).repeat(batch, 1))[row].float().cpu()
            return out
        by_length: dict[int, list[tuple[int, int, list[int]]]] = {}
        for e, (request, context) in enumerate(zip(requests, contexts)):
            row, ids = self.ids(request, context)
            by_length.setdefault(len(ids), []).append((e, row, ids))
        for group in by_length.values():
            entries = [e for e, _, _ in group]
            ids = torch.tensor([i for _, _, i in group], device=device)  # [g, L]
            procs = _for_rows(self.processors, [row for _, row, _ in group])
            if len(by_length) == 1:  # one length: the whole input in one call, no gather or scatter (a copy
                return procs(ids, logits.to(device, copy=True)).float().cpu()  # still: the caller keeps the raw logits)
            out[entries] = procs(ids, logits[entries].to(device)).float().cpu()  # the engine works on the host
        return out


def _refuse_unsupported(generation_config, model_kwargs: dict, logits_processor=None) -> None:
    """Options whose result specbeam would not reproduce: a clear error rather than a different answer."""
    refused = []
    if any(type(proc).__name__ in _STATEFUL_PROCESSORS for proc in logits_processor or []):
        refused.append("SynthID text watermarking (its logits processor carries state from one call to the next, "
                       "counting on one call per step for the whole batch; specbeam scores several positions a step, "
                       "a row at a time, some of them rejected later)")
    if model_kwargs.get("inputs_embeds") is not None:
        refused.append("inputs_embeds (pass input_ids: the draft and the paged cache work on token ids)")
    if getattr(generation_config, "output_attentions", False):
        refused.append("output_attentions (attention weights are not collected)")
    if getattr(generation_config, "output_hidden_states", False):
        refused.append("output_hidden_states (hidden states are not collected)")
    guidance = getattr(generation_config, "guidance_scale", None)
    if guidance is not None and guidance != 1:
        refused.append(
            f"guidance_scale={guidance} (classifier-free guidance runs the model itself inside a logits processor)"
        )
    if (getattr(generation_config, "num_beam_groups", None) or 1) > 1 or getattr(
        generation_config, "diversity_penalty", 0.0
    ):
        refused.append("num_beam_groups / diversity_penalty (group beam search)")
    if getattr(generation_config, "force_words_ids", None) or getattr(generation_config, "constraints", None):
        refused.append("force_words_ids / constraints (constrained beam search)")
    refused += _other_model_inputs(model_kwargs)
    for name in (
        "past_key_values",
        "cache",
    ):  # HF hands over the empty cache it made itself; a filled one is the caller's
        given = model_kwargs.get(name)
        if given is not None and hasattr(given, "get_seq_length") and given.get_seq_length() > 0:
            refused.append(f"a filled {name} (specbeam keeps its own paged KV cache; pass the full input_ids)")
    given = [model_kwargs.get(name) for name in ("past_key_values", "cache")]
    if getattr(generation_config, "cache_implementation", None) == "quantized" or any(
        c is not None and _quantized(c) for c in given
    ):
        refused.append(
            "a quantized KV cache (cache_implementation='quantized' or a QuantizedCache): HF's output then comes "
            "from keys and values rounded to a few bits, specbeam's paged cache keeps the model's precision, so "
            "its output would be the unquantized one, not HF's"
        )
    if refused:
        raise ValueError("specbeam_hf.generate does not support: " + "; ".join(refused))


# HF logits processors whose output depends on earlier calls, not only on the ids and scores given
_STATEFUL_PROCESSORS = {"SynthIDTextWatermarkLogitsProcessor"}


def _quantized(cache) -> bool:
    """A KV cache that stores keys and values quantized (HF's ``QuantizedCache`` and its layers)."""
    parts = [cache, *getattr(cache, "layers", [])]
    return any("Quantized" in type(part).__name__ for part in parts)


# model inputs HF hands a custom_generate in model_kwargs that specbeam derives itself (the mask and
# positions) or that do not change the output; any other tensor is an input the model would read
_OWN_INPUTS = {"attention_mask", "position_ids", "cache_position", "inputs_embeds", "past_key_values", "cache"}


def _other_model_inputs(model_kwargs: dict) -> list[str]:
    """Model inputs specbeam would not feed to the model, so the output would silently differ: extra
    tensors (GPT-2's ``token_type_ids``...) and ``position_ids`` other than the attention mask's."""
    refused = [
        f"{name} (specbeam feeds the model token ids, the attention mask and positions only)"
        for name, value in model_kwargs.items()
        if name not in _OWN_INPUTS and isinstance(value, torch.Tensor)
    ]
    given = model_kwargs.get("position_ids")
    if given is not None:
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(
                given.shape[-2:] if given.ndim > 1 else given.shape, dtype=torch.long, device=given.device
            )
        expected = mask.long().cumsum(-1) - 1  # [rows, L]: HF's own positions when none are given
        if given.ndim > 2 or not torch.equal(given.expand_as(expected)[mask.bool()], expected[mask.bool()]):
            refused.append(
                "position_ids other than the attention mask's (each row's unmasked tokens numbered 0, 1, 2...)"
            )
    return refused


def generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config=None,
    assistant: SpecBeam | None = None,
    **model_kwargs: Any,
):
    """Exact speculative decoding as a ``custom_generate`` for HF ``generate``.

    Greedy and sampled outputs are those of ``model.generate`` without the assistant: token for
    token when greedy, the same distribution when sampling.
    """
    if assistant is None and (draft_model := _caller_argument("assistant_model")) is not None:
        assistant = SpecBeam.for_draft(draft_model)
    if assistant is None:
        raise ValueError(
            "specbeam_hf.generate needs an assistant: "
            "model.generate(..., custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft_model))"
        )
    if not isinstance(assistant, SpecBeam):
        raise ValueError(f"assistant must be a specbeam_hf.SpecBeam, got {type(assistant).__name__}")
    _refuse_unsupported(generation_config, model_kwargs, logits_processor)
    if assistant.in_use_by == threading.get_ident():  # waiting for itself would hang
        raise ValueError(
            "this SpecBeam is already running a generate call in this thread (generate called again from a logits "
            "processor, stopping criterion or streamer?); give the inner call its own SpecBeam"
        )
    with assistant.in_use:  # another thread's call on the same assistant finishes first
        assistant.in_use_by = threading.get_ident()
        try:
            return _run(
                model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs
            )
        finally:
            assistant.in_use_by = None


def _run(model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs):
    """Beams or greedy / sampling, for :func:`generate` holding the assistant."""
    max_length = (
        stopping_criteria.max_length
        if stopping_criteria is not None and stopping_criteria.max_length
        else generation_config.max_length
    )
    with rope_pinned(model, input_ids.shape[1], int(max_length)):  # longrope: HF's frequencies for this call's steps
        return _run_pinned(
            model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs
        )


def _run_pinned(model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs):
    if (generation_config.num_beams or 1) > 1:
        if _caller_argument("streamer") is not None:  # HF's own check never sees it: HF keeps streamer from a callable
            raise ValueError(
                "`streamer` cannot be used with beam search (as in HF generate); set num_beams=1 to stream"
            )
        return beam_generate(
            model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs
        )
    return _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs)


def _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, assistant, model_kwargs):
    """Greedy and sampled decoding (``num_beams == 1``) of :func:`generate`."""
    engine = assistant.engine_for(model)
    prompts = unpadded_prompts(
        input_ids,
        model_kwargs.get("attention_mask"),
        engine.target.attention.sliding_window,
        engine.target.attention.chunk_size,
    )
    batch, width = input_ids.shape

    max_new_tokens = (
        int(stopping_criteria.max_length - width)
        if stopping_criteria is not None and stopping_criteria.max_length
        else int(generation_config.max_length - width)
    )
    if max_new_tokens < 1:
        raise ValueError(
            f"max_length {width + max_new_tokens} leaves no room for new tokens after a {width}-token input"
        )
    eos = generation_config._eos_token_tensor
    eos_ids = [] if eos is None else [int(e) for e in eos.reshape(-1).tolist()]
    pad = generation_config._pad_token_tensor
    pad_id = int(pad.reshape(-1)[0]) if pad is not None else (eos_ids[0] if eos_ids else 0)

    params, hf_processors = _sampling_from_processors(generation_config, logits_processor)
    record = bool(
        generation_config.return_dict_in_generate
        and (generation_config.output_scores or generation_config.output_logits)
    )
    extra_criteria = [c for c in (stopping_criteria or []) if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    row_wise_criteria = [c for c in extra_criteria if type(c) in ROW_WISE_CRITERIA]
    other_criteria = [c for c in extra_criteria if type(c) not in ROW_WISE_CRITERIA]
    step_stops = StepStops(row_wise_criteria, input_ids) if row_wise_criteria else None

    seeds = (
        torch.randint(0, 2**62, (batch,)).tolist() if params.do_sample else [None] * batch
    )  # follows torch.manual_seed
    requests: list[Request] = []
    first_stop: dict[int, int] = {}  # row -> new tokens when a custom criterion first fired (no EOS id)
    criteria_scores: list[list[torch.Tensor]] = [
        [] for _ in range(batch)
    ]  # per row: [batch, vocab] views, grown per token
    rows_processor = _RowsProcessor(hf_processors, input_ids) if hf_processors is not None else None
    for row, prompt in enumerate(prompts):
        row_ids = input_ids[row].tolist()  # what HF's processors and criteria see: padding and masked tokens too
        stop = None
        if extra_criteria:

            def stop(tokens, _row_ids=row_ids, _row=row, _prompt_len=len(prompt)):  # noqa: B008 - bound per row
                # HF's row-wise criteria were judged for the whole step at once (StepStops); any other
                # sees the batch HF's loop would give it, every row holding this row's tokens, and
                # answers for row ``_row``
                hit = step_stops is not None and step_stops.hit(requests[_row], tokens)
                if not hit and other_criteria:
                    ids = torch.tensor([_row_ids + tokens[_prompt_len:]], device=input_ids.device).repeat(
                        batch, 1
                    )  # [batch, L]
                    # HF hands its criteria the scores so far when it records them (output_scores), else None
                    scores = None
                    if record:
                        seen = criteria_scores[_row]
                        seen.extend(
                            s.to(input_ids.device)[None].expand(batch, -1) for s in requests[_row].scores[len(seen) :]
                        )
                        scores = tuple(seen)
                    hit = any(bool(c(ids, scores).reshape(-1)[_row]) for c in other_criteria)
                if hit and not eos_ids:  # HF keeps such a row generating until every row has stopped
                    first_stop.setdefault(_row, len(tokens) - _prompt_len)
                    return False
                return hit

        row_params = SamplingParams(
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=seeds[row],
        )
        request = engine.make_request(prompt, row_params, max_new_tokens, eos_ids, stop, record_scores=record)
        if step_stops is not None:
            step_stops.add(request, row)
            request.batch_stop = step_stops
        if rows_processor is not None:  # the row's processor, and the one shared by all rows of the call
            rows_processor.add(request, row)
            request.logits_processor = functools.partial(rows_processor.one, request)
            request.batch_logits_processor = rows_processor
        requests.append(request)

    streamer = _caller_argument("streamer")  # HF has already put the prompt
    put_columns = _ColumnStreamer(streamer, requests, pad_id) if streamer is not None else None

    engine.stats.reset()
    engine.reserve(requests)
    for r in requests:
        engine.add(r)
    try:
        while engine.has_unfinished:
            engine.step()
            if len(first_stop) == batch:
                _end_at(engine, requests, max(first_stop.values()))
            if put_columns is not None:
                put_columns()
    finally:
        for r in requests:
            engine.abort(r)
        if streamer is not None:
            streamer.end()
    assistant.last_stats = engine.stats

    longest = max(r.num_generated for r in requests)
    new = torch.full((batch, longest), pad_id, dtype=input_ids.dtype)  # [batch, longest]
    for row, r in enumerate(requests):
        new[row, : r.num_generated] = torch.tensor(r.output, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)  # [batch, width + longest]
    if generation_config.return_dict_in_generate:
        finished = {}
        if record:
            finished = finished_row_steps(
                model,
                input_ids,
                model_kwargs.get("attention_mask"),
                [r.output for r in requests],
                longest,
                pad_id,
                logits_processor,
                [r.raw_logits for r in requests],
            )
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=_per_step(requests, "scores", finished, 1, longest, input_ids.device)
            if generation_config.output_scores
            else None,
            logits=_per_step(requests, "raw_logits", finished, 0, longest, input_ids.device)
            if generation_config.output_logits
            else None,
        )
    return sequences


def _per_step(
    requests: list[Request], field: str, finished: dict, which: int, steps: int, device
) -> tuple[torch.Tensor, ...]:
    """HF's layout: one ``[batch, vocab]`` tensor per generated step. A row that finished before the
    last step takes, for its remaining steps, what HF's loop computes for the pad tokens it feeds such
    a row (``finished``: row -> (raw logits, scores) from :func:`finished_row_steps`; ``which`` picks)."""
    kept = [
        getattr(r, field)[: r.num_generated] + (finished[row][which] if row in finished else [])
        for row, r in enumerate(requests)
    ]  # rows cut back by a stopping criterion keep what they emitted
    return tuple(torch.stack([row[step].to(device) for row in kept]) for step in range(steps))  # each [batch, vocab]
