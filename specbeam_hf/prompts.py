"""The prompts inside HF's padded ``input_ids``: each row's unmasked tokens, checked.

HF predicts a row's first new token from its *last column*. With left padding (what decoder-only
generation needs) that is the prompt's last token, and dropping the masked columns gives the same
tokens, positions and attention as HF's own loop (its position ids count unmasked tokens only). A
row whose mask ends in 0 is right-padded: HF then predicts from a pad column (it warns and goes on),
an answer nobody wants and specbeam would not reproduce, so it is refused with the fix.
"""

from __future__ import annotations

import torch


def unpadded_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sliding_window: int | None = None,
    chunk_size: int | None = None,
) -> list[list[int]]:
    """``input_ids`` ``[batch, width]`` and its mask (None: no padding) -> each row's prompt tokens.

    ``sliding_window``: the target's, if it has sliding-window layers. HF's window then spans the
    last ``sliding_window`` *columns*, masked ones included, so a row with zeros inside its prompt
    (after its first unmasked token) sees fewer tokens in HF than the paged cache, which holds no
    masked tokens, would give it: refused, with the fix. ``chunk_size``: likewise for chunked
    layers (Llama 4), whose chunks HF counts in columns after the left padding."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids must be [batch, length] with length >= 1")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch: input_ids has no rows")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if attention_mask is None:
        return input_ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    prompts = []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        if not keep.any():
            raise ValueError(f"empty prompt: row {row} of the batch has no unmasked tokens")
        if not keep[-1]:
            raise ValueError(
                f"right padding: row {row} of attention_mask ends in 0, so its next token would be predicted "
                "from a pad position; decoder-only generation needs left padding (load the tokenizer with "
                "padding_side='left')"
            )
        counted = [f"sliding-window attention (window {sliding_window})"] if sliding_window is not None else []
        counted += [f"chunked attention (chunks of {chunk_size})"] if chunk_size is not None else []
        if counted and not keep[int(keep.int().argmax()) :].all():
            raise ValueError(
                f"attention_mask row {row} has zeros inside the prompt (not only left padding); with this model's "
                f"{' and '.join(counted)} HF counts the masked positions, which specbeam's cache does not hold: "
                "drop the masked tokens from input_ids instead"
            )
        prompts.append(input_ids[row][keep].tolist())
    return prompts
