"""The scores HF's greedy / sampling loop records for a row after that row has finished.

HF's ``_sample`` keeps every row of the batch in each forward until the last row stops: a row that
emitted EOS is fed its EOS, then ``pad_token_id`` at every later step (attention mask 1, positions
counting on), and its logits and processed scores at those steps are recorded like any other's.
specbeam runs no forward for a finished row while the others decode; when ``output_scores`` or
``output_logits`` asks for those steps, one forward of the target over the finished rows, padded as HF
pads them, gives the same logits, and HF's own logits processors turn them into the same scores,
called once per step on the batch HF's loop holds at that step (the running rows' recorded logits
beside the finished rows' new ones).
"""

from __future__ import annotations

import inspect

import torch


def finished_row_steps(
    model,
    input_ids,
    attention_mask,
    outputs: list[list[int]],
    steps: int,
    pad_id: int,
    logits_processor,
    raw_logits: list[list[torch.Tensor]],
) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """For each row of ``outputs`` (its emitted tokens) shorter than ``steps``: ``(raw, scores)``, the
    ``[vocab]`` float32 logits and processed scores HF records at steps ``len(row) .. steps - 1``.

    ``input_ids`` / ``attention_mask``: the ``[batch, width]`` input HF was given (left padding and all).
    ``raw_logits``: per row, the ``[vocab]`` target logits of each token it emitted: the rows still
    running at a step, in the batch the processors see at that step as in HF's loop.
    """
    rows = [row for row, out in enumerate(outputs) if len(out) < steps]
    if not rows:
        return {}
    device = input_ids.device
    batch, width = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # what HF's loop has fed each such row when it scores the last step: the input, the row's tokens
    # (ending in its EOS), then pad tokens
    fed = torch.full(
        (len(rows), width + steps - 1), pad_id, dtype=input_ids.dtype, device=device
    )  # [rows, width + steps - 1]
    fed[:, :width] = input_ids[rows]
    for i, row in enumerate(rows):
        fed[i, width : width + len(outputs[row])] = torch.tensor(outputs[row], dtype=input_ids.dtype, device=device)
    mask = torch.cat(
        [attention_mask[rows].long(), torch.ones(len(rows), steps - 1, dtype=torch.long, device=device)], 1
    )  # [rows, width + steps - 1]

    first = min(len(outputs[row]) for row in rows)  # the earliest step any such row needs
    forward = inspect.signature(model.forward).parameters
    inputs = dict(input_ids=fed.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
    if "position_ids" in forward:  # HF's: the mask's running count, 0 at masked tokens
        inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0).to(model.device)
    if "logits_to_keep" in forward:
        inputs["logits_to_keep"] = steps - first
    with torch.no_grad():
        logits = model(**inputs).logits  # [rows, kept, vocab]
    logits = (
        logits[:, logits.shape[1] - (steps - first) :].float().to(device)
    )  # [rows, steps - first, vocab]: step first + j at j

    result = {row: ([], []) for row in rows}
    for i, row in enumerate(rows):
        for step in range(len(outputs[row]), steps):
            result[row][0].append(logits[i, step - first].clone())  # [vocab]
    if not logits_processor:
        for raw, scores in result.values():
            scores.extend(x.float() for x in raw)
        return result
    # HF calls its processors once a step on the whole batch: rebuild that batch at each step these
    # rows need (every row's tokens so far, pads after an EOS; the running rows' logits as recorded)
    finished_at = {row: len(outputs[row]) for row in rows}
    tokens = torch.full(
        (batch, width + steps - 1), pad_id, dtype=input_ids.dtype, device=device
    )  # [batch, width + steps - 1]
    tokens[:, :width] = input_ids
    for row, out in enumerate(outputs):
        if out:
            tokens[row, width : width + min(len(out), steps - 1)] = torch.tensor(
                out[: steps - 1], dtype=input_ids.dtype, device=device
            )
    for step in range(first, steps):
        step_logits = torch.stack(
            [
                logits[rows.index(row), step - first]
                if row in finished_at and step >= finished_at[row]
                else raw_logits[row][step].to(device)
                for row in range(batch)
            ]
        ).float()  # [batch, vocab]
        processed = logits_processor(tokens[:, : width + step], step_logits)  # [batch, vocab]
        for row in rows:
            if step >= finished_at[row]:
                result[row][1].append(processed[row].float())
    return result
