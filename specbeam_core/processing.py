"""Logits processors applied to many positions at once.

A request's ``logits_processor(context, logits [1, vocab])`` processes one position: the logits
after the tokens ``context``. A pass has many such positions (every row's drafts, every tree node),
and calling a framework's processors once per position costs a call's fixed overhead each time. A
framework whose processors can take several positions in one call (HF's take a batch of rows of one
length) gives its requests one shared ``batch_logits_processor``; the engine then hands it every
position of the requests sharing it in one call, ``(requests, contexts, logits [E, vocab])``, and it
returns the ``[E, vocab]`` processed logits. Requests without one are processed position by position.
"""

from __future__ import annotations

import torch

from .request import Request


def apply_logits_processors(requests: list[Request], contexts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """Entry ``e`` of ``logits`` ``[E, vocab]`` is the position of ``requests[e]`` after
    ``contexts[e]``; returns the processed ``[E, vocab]`` (entries of requests without a processor as given)."""
    first = requests[0].batch_logits_processor if requests else None
    if first is not None and all(
        r.logits_processor is not None and r.batch_logits_processor is first for r in requests
    ):
        return first(requests, contexts, logits)  # one processor for every entry: no copy in between
    processed = logits.clone()  # [E, vocab]
    shared: dict[int, list[int]] = {}  # id of a batch processor -> its entries
    for e, request in enumerate(requests):
        if request.logits_processor is None:
            continue
        if request.batch_logits_processor is not None:
            shared.setdefault(id(request.batch_logits_processor), []).append(e)
        else:
            processed[e] = request.logits_processor(contexts[e], logits[e : e + 1])[0]
    for entries in shared.values():
        batch_processor = requests[entries[0]].batch_logits_processor
        processed[entries] = batch_processor(
            [requests[e] for e in entries], [contexts[e] for e in entries], logits[entries]
        ).to(processed.dtype)
    return processed
