"""Training rows for one step: prompts continued by the draft (on-policy) or by the target (greedy,
sampled or beam search), all scored by the target in the loss.

Every row starts with its prompt; a row is trained at every position up to its first end-of-text
token after the prompt (the prompt positions are real text, the rest what the models generate). Rows
from the target's beam search also carry, per position, the tokens the target kept after that prefix:
the next tokens of the returned beams that share it (``kept``, for the ranking loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

SOURCES = ("draft_sample", "target_greedy", "target_sample", "target_beam")
# which continuations each objective trains on, and how often
MIXES = {
    "chain": {"draft_sample": 0.5, "target_greedy": 0.3, "target_sample": 0.2},
    "beam": {"draft_sample": 0.3, "target_beam": 0.7},
    "both": {"draft_sample": 0.35, "target_greedy": 0.2, "target_sample": 0.1, "target_beam": 0.35},
}


@dataclass
class Rows:
    input_ids: torch.Tensor  # [rows, seq]
    mask: torch.Tensor  # [rows, seq] bool: positions whose next-token distributions are trained
    kept: torch.Tensor | None  # [rows, seq, num_beams] ids kept after each prefix, -1 padded; None: no beams
    source: str


def pick_source(mix: dict[str, float]) -> str:
    """A source drawn from ``mix`` with torch's global generator (saved in checkpoints, so a resumed
    run continues the same draws)."""
    names = list(mix)
    weights = torch.tensor([mix[n] for n in names], dtype=torch.float)  # [sources]
    return names[int(torch.multinomial(weights, 1))]


def _config(eos: int, new_tokens: int, **options) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=eos, pad_token_id=eos,
                            bos_token_id=eos, **options)


def _mask(sequences: torch.Tensor, prompt_length: int, eos: int) -> torch.Tensor:
    """True up to and including each row's first ``eos`` after the prompt."""
    generated = sequences[:, prompt_length:] == eos  # [rows, new]
    after = (generated.cumsum(-1) - generated.long()) > 0  # [rows, new]: strictly after the first eos
    mask = torch.ones_like(sequences, dtype=torch.bool)  # [rows, seq]
    mask[:, prompt_length:] = ~after
    return mask


def _kept(sequences: torch.Tensor, prompt_length: int, group: int, mask: torch.Tensor) -> torch.Tensor:
    """Per row and position, the next tokens that rows of the same prompt (``group`` rows each) take after
    the same prefix: the target's kept beams through that prefix."""
    rows, seq = sequences.shape
    kept = torch.full((rows, seq, group), -1, dtype=torch.long)  # [rows, seq, group]
    seqs = sequences.tolist()
    valid = mask.tolist()
    for start in range(0, rows, group):
        children: dict[tuple, list[int]] = {}
        for r in range(start, start + group):
            for i in range(prompt_length - 1, seq - 1):
                if not valid[r][i]:
                    break
                kids = children.setdefault(tuple(seqs[r][prompt_length : i + 1]), [])
                if seqs[r][i + 1] not in kids:
                    kids.append(seqs[r][i + 1])
        for r in range(start, start + group):
            for i in range(prompt_length - 1, seq - 1):
                if not valid[r][i]:
                    break
                kids = children[tuple(seqs[r][prompt_length : i + 1])]
                kept[r, i, : len(kids)] = torch.tensor(kids)
    return kept.to(sequences.device)


@torch.no_grad()
def make_rows(source: str, prompts: torch.Tensor, draft, target, eos: int, new_tokens: int,
              num_beams: int) -> Rows:
    """Continue ``prompts`` [n, prompt_length] by ``source`` for ``new_tokens`` tokens."""
    prompt_length = prompts.shape[1]
    inputs = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts))  # [n, prompt_length] each
    if source == "draft_sample":
        out = draft.generate(**inputs, generation_config=_config(eos, new_tokens, do_sample=True, top_k=0))
    elif source == "target_greedy":
        out = target.generate(**inputs, generation_config=_config(eos, new_tokens, do_sample=False))
    elif source == "target_sample":
        out = target.generate(**inputs, generation_config=_config(eos, new_tokens, do_sample=True, top_k=0))
    elif source == "target_beam":
        n = max(1, (2 * prompts.shape[0]) // num_beams)  # about twice the rows of a chain step
        inputs = {k: v[:n] for k, v in inputs.items()}
        config = _config(eos, new_tokens, do_sample=False, num_beams=num_beams, num_return_sequences=num_beams,
                         early_stopping=True, length_penalty=1.0)
        out = target.generate(**inputs, generation_config=config)
    else:
        raise ValueError(f"unknown rollout source {source!r}; expected one of {', '.join(SOURCES)}")
    sequences = out if isinstance(out, torch.Tensor) else out.sequences  # [rows, seq]
    mask = _mask(sequences, prompt_length, eos)  # [rows, seq]
    kept = _kept(sequences, prompt_length, num_beams, mask) if source == "target_beam" else None
    return Rows(sequences, mask, kept, source)
