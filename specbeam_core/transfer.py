"""Host-to-device copies that do not stall the device's queue.

The engine keeps its bookkeeping on the host and hands each forward a few small host tensors (token
ids, positions, slot indices, the attention mask). A plain ``tensor.to("cuda")`` from pageable host
memory makes PyTorch synchronise the stream after the copy: the host waits until the GPU has run
everything queued before it, several times per forward, so the host's next launches can never run
ahead of the GPU. :func:`to_device` stages the tensor in pinned memory and queues the copy like a
kernel; PyTorch's caching host allocator keeps the pinned buffer until the copy has run.
"""

from __future__ import annotations

import torch

_blocking = False  # set by benchmarks to measure the plain copies (``blocking_copies``)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` on ``device``: the tensor itself where it already is, an asynchronous copy from pinned
    memory onto a CUDA device, a plain copy elsewhere."""
    if torch.device(device).type == "cuda" and host.device.type == "cpu" and not _blocking:
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class blocking_copies:
    """Context manager: :func:`to_device` copies as plain ``.to(device)`` calls inside it (benchmarks
    compare the two)."""

    def __enter__(self) -> "blocking_copies":
        global _blocking
        self._before, _blocking = _blocking, True
        return self

    def __exit__(self, *exc) -> None:
        global _blocking
        _blocking = self._before
